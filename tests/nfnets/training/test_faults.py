"""Faults a user can cause, without training: each gets one clear error or a safe outcome.

Covers: TensorBoard events flushed with each metrics line, torn / corrupt
metrics.jsonl, strict-JSON summary, corrupt or missing IDX files, config checks
before any data or output (negative learning rate, unknown optimizer, unwritable
workdir, a norm that does not fit the model), norm settings from the command
line, the loss-explosion flag and the scaled batch-renorm schedule.
"""

from __future__ import annotations

import glob
import gzip
import json
import math
import os
import struct
import zlib

import numpy as np
import pytest

from configs import fashion_mnist_batch_renorm, fashion_mnist_gn
from nfnets.registry import create_model
from nfnets.training import health, outputs
from nfnets.training.datasets import (
    DataError,
    DatasetNotFoundError,
    load_dataset,
    read_idx,
    write_idx,
)
from nfnets.training.loop import run
from nfnets.training.plan import (
    ConfigError,
    apply_norm_overrides,
    make_plan,
    split_norm_overrides,
)
from nfnets.training.preflight import check_config, prepare_workdir
from tests.nfnets.training.tiny_config import (
    tiny_bn_config,
    tiny_nf_config,
    write_fake_fashion_mnist,
)


def _scalars_on_disk(workdir) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in the event file, read with the TFRecord
    framing (u64 length, u32 crc, payload, u32 crc) and tensorboardX's Event proto."""
    from tensorboardX.proto import event_pb2

    (path,) = glob.glob(str(workdir / "tensorboard" / "*tfevents*"))
    data, found, i = open(path, "rb").read(), [], 0
    while i + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[i : i + 8])
        event = event_pb2.Event.FromString(data[i + 12 : i + 12 + length])
        found += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
        i += 12 + length + 4
    return found


def test_tensorboard_events_are_on_disk_after_each_write(tmp_path):
    writer = outputs.MetricsWriter(str(tmp_path))
    writer.write(1, {"train_loss": 0.5})
    writer.write(2, {"train_loss": 0.25, "learning_rate": 0.125})
    # Not closed: a kill -9 now must still find every scalar in the event file.
    found = _scalars_on_disk(tmp_path)
    assert found == [(1, "train_loss", 0.5), (2, "train_loss", 0.25), (2, "learning_rate", 0.125)]
    writer.close()


def test_no_number_is_null_in_jsonl_and_left_out_of_tensorboard(tmp_path):
    writer = outputs.MetricsWriter(str(tmp_path))
    writer.write(3, {"train_loss": math.nan, "train_accuracy": None, "lr_marker_tag": 0.5})
    assert _scalars_on_disk(tmp_path) == [(3, "lr_marker_tag", 0.5)]
    writer.close()
    line = (tmp_path / outputs.METRICS_FILE).read_text()
    assert json.loads(line) == {
        "step": 3,
        "train_loss": None,
        "train_accuracy": None,
        "lr_marker_tag": 0.5,
    }


def test_torn_last_metrics_line_is_dropped_with_a_message(tmp_path):
    path = tmp_path / outputs.METRICS_FILE
    good = '{"step": 1, "train_loss": 2.0}\n{"step": 2, "train_loss": 1.5}\n'
    path.write_text(good + '{"step": 3, "tr')
    assert [r["step"] for r in outputs.read_metrics(str(tmp_path))] == [1, 2]
    message = outputs.truncate_metrics(str(tmp_path), 2)
    assert message and "torn last line" in message and str(path) in message
    assert path.read_text().splitlines() == [
        '{"step": 1, "train_loss": 2.0}',
        '{"step": 2, "train_loss": 1.5}',
    ]


def test_corrupt_metrics_line_in_the_middle_names_the_file_and_fix(tmp_path):
    path = tmp_path / outputs.METRICS_FILE
    path.write_text('{"step": 1}\n{"step": 2, oops\n{"step": 3}\n')
    with pytest.raises(outputs.MetricsFileError, match="line 2 is not JSON.*delete that line"):
        outputs.truncate_metrics(str(tmp_path), 3)
    with pytest.raises(outputs.MetricsFileError, match=str(path)):
        outputs.read_metrics(str(tmp_path))


def test_summary_is_strict_json_with_null(tmp_path):
    summary = {k: 1.0 for k in outputs.SUMMARY_KEYS}
    summary.update(test_loss=math.nan, test_accuracy=math.inf, diverged=True)
    path = outputs.write_summary(str(tmp_path), summary)

    def reject(name):
        raise ValueError(f"not strict JSON: {name}")

    loaded = json.loads(open(path).read(), parse_constant=reject)
    assert loaded["test_loss"] is None and loaded["test_accuracy"] is None
    assert loaded["diverged"] is True


def test_loss_explosion_without_nan_is_flagged():
    ln10 = math.log(10)
    healthy = [{"step": 1, "train_loss": 2.4}, {"step": 2, "train_loss": 0.3}]
    assert health.loss_health(healthy, 10) == {"max_train_loss": 2.4, "loss_exploded": False}
    exploded = [*healthy, {"step": 3, "train_loss": 1e16}, {"step": 4, "train_loss": None}]
    flags = health.loss_health(exploded, 10)
    assert flags == {"max_train_loss": 1e16, "loss_exploded": True}
    # The threshold is a hundred times the uniform-guess loss ln(K).
    assert not health.loss_health([{"step": 1, "train_loss": 99 * ln10}], 10)["loss_exploded"]
    assert health.loss_health([{"step": 1, "train_loss": 101 * ln10}], 10)["loss_exploded"]


def _corrupt_gzip(path):
    raw = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    middle = len(raw) // 2
    raw[middle : middle + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(raw))


def test_corrupt_gzip_idx_names_the_file_and_how_to_restore(tmp_path):
    # 3-bit pixels: Huffman-coded by gzip, so random bytes mid-stream break the
    # decoder itself (a bare zlib.error), not just the checksum.
    images = np.random.default_rng(1).integers(0, 8, (64, 28, 28)).astype(np.uint8) * 30
    path = write_idx(tmp_path / "x-idx3-ubyte.gz", images)
    _corrupt_gzip(path)
    with pytest.raises(zlib.error):
        gzip.decompress(path.read_bytes())
    with pytest.raises(DataError, match=f"{path}.*damaged.*restore it"):
        read_idx(path)


def test_corrupt_or_missing_fashion_mnist_file_is_named(tmp_path):
    write_fake_fashion_mnist(tmp_path, 32, 16)
    images = tmp_path / "train-images-idx3-ubyte.gz"
    _corrupt_gzip(images)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*restore it"):
        load_dataset("fashion_mnist", split="train", data_dir=tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DatasetNotFoundError, match="missing: t10k-labels-idx1-ubyte.gz"):
        load_dataset("fashion_mnist", split="test", data_dir=tmp_path)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("learning_rate", -0.1, "learning_rate"),
        ("optimizer", "adamm", "unknown optimizer 'adamm'"),
        ("max_consecutive_skipped_steps", -1, "max_consecutive_skipped_steps"),
    ],
)
def test_bad_values_fail_before_data_or_workdir(tmp_path, key, value, match):
    config = tiny_nf_config(str(tmp_path / "no_data_here"))
    config[key] = value
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match=match):
        run(config, str(workdir))
    assert not workdir.exists()  # nothing was created, no data was looked for


def test_norm_that_does_not_fit_the_model_fails_before_data(tmp_path):
    config = tiny_bn_config(str(tmp_path / "no_data_here"), norm="group_norm")  # 32 groups, 8 ch
    with pytest.raises(ConfigError, match="config.model='resnet18_v2_small'.*cannot be built"):
        check_config(config, 1)


def test_unwritable_workdir_is_one_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    config = tiny_nf_config(str(tmp_path))
    with pytest.raises(ConfigError, match="--workdir .*a_file/run: cannot create it"):
        prepare_workdir(config, str(blocker / "run"))


def test_restart_clears_the_workdir_only_in_the_writing_process(tmp_path):
    config = tiny_nf_config(str(tmp_path))
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "4").mkdir(parents=True)
    (workdir / "summary.json").write_text("{}")
    assert prepare_workdir(config, str(workdir), restart=True, writer=False) is None
    assert (workdir / "summary.json").exists() and (workdir / "checkpoints" / "4").exists()
    assert prepare_workdir(config, str(workdir), restart=True, writer=True) is None
    assert not (workdir / "summary.json").exists() and not (workdir / "checkpoints").exists()


def test_norm_settings_from_the_command_line():
    argv = [
        "train.py",
        "--config.model_kwargs.norm_kwargs.num_groups=4",
        "--config.batch_size=8",
        "--config.model_kwargs.norm_kwargs.eps=1e-3",
    ]
    rest, values = split_norm_overrides(argv)
    assert rest == ["train.py", "--config.batch_size=8"]
    assert values == {"num_groups": 4, "eps": 1e-3}
    config = fashion_mnist_gn.get_config()
    config.lock()
    apply_norm_overrides(config, values)
    assert config.model_kwargs.norm_kwargs.to_dict() == {"num_groups": 4, "eps": 1e-3}
    kwargs = {**config.model_kwargs.to_dict()}
    model = create_model(config.model, num_classes=10, **kwargs)
    assert dict(model.norm_kwargs) == {"num_groups": 4, "eps": 1e-3}
    with pytest.raises(ValueError, match="num_grups"):
        create_model(config.model, num_classes=10, **{**kwargs, "norm_kwargs": {"num_grups": 4}})


def test_batch_renorm_config_ramps_the_paper_schedule_over_the_run():
    config = fashion_mnist_batch_renorm.get_config()
    config.sync_batch_stats = "none"
    config.num_train_steps = 1600
    plan = make_plan(
        config, num_train_examples=60000, num_devices=1, local_devices=1, process_count=1
    )
    kwargs = plan.model_kwargs["norm_kwargs"]
    total = plan.total_steps

    def paper(step, end, final, start_value):
        # Ioffe (2017): constant until 5k steps, linear to `final` at `end`; steps scaled
        # so that the paper's 40k-step ramp ends halfway through this run.
        t = step * 80_000 / total
        return start_value + (final - start_value) * np.clip((t - 5000) / (end - 5000), 0, 1)

    for step in (0, 50, 100, 101, 300, 500, 700, 800, 1200, 1600):
        r = float(kwargs["r_max"](np.int32(step)))
        d = float(kwargs["d_max"](np.int32(step)))
        np.testing.assert_allclose(r, paper(step, 40_000, 3.0, 1.0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(d, paper(step, 25_000, 5.0, 0.0), rtol=1e-5, atol=1e-6)
    assert float(kwargs["r_max"](np.int32(100))) == 1.0  # plain batch norm at first
    assert float(kwargs["r_max"](np.int32(800))) == pytest.approx(3.0)


def test_a_checkpoint_saved_before_validation_examples_existed_still_resumes():
    """An older checkpoint's config lacks ``validation_examples``: absent means 0 (none)."""
    from configs import default
    from nfnets.training.preflight import config_differences

    config = default.get_config()
    saved = json.loads(config.to_json_best_effort())
    del saved["validation_examples"]
    assert config_differences(saved, config, extend=False) == []
    with config.unlocked():
        config.validation_examples = 5000
    assert config_differences(saved, config, extend=False) == [("validation_examples", 0, 5000)]
