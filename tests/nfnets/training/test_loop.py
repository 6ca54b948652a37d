"""The training loop end to end on tiny fake data and 8 virtual CPU devices.

Covers: outputs of a run, exact resume through a checkpoint, the missing-data error.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from nfnets.training import outputs
from nfnets.training.datasets import DatasetNotFoundError
from nfnets.training.loop import load_data, run
from tests.nfnets.training.tiny_config import N_TEST, assert_trees_equal, tiny_nf_config


@pytest.mark.slow
def test_train_end_to_end_and_exact_resume(data_dir, tmp_path):
    """4 straight steps vs 2 steps, stop (checkpoint), resume to 4: identical results."""
    config = tiny_nf_config(data_dir)
    config.ema = "nfnet"
    config.model_kwargs.stochastic_depth = 0.2  # per-step randomness must resume exactly
    straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")

    summary, straight = run(config, straight_dir)
    for key in outputs.SUMMARY_KEYS:
        assert key in summary
    assert summary["steps"] == 4 and summary["test_count"] == N_TEST
    assert summary["wall_time_s"] > 0 and summary["images_per_sec"] > 0
    assert "test_accuracy_ema" in summary
    with open(os.path.join(straight_dir, "summary.json")) as f:
        assert json.load(f)["steps"] == 4
    assert os.path.getsize(os.path.join(straight_dir, outputs.CURVES_FILE)) > 1000
    events = [n for _, _, fs in os.walk(straight_dir) for n in fs if "tfevents" in n]
    assert events
    records = outputs.read_metrics(straight_dir)
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4]
    assert all(np.isfinite(r["train_loss"]) for r in records if "train_loss" in r)

    first, _ = run(config, resumed_dir, stop_at_step=2)
    assert first == {"interrupted": True, "steps": 2}
    assert not os.path.exists(os.path.join(resumed_dir, "summary.json"))
    summary2, resumed = run(config, resumed_dir)

    assert_trees_equal(straight.params, resumed.params)
    assert_trees_equal(straight.opt_state, resumed.opt_state)
    assert_trees_equal(straight.ema_params, resumed.ema_params)
    assert int(resumed.step) == 4
    keys = ("train_loss", "train_accuracy", "learning_rate", "test_loss", "test_accuracy")
    strip = lambda rs: [{k: r[k] for k in ("step", *keys) if k in r} for r in rs]
    assert strip(outputs.read_metrics(resumed_dir)) == strip(records)
    for key in ("test_loss", "test_accuracy", "test_accuracy_ema", "steps"):
        assert summary2[key] == summary[key]


def test_missing_data_names_the_fix(tmp_path):
    config = tiny_nf_config(str(tmp_path / "empty"))
    with pytest.raises(DatasetNotFoundError, match="--config.data_dir"):
        load_data(config)


def test_validation_split_is_held_out_and_reported(data_dir, tmp_path):
    """16 of the 64 training examples held out: 3 steps of 16, both splits evaluated."""
    config = tiny_nf_config(data_dir)
    config.validation_examples = 16
    summary, _ = run(config, str(tmp_path / "val"))
    assert summary["steps"] == 3  # 48 training examples left, batch 16
    assert summary["validation_count"] == 16 and summary["test_count"] == N_TEST
    for split, n in (("validation", 16), ("test", N_TEST)):
        correct = summary[f"{split}_accuracy"] * n
        assert abs(correct - round(correct)) < 1e-4 and np.isfinite(summary[f"{split}_loss"])
    final = [r for r in outputs.read_metrics(str(tmp_path / "val")) if "validation_loss" in r]
    assert final and final[-1]["validation_accuracy"] == summary["validation_accuracy"]
    assert "validation_count" not in final[-1]


def test_validation_split_larger_than_the_data_is_a_config_error(data_dir):
    from nfnets.training.plan import ConfigError

    config = tiny_nf_config(data_dir)
    config.validation_examples = 64
    with pytest.raises(ConfigError, match="validation_examples=64"):
        load_data(config)
