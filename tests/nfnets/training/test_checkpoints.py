"""Checkpointer: exact round trip (no pickle), keep-N, orbax's periodic save policy, errors."""

import jax
import numpy as np
import pytest

from nfnets.training.checkpoints import Checkpointer
from nfnets.training.step import TrainState, zero_metric_sums


def _state(seed: int) -> TrainState:
    rng = np.random.default_rng(seed)
    return TrainState(
        step=np.asarray(seed, np.int32),
        params={"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32)}},
        batch_stats={},
        opt_state=({"trace": rng.normal(size=(4,)).astype(np.float32)},),
        ema_params=None,
        metric_sums=zero_metric_sums(),
        num_skipped=np.asarray(2, np.int32),
    )


def test_round_trip_is_exact(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "ck"), max_to_keep=2)
    state = _state(3)
    ckpt.save(3, state, {"train_time_s": 1.5, "note": "x"})
    restored, meta = ckpt.restore(_state(0))
    ckpt.close()
    assert meta == {"train_time_s": 1.5, "note": "x"}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert np.asarray(a).dtype == np.asarray(b).dtype
    assert restored.ema_params is None and restored.batch_stats == {}
    # Nothing pickled: orbax writes arrays and JSON only.
    assert not list((tmp_path / "ck").rglob("*.pkl")) and not list(
        (tmp_path / "ck").rglob("*.pickle")
    )


def test_keeps_last_n_and_saves_periodically(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "ck"), max_to_keep=2, save_every_steps=2)
    saved = []
    for s in range(1, 7):
        saved.append(ckpt.should_save(s))
        if saved[-1]:
            ckpt.save(s, _state(s), {})
    assert saved == [False, True, False, True, False, True]
    assert ckpt.all_steps() == [4, 6]
    assert ckpt.latest_step() == 6
    state, _ = ckpt.restore(_state(0), step=4)
    assert int(state.step) == 4
    ckpt.close()


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="keep at least 1"):
        Checkpointer(str(tmp_path / "a"), max_to_keep=0)
    ckpt = Checkpointer(str(tmp_path / "b"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.restore(_state(0))
    ckpt.close()
