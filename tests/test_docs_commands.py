"""Every shell command in README.md and docs/*.md runs (so the documentation cannot rot).

Commands are read from the fenced blocks without a language or marked bash/sh
(continuation lines joined). ``python train.py ...`` runs as written on tiny fake
data with a tiny step count and its ``runs/...`` workdir moved into a temporary
folder (in document order, so a command that extends an earlier run finds it);
``python -m nfnets.signal_propagation`` runs at a tiny size; ``python -m
nfnets.pretrained`` (which needs downloaded weights) has its arguments parsed;
``make TARGET`` must name a Makefile target. Only the multi-host template (whose
``--config ...`` is a placeholder) is left out, by name.
"""

from __future__ import annotations

import functools
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import subprocess_env
from tests.nfnets.training.tiny_config import write_fake_fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/docs/*.md"))]
PLACEHOLDER = "--config ..."  # the multi-host template, tested by tests/test_multihost.py
# Needs the user's own TFDS data and converted weights (the fine-tuning command);
# its config is built by tests/test_configs.py and init_from by test_init.py.
EXTERNAL = "--config.data_dir=DIR"


def _commands() -> list[str]:
    """Shell commands of the docs in order, duplicates dropped."""
    seen = []
    for name in DOCS:
        text = open(os.path.join(ROOT, name)).read()
        for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S):
            if lang not in ("", "bash", "sh", "shell"):
                continue
            for line in body.replace("\\\n", " ").splitlines():
                line = line.split("  #", 1)[0].strip()
                if re.match(r"^(python|make) ", line) and line not in seen:
                    seen.append(line)
    return seen


COMMANDS = _commands()
TRAIN = [
    c
    for c in COMMANDS
    if c.startswith("python train.py") and PLACEHOLDER not in c and EXTERNAL not in c
]


def test_docs_hold_the_commands_we_expect():
    assert len(TRAIN) >= 4
    assert any("norm_kwargs.num_groups" in c for c in TRAIN)
    assert any("--extend" in c for c in TRAIN)
    left_out = [c for c in COMMANDS if PLACEHOLDER in c]
    assert len(left_out) == 1 and "distributed.initialize" in left_out[0]
    external = [c for c in COMMANDS if EXTERNAL in c]
    assert external and all("finetune" in c for c in external)


def test_make_targets_exist():
    targets = set(re.findall(r"^([\w-]+):", open(os.path.join(ROOT, "Makefile")).read(), re.M))
    for command in COMMANDS:
        if command.startswith("make "):
            assert command.split()[1] in targets, command
    for target in re.findall(
        r"`make ([\w-]+)`", "".join(open(os.path.join(ROOT, d)).read() for d in DOCS)
    ):
        assert target in targets, target


def test_pretrained_commands_parse():
    from nfnets.pretrained.__main__ import _parser

    commands = [c for c in COMMANDS if c.startswith("python -m nfnets.pretrained")]
    assert commands
    for command in commands:
        _parser().parse_args(shlex.split(command)[3:])


@pytest.mark.slow
def test_signal_propagation_command_runs(tmp_path):
    (command,) = [c for c in COMMANDS if c.startswith("python -m nfnets.signal_propagation")]
    args = shlex.split(command)[1:]
    values = {"--batch": "2", "--size": "32", "--out": str(tmp_path / "spp.png")}
    args = [values.get(prev, a) for prev, a in zip(["", *args[:-1]], args, strict=True)]
    out = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
        timeout=600, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert os.path.getsize(tmp_path / "spp.png") > 1000


def _env() -> dict:
    return subprocess_env(2)


@functools.cache
def _data_dir(root: str) -> str:
    # 512 training images: one batch of the documented --config.batch_size=256 fits.
    return str(write_fake_fashion_mnist(os.path.join(root, "data"), 512, 40))


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    return tmp_path_factory.mktemp("docs_runs")


def _workdir(args: list[str]) -> str:
    return args[args.index("--workdir") + 1]


def _reads_earlier_run(command: str) -> bool:
    """Continues a run that an earlier documented command makes (``--extend``,
    ``configs/from_workdir.py:WORKDIR``)."""
    return "--extend" in command or "from_workdir.py:" in command


def _producer(command: str) -> str:
    """The documented command that makes the workdir ``command`` continues."""
    workdir = _workdir(shlex.split(command))
    (first, *_) = [
        c for c in TRAIN if not _reads_earlier_run(c) and _workdir(shlex.split(c)) == workdir
    ]
    return first


def _run_documented(command: str, runs_root) -> subprocess.CompletedProcess:
    args = [a.replace("runs/", f"{runs_root}/runs/") for a in shlex.split(command)[1:]]
    steps = 4 if "--extend" in args else 2  # an extension must be longer than the run
    tiny = [
        f"--config.data_dir={_data_dir(str(runs_root))}",
        f"--config.num_train_steps={steps}",
        "--config.eval_batch_size=40",
        "--config.precise_bn_batches=0",
        "--config.checkpoint_every_steps=0",
        "--config.progress_bar=False",
    ]
    return subprocess.run(
        [sys.executable, *args, *tiny], cwd=ROOT, env=_env(), capture_output=True, text=True,
        timeout=600, check=False,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("command", TRAIN)
def test_train_command_runs(command, runs_root):
    if _reads_earlier_run(command):
        # The tests may run in any order, on either xdist worker (each has its own
        # runs_root): make the run this command continues here first if needed.
        done = os.path.join(runs_root, _workdir(shlex.split(command)), "summary.json")
        if not os.path.exists(done):
            first = _run_documented(_producer(command), runs_root)
            assert first.returncode == 0, f"{_producer(command)}\n{first.stderr[-3000:]}"
    out = _run_documented(command, runs_root)
    assert out.returncode == 0, f"{command}\n{out.stderr[-3000:]}"
    assert "done: test_accuracy" in out.stdout, out.stdout


def test_every_continued_run_has_a_documented_producer():
    continued = [c for c in TRAIN if _reads_earlier_run(c)]
    assert continued
    for command in continued:
        # The docs show the run before the command that continues it.
        assert TRAIN.index(_producer(command)) < TRAIN.index(command)
