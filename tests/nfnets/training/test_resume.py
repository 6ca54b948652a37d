"""Reruns of a workdir and diverged runs, on tiny fake data (8 virtual CPU devices).

Covers: a finished workdir is left alone (and ``extend`` / ``restart``), a resume
with a different model fails before writing anything (config.json kept) and
``configs/from_workdir.py`` resumes it, a torn metrics line is dropped on resume,
and a diverged run stops, keeps its last good checkpoint and reports it.
"""

from __future__ import annotations

import json
import os

import pytest

from configs import from_workdir
from nfnets.training import outputs
from nfnets.training.checkpoints import Checkpointer
from nfnets.training.health import TrainingDiverged
from nfnets.training.loop import run, train
from nfnets.training.plan import ConfigError
from tests.nfnets.training.tiny_config import tiny_bn_config, tiny_nf_config


def _snapshot(workdir: str) -> dict:
    """Path -> (size, mtime_ns) of every file under ``workdir``."""
    snap = {}
    for root, _, files in os.walk(workdir):
        for name in files:
            path = os.path.join(root, name)
            st = os.stat(path)
            snap[path] = (st.st_size, st.st_mtime_ns)
    return snap


def _train_steps(workdir: str) -> list[int]:
    return [r["step"] for r in outputs.read_metrics(workdir) if "train_loss" in r]


@pytest.mark.slow
def test_finished_run_is_left_alone_then_extended_then_restarted(data_dir, tmp_path, capsys):
    config = tiny_nf_config(data_dir)  # 4 steps
    workdir = str(tmp_path / "run")
    summary, _ = run(config, workdir)
    before = _snapshot(workdir)
    again, _ = run(config, workdir)
    assert "holds a finished run" in capsys.readouterr().out
    assert _snapshot(workdir) == before  # nothing rewritten, nothing appended
    assert again == json.loads(open(os.path.join(workdir, outputs.SUMMARY_FILE)).read())
    assert again["images_per_sec"] == summary["images_per_sec"] > 0

    with pytest.raises(ConfigError, match="--extend: .* already holds 4 steps"):
        run(config, workdir, extend=True)
    longer = tiny_nf_config(data_dir)
    longer.num_epochs = 2.0  # 8 steps
    with pytest.raises(ConfigError, match="num_epochs: saved 1.0, now 2.0"):
        run(longer, workdir)  # a longer run is only taken with extend
    extended, _ = run(longer, workdir, extend=True)
    assert extended["steps"] == 8 and _train_steps(workdir) == list(range(1, 9))

    restarted, _ = run(config, workdir, restart=True)
    assert restarted["steps"] == 4 and _train_steps(workdir) == [1, 2, 3, 4]
    assert restarted["test_loss"] == summary["test_loss"]  # the same run from scratch


@pytest.mark.slow
def test_changed_config_fails_before_writing_and_old_config_resumes(data_dir, tmp_path, capsys):
    config = tiny_nf_config(data_dir)
    workdir = str(tmp_path / "run")
    run(config, workdir, stop_at_step=2)
    metrics = os.path.join(workdir, outputs.METRICS_FILE)
    with open(metrics, "a") as f:
        f.write('{"step": 3, "train_lo')  # a crash mid-write
    saved_config = open(os.path.join(workdir, "config.json")).read()
    before = _snapshot(workdir)

    changed = tiny_nf_config(data_dir)
    changed.model_kwargs.stem_width = 16
    changed.learning_rate = 0.02
    with pytest.raises(ConfigError) as info:
        run(changed, workdir)
    message = str(info.value)
    assert "\n" not in message
    assert "model_kwargs.stem_width: saved 8, now 16" in message
    assert "learning_rate: saved 0.01, now 0.02" in message
    assert "use a new --workdir, or pass the old config" in message
    assert f"configs/from_workdir.py:{workdir}" in message
    assert _snapshot(workdir) == before
    assert open(os.path.join(workdir, "config.json")).read() == saved_config

    old = from_workdir.get_config(workdir)
    old.progress_bar = False
    summary, _ = run(old, workdir)
    out = capsys.readouterr().out
    assert "dropped a torn last line" in out and "resuming from step 2" in out
    assert summary["steps"] == 4 and _train_steps(workdir) == [1, 2, 3, 4]


@pytest.mark.slow
def test_diverged_run_stops_keeps_last_good_checkpoint_and_says_so(data_dir, tmp_path, capsys):
    config = tiny_nf_config(data_dir)
    config.learning_rate = 1e8  # AdamW: the parameters overflow float32 within a few steps
    config.num_epochs = 4.0  # 16 steps
    config.max_consecutive_skipped_steps = 3
    config.checkpoint_every_steps = 1
    config.keep_checkpoints = 20
    workdir = str(tmp_path / "run")
    with pytest.raises(TrainingDiverged) as info:
        train(config, workdir)
    message = str(info.value)
    assert "lower learning_rate or enable agc_clip" in message
    step = info.value.summary["diverged_at_step"]
    assert message.startswith(f"diverged at step {step} (3 non-finite steps in a row")
    assert step < 16

    def reject(name):
        raise ValueError(f"not strict JSON: {name}")

    summary = json.loads(
        open(os.path.join(workdir, outputs.SUMMARY_FILE)).read(), parse_constant=reject
    )
    assert summary["diverged"] is True and summary["diverged_at_step"] == step
    assert summary["test_loss"] is None and summary["test_accuracy"] is None

    records = [r for r in outputs.read_metrics(workdir) if "train_loss" in r]
    skipped_only = [r for r in records if r["skipped_steps"] == 1]
    assert len(skipped_only) >= 3
    assert all(r["train_loss"] is None and r["train_accuracy"] is None for r in skipped_only)
    # No log line says 0.0 for a window without a finite step.
    assert all(r["train_loss"] != 0.0 for r in records)
    assert max(r["step"] for r in records) == step
    out = capsys.readouterr().out  # progress_bar=False: the messages go to the log
    assert "skipped 1 non-finite step(s)" in out

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.latest_step() == step - 1  # nothing saved at or after the divergence
    ckpt.close()


@pytest.mark.slow
def test_sgd_bn_loss_explosion_without_nan_is_flagged(data_dir, tmp_path):
    config = tiny_bn_config(data_dir)
    config.optimizer, config.learning_rate, config.lr_base_batch_size = "sgd", 1e3, 0
    config.weight_decay = 0.0
    config.num_epochs = 1.0  # 4 steps (a 5th overflows to a non-finite loss and is skipped)
    workdir = str(tmp_path / "run")
    summary, _ = run(config, workdir)
    losses = [r["train_loss"] for r in outputs.read_metrics(workdir) if "train_loss" in r]
    assert len(losses) == 4 and all(v is not None for v in losses)  # every loss finite
    assert summary["skipped_steps"] == 0  # the non-finite guard never fired
    assert max(losses) > 1e11
    assert summary["loss_exploded"] is True and summary["max_train_loss"] == max(losses)
    saved = json.loads(open(os.path.join(workdir, outputs.SUMMARY_FILE)).read())
    assert saved["loss_exploded"] is True
