"""The training library end to end on tiny fake data and 8 virtual CPU devices.

Covers: outputs of a run, exact resume, SyncBN parity with one big batch, the
non-finite guard, config validation and derived values.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
import optax
import pytest

from nfnets import data as data_lib
from nfnets import metrics as metrics_lib
from nfnets.config import ConfigError, derive, unknown_overrides, validate
from nfnets.registry import create_model
from nfnets.train_state import create_train_state, make_train_step
from nfnets.training import load_data, replicate, run, unreplicate
from tests.nfnets.tiny_config import N_TEST, fake_data, tiny_bn_config, tiny_nf_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return fake_data(tmp_path_factory.mktemp("fmnist"))


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_train_end_to_end_and_exact_resume(data_dir, tmp_path):
    """4 straight steps vs 2 steps, stop (checkpoint), resume to 4: identical results."""
    config = tiny_nf_config(data_dir)
    config.ema = "nfnet"
    config.model_kwargs.stochastic_depth = 0.2  # per-step randomness must resume exactly
    straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")

    summary, straight = run(config, straight_dir)
    for key in metrics_lib.SUMMARY_KEYS:
        assert key in summary
    assert summary["steps"] == 4 and summary["test_count"] == N_TEST
    assert summary["wall_time_s"] > 0 and summary["images_per_sec"] > 0
    assert "test_accuracy_ema" in summary
    with open(os.path.join(straight_dir, "summary.json")) as f:
        assert json.load(f)["steps"] == 4
    assert os.path.getsize(os.path.join(straight_dir, metrics_lib.CURVES_FILE)) > 1000
    events = [n for _, _, fs in os.walk(straight_dir) for n in fs if "tfevents" in n]
    assert events
    records = metrics_lib.read_metrics(straight_dir)
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4]
    assert all(np.isfinite(r["train_loss"]) for r in records if "train_loss" in r)

    first, _ = run(config, resumed_dir, stop_at_step=2)
    assert first == {"interrupted": True, "steps": 2}
    assert not os.path.exists(os.path.join(resumed_dir, "summary.json"))
    summary2, resumed = run(config, resumed_dir)

    _assert_trees_equal(straight.params, resumed.params)
    _assert_trees_equal(straight.opt_state, resumed.opt_state)
    _assert_trees_equal(straight.ema_params, resumed.ema_params)
    assert int(resumed.step) == 4
    keys = ("train_loss", "train_accuracy", "learning_rate", "test_loss", "test_accuracy")
    strip = lambda rs: [{k: r[k] for k in ("step", *keys) if k in r} for r in rs]
    assert strip(metrics_lib.read_metrics(resumed_dir)) == strip(records)
    for key in ("test_loss", "test_accuracy", "test_accuracy_ema", "steps"):
        assert summary2[key] == summary[key]


@functools.cache
def _bn_setup(data_dir: str, num_devices: int):
    """Initial state, pmapped step and one training batch for the tiny SyncBN ResNet.

    Cached: the SyncBN and non-finite tests share the compiled 8-device step.
    """
    config = tiny_bn_config(data_dir)
    config.sync_batch_stats = "all"
    train_ds, _ = load_data(config)
    d = derive(
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
    batch = next(data_lib.train_iterator(train_ds, global_batch_size=16, seed=0))
    return state, step, batch


def _one_step(data_dir, batch, num_devices):
    """One pmapped train step from the same initial state on ``num_devices`` devices."""
    state, step, _ = _bn_setup(data_dir, num_devices)
    sharded = data_lib.shard_for_pmap(batch, num_devices)
    new, metrics = step(replicate(state, num_devices), sharded, jax.random.key(1))
    return state, new, metrics


@pytest.mark.slow
def test_syncbn_step_equals_one_device_on_the_whole_batch(data_dir):
    batch = _bn_setup(data_dir, 8)[2]
    _, new8, m8 = _one_step(data_dir, batch, 8)
    _, new1, m1 = _one_step(data_dir, batch, 1)
    assert jax.tree.leaves(new1.batch_stats)  # the model does keep batch statistics
    for dev in range(8):
        for tree8, tree1 in ((new8.params, new1.params), (new8.batch_stats, new1.batch_stats)):
            a = jax.tree.map(lambda x, dev=dev: np.asarray(x)[dev], tree8)
            b = jax.tree.map(lambda x: np.asarray(x)[0], tree1)
            jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6), a, b)
    np.testing.assert_allclose(np.asarray(m8["loss"])[0], np.asarray(m1["loss"])[0], rtol=1e-5)


@pytest.mark.slow
def test_non_finite_batch_changes_nothing_and_is_counted(data_dir):
    batch = _bn_setup(data_dir, 8)[2]
    bad = {k: v.copy() for k, v in batch.items()}
    bad["image"][5, 3, 3, 0] = np.nan  # one value on one device
    state, new, metrics = _one_step(data_dir, bad, 8)
    new = unreplicate(new)
    assert int(np.asarray(metrics["finite"])[0]) == 0
    _assert_trees_equal(new.params, state.params)
    _assert_trees_equal(new.batch_stats, state.batch_stats)
    _assert_trees_equal(new.opt_state, state.opt_state)
    assert int(new.num_skipped) == 1 and int(new.metric_sums["skipped"]) == 1
    assert int(new.metric_sums["steps"]) == 0 and float(new.metric_sums["loss"]) == 0.0
    assert int(new.step) == 1  # the data position still advances
    # The same batch without the NaN does update (the guard is not always on).
    _, good, _ = _one_step(data_dir, batch, 8)
    good = unreplicate(good)
    assert int(good.num_skipped) == 0
    assert not np.allclose(good.params["head"]["kernel"], state.params["head"]["kernel"])
    assert not np.allclose(
        good.batch_stats["final_norm"]["mean"], state.batch_stats["final_norm"]["mean"]
    )


# ----------------------------------------------------------------------- config


def test_indivisible_batch_names_the_numbers(data_dir):
    config = tiny_nf_config(data_dir)
    config.batch_size = 12
    with pytest.raises(ConfigError, match=r"batch_size=12.*8 devices.*batch_size=8 or 16"):
        validate(config, num_devices=8)


def test_missing_data_names_the_fix(tmp_path):
    config = tiny_nf_config(str(tmp_path / "empty"))
    with pytest.raises(data_lib.DatasetNotFoundError, match="--config.data_dir"):
        load_data(config)


def test_unknown_keys_are_rejected(data_dir):
    config = tiny_nf_config(data_dir)
    config.lock()
    with pytest.raises(AttributeError):
        config.batch_sise = 3
    argv = ["train.py", "--config.batch_sise=3", "--config.model_kwargs.widths=(8,)", "--x"]
    assert unknown_overrides(config, argv) == ["batch_sise"]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("sync_batch_stats", "some", "use one of"),
        ("ema", "fast", "fixed decay in"),
        ("dtype", "float8", "use one of"),
        ("log_every_steps", 0, "positive"),
    ],
)
def test_bad_values_name_the_key(data_dir, key, value, message):
    config = tiny_nf_config(data_dir)
    config[key] = value
    with pytest.raises(ConfigError, match=f"config.{key}=.*{message}"):
        validate(config, num_devices=8)


def test_derived_values_follow_overrides(data_dir):
    config = tiny_bn_config(data_dir)
    config.sync_batch_stats = "groups"
    config.sync_group_size = 4
    config.batch_size = 32  # override after the file: derived values must follow
    d = derive(config, num_train_examples=64, num_devices=8, local_devices=8, process_count=1)
    assert (d.steps_per_epoch, d.total_steps, d.per_device_batch) == (2, 2, 4)
    assert d.axis_index_groups == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert d.model_kwargs["norm_kwargs"] == {
        "axis_name": "batch",
        "axis_index_groups": [[0, 1, 2, 3], [4, 5, 6, 7]],
    }
    config.sync_batch_stats = "none"
    d = derive(config, num_train_examples=64, num_devices=8, local_devices=8, process_count=1)
    assert "axis_name" not in d.model_kwargs["norm_kwargs"]
    config.sync_batch_stats = "all"
    config.model_kwargs.norm = "group_norm"  # batch independent: no axis to sync
    config.num_train_steps = 5
    d = derive(config, num_train_examples=64, num_devices=8, local_devices=8, process_count=1)
    assert "axis_name" not in d.model_kwargs["norm_kwargs"] and d.total_steps == 5
    assert round(d.optimizer_config.num_epochs * d.steps_per_epoch) == 5
    with pytest.raises(ConfigError, match="sync_group_size=3"):
        config.sync_batch_stats = "groups"
        config.sync_group_size = 3
        validate(config, num_devices=8)


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
    new, m = step(replicate(state), {"image": images, "label": labels}, jax.random.key(0))
    assert np.all(np.asarray(m["finite"]) == 0)
    _assert_trees_equal(unreplicate(new).params, state.params)
    _assert_trees_equal(unreplicate(new).opt_state, state.opt_state)
    images[3, 1, 0, 0, 0] = 1.0
    new, m = step(replicate(state), {"image": images, "label": labels}, jax.random.key(0))
    assert np.all(np.asarray(m["finite"]) == 1)
    new_kernel = unreplicate(new).params["head"]["kernel"]
    assert not np.allclose(new_kernel, state.params["head"]["kernel"])
    # Every device holds the same parameters after a step.
    k = np.asarray(new.params["head"]["kernel"])
    np.testing.assert_array_equal(k, np.broadcast_to(k[0], k.shape))
