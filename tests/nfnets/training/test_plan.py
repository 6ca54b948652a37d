"""Config validation and the derived values of a run's plan (after overrides)."""

from __future__ import annotations

import pytest

from nfnets.training.plan import ConfigError, make_plan, unknown_overrides, validate
from tests.nfnets.training.tiny_config import tiny_bn_config, tiny_nf_config


def test_indivisible_batch_names_the_numbers(data_dir):
    config = tiny_nf_config(data_dir)
    config.batch_size = 12
    with pytest.raises(ConfigError, match=r"batch_size=12.*8 devices.*batch_size=8 or 16"):
        validate(config, num_devices=8)


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
    d = make_plan(config, num_train_examples=64, num_devices=8, local_devices=8, process_count=1)
    assert (d.steps_per_epoch, d.total_steps, d.per_device_batch) == (2, 2, 4)
    assert d.axis_index_groups == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert d.model_kwargs["norm_kwargs"] == {
        "axis_name": "batch",
        "axis_index_groups": [[0, 1, 2, 3], [4, 5, 6, 7]],
    }
    config.sync_batch_stats = "none"
    d = make_plan(config, num_train_examples=64, num_devices=8, local_devices=8, process_count=1)
    assert "axis_name" not in d.model_kwargs["norm_kwargs"]
    config.sync_batch_stats = "all"
    config.model_kwargs.norm = "group_norm"  # batch independent: no axis to sync
    config.num_train_steps = 5
    d = make_plan(config, num_train_examples=64, num_devices=8, local_devices=8, process_count=1)
    assert "axis_name" not in d.model_kwargs["norm_kwargs"] and d.total_steps == 5
    assert round(d.optimizer_config.num_epochs * d.steps_per_epoch) == 5
    with pytest.raises(ConfigError, match="sync_group_size=3"):
        config.sync_batch_stats = "groups"
        config.sync_group_size = 3
        validate(config, num_devices=8)
