"""MixUp / CutMix soft labels reach the loss of the train step (2 virtual devices)."""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax

from nfnets.registry import create_model
from nfnets.training.augment import Augment
from nfnets.training.loop import load_data
from nfnets.training.pipeline import shard_for_pmap, train_iterator
from nfnets.training.step import create_train_state, make_train_step, replicate
from tests.nfnets.training.tiny_config import tiny_nf_config

DEVICES = 2


@functools.cache
def _setup(data_dir: str):
    """Tiny deterministic NF-ResNet (no dropout, no stochastic depth), its state and step."""
    config = tiny_nf_config(data_dir)
    kwargs = {**config.model_kwargs.to_dict(), "dropout": 0.0, "stochastic_depth": 0.0}
    kwargs["widths"], kwargs["depths"] = tuple(kwargs["widths"]), tuple(kwargs["depths"])
    model = create_model(config.model, num_classes=10, **kwargs)
    tx = optax.sgd(0.1)
    state = create_train_state(model, tx, jax.random.key(0), (28, 28, 1))
    # The zero-initialised head gives near-uniform logits; noise makes the labels matter.
    leaves, treedef = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    noisy = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    state = state.replace(params=jax.tree.unflatten(treedef, noisy))
    step = jax.pmap(
        make_train_step(model, tx), axis_name="batch", in_axes=(0, 0, None),
        devices=jax.local_devices()[:DEVICES],
    )  # fmt: skip
    train_ds, _, _ = load_data(config)
    return model, state, step, train_ds


def _step_loss(data_dir, batch) -> float:
    """The loss one train step records (metric_sums start at zero)."""
    _, state, step, _ = _setup(data_dir)
    new = step(replicate(state, DEVICES), shard_for_pmap(batch, DEVICES), jax.random.key(1))
    return float(np.asarray(new.metric_sums["loss"])[0])


def _numpy_soft_cross_entropy(logits, probs) -> float:
    """mean_n -sum_k p_nk log softmax(z_n)_k in float64."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_softmax = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(np.mean(-(np.asarray(probs, np.float64) * log_softmax).sum(axis=-1)))


def test_mixup_batch_trains_on_its_soft_labels(data_dir):
    model, state, _, train_ds = _setup(data_dir)
    it = train_iterator(train_ds, global_batch_size=16, seed=3, augment=Augment(mixup_alpha=0.4))
    batch = next(it)
    probs = batch["label_probs"]
    assert np.any((probs > 0) & (probs < 1))  # the labels really are mixed
    logits = model.apply({"params": state.params}, batch["image"], train=False)
    expected = _numpy_soft_cross_entropy(logits, probs)
    np.testing.assert_allclose(_step_loss(data_dir, batch), expected, rtol=1e-5)


def test_mixed_batch_loss_is_the_mixture_of_the_two_label_losses(data_dir):
    """Cross-entropy is linear in the targets: L(lam*a + (1-lam)*b) = lam*L(a) + (1-lam)*L(b)."""
    _, _, _, train_ds = _setup(data_dir)
    plain = next(train_iterator(train_ds, global_batch_size=16, seed=0))
    lam = 0.3
    labels_a = plain["label"]
    labels_b = labels_a[::-1].copy()
    eye = np.eye(10, dtype=np.float32)
    mixed = {**plain, "label_probs": lam * eye[labels_a] + (1 - lam) * eye[labels_b]}
    loss_a = _step_loss(data_dir, plain)
    loss_b = _step_loss(data_dir, {**plain, "label": labels_b})
    loss_mixed = _step_loss(data_dir, mixed)
    assert abs(loss_a - loss_b) > 1e-3  # the two label sets give different losses
    np.testing.assert_allclose(loss_mixed, lam * loss_a + (1 - lam) * loss_b, rtol=1e-5)
