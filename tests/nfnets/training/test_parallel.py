"""``config.parallelism``: pmap and jit(shard_map) compute the same run on 8 virtual devices.

The pmap path is the reference (it is the trainer's path since the start and its
SyncBN is checked against one device on the whole batch in test_step.py); the
shard_map path must give the same parameters, per-device running statistics,
metrics and evaluations, for every ``sync_batch_stats`` mode, and a checkpoint
written by either path must resume exactly in the other.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from nfnets.training import outputs
from nfnets.training.loop import Trainer, run
from nfnets.training.parallel import (
    BATCH,
    PER_DEVICE,
    REPLICATED,
    Pmap,
    ShardMap,
    make_parallel,
)
from nfnets.training.plan import ConfigError, make_plan
from tests.nfnets.training.tiny_config import tiny_bn_config

STEPS = 3
# "Equal to float rounding": in practice the two paths lower to the same per-device
# program and agree bit for bit; the tolerance only allows a reordered reduction.
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _config(data_dir, parallelism: str, sync: str):
    c = tiny_bn_config(data_dir)
    c.parallelism = parallelism
    c.sync_batch_stats = sync
    c.sync_group_size = 4 if sync == "groups" else 0
    c.tensorboard = False
    c.eval_batch_size = 40  # the whole fake test split in one batch
    return c


def _per_device_stats(p_state) -> list[np.ndarray]:
    """Every batch-stats leaf as (devices, ...): both paths keep one copy per device."""
    return [np.asarray(x) for x in jax.tree.leaves(p_state.batch_stats)]


def _train_steps(data_dir, tmp_path, parallelism: str, sync: str):
    trainer = Trainer(_config(data_dir, parallelism, sync), str(tmp_path / parallelism))
    p_state = trainer.put_state(trainer.init_state())
    for batch in trainer.train_batches(0, num_steps=STEPS):
        p_state = trainer.train_step(p_state, batch, trainer.step_rng)
    stats = _per_device_stats(p_state)
    p_state, metrics = trainer.read_metrics(p_state)
    host = trainer.host_state(p_state)
    evals = trainer.eval_all(trainer.sync_stats(p_state))
    return host, stats, metrics, evals


@pytest.mark.slow
@pytest.mark.parametrize("sync", ["all", "none", "groups"])
def test_pmap_and_shard_map_steps_agree(data_dir, tmp_path, sync):
    ref = _train_steps(data_dir, tmp_path, "pmap", sync)
    got = _train_steps(data_dir, tmp_path, "shard_map", sync)
    (ref_state, ref_stats, ref_metrics, ref_evals) = ref
    (state, stats, metrics, evals) = got

    for name in ("params", "opt_state", "step", "num_skipped", "metric_sums"):
        a, b = jax.tree.leaves(getattr(ref_state, name)), jax.tree.leaves(getattr(state, name))
        assert len(a) == len(b) and a
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(y, x, **TOL, err_msg=name)
    assert int(state.step) == STEPS
    assert metrics["steps"] == STEPS and metrics["skipped"] == 0
    for key in ref_metrics:
        np.testing.assert_allclose(metrics[key], ref_metrics[key], **TOL, err_msg=key)
    for key in ref_evals:
        np.testing.assert_allclose(evals[key], ref_evals[key], **TOL, err_msg=key)

    assert len(stats) == len(ref_stats) and stats
    for x, y in zip(ref_stats, stats, strict=True):
        assert x.shape == y.shape and x.shape[0] == 8
        np.testing.assert_allclose(y, x, **TOL)
    # The running statistics keep the mode's per-device structure on both paths:
    # one population ("all"), two groups of 4, or 8 separate devices ("none").
    mean = next(s for s in stats if s.ndim == 2 and np.ptp(s) > 0)
    distinct = {"all": 1, "groups": 2, "none": 8}[sync]
    assert len({m.tobytes() for m in mean}) == distinct


@pytest.mark.slow
@pytest.mark.parametrize(
    "first,second,sync", [("shard_map", "pmap", "none"), ("pmap", "shard_map", "groups")]
)
def test_checkpoint_of_one_path_resumes_exactly_in_the_other(
    data_dir, tmp_path, first, second, sync
):
    """4 straight pmap steps == 2 steps with one path, checkpoint, 2 more with the other.

    Per-device running statistics are merged whenever a checkpoint is written, so
    the straight run also checkpoints at step 2 (``checkpoint_every_steps``): both
    runs then merge at the same step.
    """
    straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")
    config = _config(data_dir, "pmap", sync)
    config.ema = "0.9"
    config.checkpoint_every_steps = 2
    summary, straight = run(config, straight_dir)

    config.parallelism = first
    stopped, _ = run(config, resumed_dir, stop_at_step=2)
    assert stopped == {"interrupted": True, "steps": 2}
    config.parallelism = second
    summary2, resumed = run(config, resumed_dir)

    for name in ("params", "batch_stats", "opt_state", "ema_params"):
        a, b = jax.tree.leaves(getattr(straight, name)), jax.tree.leaves(getattr(resumed, name))
        assert len(a) == len(b) and a
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(y, x, **TOL, err_msg=name)
    keys = ("train_loss", "train_accuracy", "learning_rate", "test_loss", "test_accuracy")
    strip = lambda rs: [[r.get(k) for k in ("step", *keys)] for r in rs]
    np.testing.assert_allclose(
        np.array(strip(outputs.read_metrics(resumed_dir)), float),
        np.array(strip(outputs.read_metrics(straight_dir)), float),
        **TOL,
    )
    for key in ("test_loss", "test_accuracy", "test_accuracy_ema", "steps"):
        np.testing.assert_allclose(summary2[key], summary[key], **TOL, err_msg=key)


def test_layouts_and_first_copy_round_trip():
    """REPLICATED / PER_DEVICE / BATCH placement of both paths, and ``host`` reading back."""
    tree = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3), "n": np.int32(5)}
    stats = {"mean": np.arange(3.0, dtype=np.float32)}
    batch = {"image": np.arange(16 * 2, dtype=np.float32).reshape(16, 2)}

    pm = Pmap()
    p_tree, p_stats = pm.put(tree, REPLICATED), pm.put(stats, PER_DEVICE)
    assert p_tree["w"].shape == (8, 2, 3) and p_stats["mean"].shape == (8, 3)
    assert pm.put(batch, BATCH)["image"].shape == (8, 2, 2)

    sm = ShardMap()
    s_tree, s_stats = sm.put(tree, REPLICATED), sm.put(stats, PER_DEVICE)
    assert s_tree["w"].shape == (2, 3) and s_tree["w"].sharding.is_fully_replicated
    assert s_stats["mean"].shape == (8, 3)  # one row per device, each on its own device
    for shard in s_stats["mean"].addressable_shards:
        assert shard.data.shape == (1, 3)
    s_batch = sm.put(batch, BATCH)["image"]
    assert s_batch.shape == (16, 2)
    rows = {int(s.device.id): np.asarray(s.data) for s in s_batch.addressable_shards}
    for i, d in enumerate(sm.mesh.devices):
        np.testing.assert_array_equal(rows[int(d.id)], batch["image"][2 * i : 2 * i + 2])

    for par, t, s in ((pm, p_tree, p_stats), (sm, s_tree, s_stats)):
        back = par.host(t, REPLICATED)
        np.testing.assert_array_equal(back["w"], tree["w"])
        assert back["n"] == 5 and isinstance(back["w"], np.ndarray)
        np.testing.assert_array_equal(par.host(s, PER_DEVICE)["mean"], stats["mean"])


def test_mapped_function_sees_per_device_blocks():
    """Inside ``map``: PER_DEVICE leaves lose the device axis, BATCH leaves are the local rows.

    Also a ``psum`` over ``axis_index_groups`` (SyncBN groups with the psum merge),
    which shard_map's replication checker would reject.
    """
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]

    def fn(s, b):
        grouped = jax.lax.psum(b.sum(), "batch", axis_index_groups=groups)
        return s + jax.lax.psum(b.sum(), "batch"), s * 0 + b.sum(), grouped

    for par in (Pmap(), ShardMap()):
        f = par.map(fn, (PER_DEVICE, BATCH), (PER_DEVICE, PER_DEVICE, PER_DEVICE))
        s = par.put(np.float32(1.0), PER_DEVICE)
        b = par.put(np.arange(16, dtype=np.float32), BATCH)
        total, local, grouped = (np.asarray(x) for x in f(s, b))
        np.testing.assert_array_equal(total, np.full(8, 1.0 + 120.0))
        np.testing.assert_array_equal(local, [4 * i + 1 for i in range(8)])  # 2i + 2i+1
        np.testing.assert_array_equal(grouped, [28.0] * 4 + [92.0] * 4)  # sum(0..7), sum(8..15)


def test_unknown_parallelism_names_the_fix(data_dir):
    config = _config(data_dir, "pjit", "all")
    with pytest.raises(ConfigError, match=r"config.parallelism='pjit'.*'pmap', 'shard_map'"):
        make_plan(config, num_train_examples=64)
    with pytest.raises(ValueError, match="parallelism 'pjit'"):
        make_parallel("pjit")
