"""Evaluation counts every example exactly once, whatever the batch size.

Reference: the model applied to the whole split at once (no padding, no devices)
with the loss and accuracy computed in float64 numpy.
"""

import jax
import numpy as np
import pytest

from nfnets.registry import create_model
from nfnets.training.augment import normalize
from nfnets.training.datasets import load_dataset
from nfnets.training.evaluation import evaluate, make_pmapped_eval_step, make_precise_bn
from nfnets.training.pipeline import eval_iterator, shard_for_pmap
from nfnets.training.step import replicate
from tests.nfnets.training.tiny_config import N_TEST


@pytest.fixture(scope="module")
def setup(data_dir):
    test = load_dataset("fashion_mnist", split="test", data_dir=data_dir)
    model = create_model(
        "nf_resnet26_small", num_classes=10, widths=(8, 16), depths=(1, 1), stem_width=8
    )
    images = normalize(test.images, test.info.mean, test.info.std)
    variables = jax.jit(lambda k: model.init({"params": k}, images[:1], train=False))(
        jax.random.key(1)
    )
    logits = np.asarray(jax.jit(lambda v: model.apply(v, images, train=False))(variables))
    logits = logits.astype(np.float64)
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    ref_loss = -logp[np.arange(N_TEST), test.labels].mean()
    ref_acc = (logits.argmax(1) == test.labels).mean()
    return test, model, variables, ref_loss, ref_acc


def _batches(test, batch_size, ndev):
    it = eval_iterator(test, global_batch_size=batch_size)
    return [shard_for_pmap(b, ndev) for b in it]


@pytest.mark.parametrize("batch_size", [24, 64])  # neither divides the 40 examples
def test_every_example_once(setup, batch_size):
    test, model, variables, ref_loss, ref_acc = setup
    ndev = jax.local_device_count()
    assert ndev == 8  # tests/conftest.py: 8 virtual devices
    p_eval = make_pmapped_eval_step(model)
    res = evaluate(
        p_eval, replicate(variables), _batches(test, batch_size, ndev), expected_count=N_TEST
    )
    assert res["count"] == N_TEST
    np.testing.assert_allclose(res["accuracy"], ref_acc, atol=1e-7)
    np.testing.assert_allclose(res["loss"], ref_loss, rtol=1e-5)


def test_padding_never_counts(setup):
    """Padded rows filled with NaN and wrong labels change nothing."""
    test, model, variables, ref_loss, ref_acc = setup
    batches = _batches(test, 24, 8)
    for b in batches:
        b["image"][~b["mask"]] = np.nan
        b["label"][~b["mask"]] = 7
    res = evaluate(make_pmapped_eval_step(model), replicate(variables), batches)
    assert res["count"] == N_TEST
    np.testing.assert_allclose(res["accuracy"], ref_acc, atol=1e-7)
    np.testing.assert_allclose(res["loss"], ref_loss, rtol=1e-5)


def test_dropped_batch_is_detected(setup):
    test, model, variables, _, _ = setup
    batches = _batches(test, 24, 8)[:-1]
    with pytest.raises(RuntimeError, match="counted 24 examples but the split holds 40"):
        evaluate(make_pmapped_eval_step(model), replicate(variables), batches, expected_count=40)


@pytest.mark.parametrize("axis_name", [None, "batch"])
def test_precise_bn_equals_population_statistics(axis_name):
    """PreciseBN over 3 batches on 8 devices == numpy mean/var of all 48 examples.

    Model: x -> Dense(4) -> BatchNorm -> head. The BN input is computed
    independently (numpy matmul) for the reference; with and without SyncBN.
    """
    import flax.linen as nn

    from norms.linen import BatchNorm

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            h = nn.Dense(4, name="dense")(x.reshape(x.shape[0], -1))
            h = BatchNorm(axis_name=axis_name, name="bn")(h, train=train)
            return nn.Dense(10, name="head")(h)

    model = Tiny()
    rng = np.random.default_rng(0)
    images = rng.normal(2.0, 3.0, size=(48, 2, 2, 1)).astype(np.float32)
    variables = model.init({"params": jax.random.key(0)}, images[:2], train=False)
    batches = [{"image": images[i : i + 16].reshape(8, 2, 2, 2, 1)} for i in range(0, 48, 16)]
    precise = make_precise_bn(model)(replicate(variables), iter(batches), 3, jax.random.key(0))
    dense = variables["params"]["dense"]
    h = images.reshape(48, -1).astype(np.float64) @ np.asarray(dense["kernel"], np.float64)
    h += np.asarray(dense["bias"], np.float64)
    for dev in range(8):
        np.testing.assert_allclose(np.asarray(precise["bn"]["mean"])[dev], h.mean(0), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(precise["bn"]["var"])[dev], h.var(0), rtol=1e-4)
    # The running statistics passed in are untouched (mean 0, var 1 at init).
    np.testing.assert_array_equal(np.asarray(variables["batch_stats"]["bn"]["mean"]), 0.0)
