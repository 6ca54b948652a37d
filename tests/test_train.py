"""``python train.py`` as a user runs it: outputs, SIGTERM checkpoint + resume, errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from nfnets.training.outputs import SUMMARY_KEYS, read_metrics
from tests.conftest import subprocess_env
from tests.nfnets.training.tiny_config import fake_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config.model_kwargs.widths=(8, 16)",
    "--config.model_kwargs.depths=(1, 1)",
    "--config.model_kwargs.stem_width=8",
    "--config.batch_size=16",
    "--config.eval_batch_size=24",
    "--config.warmup_epochs=0",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=0",
]


def _env(devices: int = 2) -> dict:
    return subprocess_env(devices)


def _cmd(workdir, data_dir, *extra):
    return [
        sys.executable,
        "train.py",
        "--config",
        "configs/default.py",
        "--workdir",
        str(workdir),
        f"--config.data_dir={data_dir}",
        *TINY,
        *extra,
    ]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return fake_data(tmp_path_factory.mktemp("fmnist"))


@pytest.mark.slow
def test_sigterm_saves_then_rerun_resumes_to_summary(data_dir, tmp_path):
    workdir = tmp_path / "run"
    cmd = _cmd(workdir, data_dir, "--config.num_epochs=25")  # 100 steps
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if read_metrics(str(workdir)):  # training has started
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "saved checkpoint at step" in out
    stopped = max(r["step"] for r in read_metrics(str(workdir)))
    assert 1 <= stopped < 100
    assert not (workdir / "summary.json").exists()

    done = subprocess.run(
        cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming from step" in done.stdout + done.stderr
    summary = json.loads((workdir / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= set(summary)
    assert summary["steps"] == 100 and summary["test_count"] == 40
    steps = [r["step"] for r in read_metrics(str(workdir)) if "train_loss" in r]
    assert steps == list(range(1, 101))  # no step lost or logged twice across the restart
    assert (workdir / "training_curves.png").exists()


def test_unknown_key_names_the_fix(data_dir, tmp_path):
    out = subprocess.run(
        _cmd(tmp_path, data_dir, "--config.batch_sise=8"),
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode != 0
    assert "unknown config key(s) ['batch_sise']" in out.stderr
    assert "batch_size" in out.stderr  # the valid keys are listed


def test_indivisible_batch_and_missing_data_name_the_fix(data_dir, tmp_path):
    out = subprocess.run(
        _cmd(tmp_path / "a", data_dir, "--config.batch_size=15"),
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode != 0
    assert "config.batch_size=15" in out.stderr and "2 devices" in out.stderr
    assert "--config.batch_size=14 or 16" in out.stderr
    out = subprocess.run(
        _cmd(tmp_path / "b", tmp_path / "nowhere"),
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode != 0
    assert "--config.data_dir" in out.stderr and "Traceback" not in out.stderr


def _one_line_error(out) -> str:
    """The stderr of a failed run: exactly one line, no traceback."""
    assert out.returncode != 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip() and "WARNING" not in ln]
    assert len(lines) == 1, out.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--config.learning_rate=-0.1"], "learning_rate"),
        (["--config.optimizer=adamm"], "unknown optimizer 'adamm'"),
        (["--config.batch_size=128"], "config.batch_size=128"),  # found after reading data
        (["--config.max_consecutive_skipped_steps=-2"], "max_consecutive_skipped_steps"),
        (["--config.model_kwargs.norm_kwargs.num_groups=3"], "cannot be built"),
    ],
)
def test_user_errors_are_one_line(data_dir, tmp_path, extra, expected):
    workdir = tmp_path / "run"
    cmd = _cmd(workdir, data_dir, *extra)
    if "norm_kwargs" in extra[0]:  # group norm with 3 groups on 8 / 16 channels
        cmd[cmd.index("configs/default.py")] = "configs/fashion_mnist_gn.py"
    out = subprocess.run(
        cmd,
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    line = _one_line_error(out)
    assert line.startswith("train.py: error: ") and expected in line
    if "batch_size" not in expected:
        assert not workdir.exists()  # checked before the workdir was created


def test_missing_config_file_and_unwritable_workdir_are_one_line(data_dir, tmp_path):
    out = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/nope.py", "--workdir", str(tmp_path)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert "--config configs/nope.py: no such file" in _one_line_error(out)
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = subprocess.run(
        _cmd(blocker / "run", data_dir),
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert "cannot create it" in _one_line_error(out)


def test_corrupt_data_is_one_line(tmp_path):
    data = tmp_path / "data"
    fake_data(data)
    path = data / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 32] = bytes(range(32))
    path.write_bytes(bytes(raw))
    out = subprocess.run(
        _cmd(tmp_path / "run", data),
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    line = _one_line_error(out)
    assert str(path) in line and "restore it" in line


@pytest.mark.slow
def test_diverged_run_exits_non_zero_with_the_advice(data_dir, tmp_path):
    # AdamW at 1e8: the parameters overflow float32 within a few steps
    extra = ["--config.learning_rate=1e8", "--config.max_consecutive_skipped_steps=2"]
    extra.append("--config.progress_bar=False")  # the bar writes to stderr too
    out = subprocess.run(
        _cmd(tmp_path / "run", data_dir, "--config.num_epochs=4", *extra),
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    line = _one_line_error(out)
    assert re.fullmatch(
        r"train\.py: error: diverged at step \d+ \(.*\); lower learning_rate or enable agc_clip",
        line,
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["diverged"] is True
