"""The data-parallel train step on 8 virtual CPU devices: SyncBN parity, non-finite guard."""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
import pytest

from nfnets.registry import create_model
from nfnets.training.loop import load_data
from nfnets.training.pipeline import shard_for_pmap, train_iterator
from nfnets.training.plan import make_plan
from nfnets.training.step import create_train_state, make_train_step, replicate, unreplicate
from tests.nfnets.training.tiny_config import assert_trees_equal, tiny_bn_config


@functools.cache
def _bn_setup(data_dir: str, num_devices: int):
    """Initial state, pmapped step and one training batch for the tiny SyncBN ResNet.

    Cached: the SyncBN and non-finite tests share the compiled 8-device step.
    """
    config = tiny_bn_config(data_dir)
    config.sync_batch_stats = "all"
    train_ds, _, _ = load_data(config)
    d = make_plan(
        config,
        num_train_examples=len(train_ds),
        num_devices=num_devices,
        local_devices=num_devices,
        process_count=1,
    )
    model = create_model(config.model, num_classes=10, **d.model_kwargs)
    tx = optax.sgd(0.1, momentum=0.9)
    state = create_train_state(model, tx, jax.random.key(0), (28, 28, 1))
    step = jax.pmap(
        make_train_step(model, tx), axis_name="batch", in_axes=(0, 0, None),
        devices=jax.local_devices()[:num_devices],
    )  # fmt: skip
    batch = next(train_iterator(train_ds, global_batch_size=16, seed=0))
    return state, step, batch


def _one_step(data_dir, batch, num_devices):
    """One pmapped train step from the same initial state on ``num_devices`` devices."""
    state, step, _ = _bn_setup(data_dir, num_devices)
    sharded = shard_for_pmap(batch, num_devices)
    return state, step(replicate(state, num_devices), sharded, jax.random.key(1))


@pytest.mark.slow
def test_syncbn_step_equals_one_device_on_the_whole_batch(data_dir):
    batch = _bn_setup(data_dir, 8)[2]
    _, new8 = _one_step(data_dir, batch, 8)
    _, new1 = _one_step(data_dir, batch, 1)
    assert jax.tree.leaves(new1.batch_stats)  # the model does keep batch statistics
    for dev in range(8):
        for tree8, tree1 in ((new8.params, new1.params), (new8.batch_stats, new1.batch_stats)):
            a = jax.tree.map(lambda x, dev=dev: np.asarray(x)[dev], tree8)
            b = jax.tree.map(lambda x: np.asarray(x)[0], tree1)
            jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6), a, b)
    # The step's loss (summed into metric_sums from zero) is the same on both layouts.
    loss8, loss1 = (np.asarray(n.metric_sums["loss"])[0] for n in (new8, new1))
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)


@pytest.mark.slow
def test_non_finite_batch_changes_nothing_and_is_counted(data_dir):
    batch = _bn_setup(data_dir, 8)[2]
    bad = {k: v.copy() for k, v in batch.items()}
    bad["image"][5, 3, 3, 0] = np.nan  # one value on one device
    state, p_new = _one_step(data_dir, bad, 8)
    new = unreplicate(p_new)
    assert np.all(np.asarray(p_new.num_skipped) == 1)  # every device skipped
    assert_trees_equal(new.params, state.params)
    assert_trees_equal(new.batch_stats, state.batch_stats)
    assert_trees_equal(new.opt_state, state.opt_state)
    assert int(new.num_skipped) == 1 and int(new.metric_sums["skipped"]) == 1
    assert int(new.metric_sums["steps"]) == 0 and float(new.metric_sums["loss"]) == 0.0
    assert int(new.step) == 1  # the data position still advances
    # The same batch without the NaN does update (the guard is not always on).
    _, good = _one_step(data_dir, batch, 8)
    good = unreplicate(good)
    assert int(good.num_skipped) == 0
    assert not np.allclose(good.params["head"]["kernel"], state.params["head"]["kernel"])
    assert not np.allclose(
        good.batch_stats["final_norm"]["mean"], state.batch_stats["final_norm"]["mean"]
    )


def test_non_finite_guard_in_isolation():
    """The step on a hand-made model: NaN loss -> nothing changes, on every device."""
    import flax.linen as nn

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))

    model, tx = Tiny(), optax.adam(1e-2)
    state = create_train_state(model, tx, jax.random.key(0), (2, 2, 1))
    step = jax.pmap(make_train_step(model, tx), axis_name="batch", in_axes=(0, 0, None))
    images = np.ones((8, 2, 2, 2, 1), np.float32)
    labels = np.zeros((8, 2), np.int32)
    images[3, 1, 0, 0, 0] = np.inf
    new = step(replicate(state), {"image": images, "label": labels}, jax.random.key(0))
    assert np.all(np.asarray(new.num_skipped) == 1)
    assert_trees_equal(unreplicate(new).params, state.params)
    assert_trees_equal(unreplicate(new).opt_state, state.opt_state)
    images[3, 1, 0, 0, 0] = 1.0
    new = step(replicate(state), {"image": images, "label": labels}, jax.random.key(0))
    assert np.all(np.asarray(new.num_skipped) == 0)
    new_kernel = unreplicate(new).params["head"]["kernel"]
    assert not np.allclose(new_kernel, state.params["head"]["kernel"])
    # Every device holds the same parameters after a step.
    k = np.asarray(new.params["head"]["kernel"])
    np.testing.assert_array_equal(k, np.broadcast_to(k[0], k.shape))
