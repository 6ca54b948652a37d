"""Every experiment runs end to end with ``--quick`` (so the scripts cannot rot).

Each runs all its cells for a few steps on tiny fake Fashion-MNIST IDX files and
must write one JSON entry per cell (no cell raising), the markdown table and the
PNG. Also checked: resume (a finished cell is not rerun), ``--only``, a raising
cell recorded as diverged without stopping the grid, SyncBN matching one device,
and the intermediate PreciseBN probe reproducing the in-training evaluation.
"""

from __future__ import annotations

import importlib
import json
import math

import pytest

from experiments import batch_size, grid, protocol, sync
from tests.nfnets.training.tiny_config import fake_data

NAMES = ("recipe", "batch_size", "default_config", "running_stats", "sync", "agc", "cost")
FIELDS = ("key", "overrides", "seed", "status", "diverged", "steps", "images_per_sec")
TRAIN_FIELDS = ("test_accuracy", "test_loss", "wall_time_s", "workdir", "cpu_time_s")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return fake_data(tmp_path_factory.mktemp("fashion_mnist"))


CACHE: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    """One JAX compilation cache for the module: the cells share many programs."""
    CACHE[:] = [str(tmp_path_factory.mktemp("jax_cache"))]


def quick_args(tmp_path, data_dir, *extra):
    return [
        "--quick",
        "--out",
        str(tmp_path / "out"),
        "--workdir-root",
        str(tmp_path / "runs"),
        "--data-dir",
        data_dir,
        "--cache-dir",
        CACHE[0],
        *extra,
    ]


def load(tmp_path, name):
    return json.loads((tmp_path / "out" / f"{name}.json").read_text())


@pytest.mark.parametrize("name", NAMES)
def test_quick_run_writes_every_cell(name, tmp_path, data_dir):
    exp = importlib.import_module(f"experiments.{name}").EXPERIMENT
    args = quick_args(tmp_path, data_dir)
    entries = grid.main(exp, args)
    keys = [c.key for c in grid.experiment_cells(exp, grid.parse_args(name, args)[0])]
    assert [e["key"] for e in entries] == keys
    results = load(tmp_path, name)
    assert results["quick"] is True
    assert [e["key"] for e in results["cells"]] == keys
    assert set(results["environment"]["versions"]) >= {"jax", "flax", "optax"}
    assert results["environment"]["git"]["commit"]
    for e in results["cells"]:
        assert e["status"] != "error", (e["key"], e.get("error"))
        assert all(f in e for f in FIELDS), e["key"]
        if name != "cost":
            assert all(f in e for f in TRAIN_FIELDS), e["key"]
            assert e["steps"] == e["overrides"]["num_train_steps"]
    md = (tmp_path / "out" / f"{name}.md").read_text()
    assert md.count("\n|") >= len(keys) // 2
    png = (tmp_path / "out" / f"{name}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    if name == "sync":
        check_sync(results["cells"])
    if name == "running_stats":
        for e in results["cells"]:
            # The probe restores the step-s checkpoint and re-evaluates it: it must
            # reproduce the evaluation made during training at s exactly.
            assert e["probe_max_abs_diff"] == 0.0, e["key"]
            assert [p["step"] for p in e["curve"]] == [2, 4]
            # Train-mode batch statistics at every step, and the doctor's verdict.
            assert all(0.0 <= p["batch_stats"] <= 1.0 for p in e["curve"]), e["key"]
            assert e["doctor_causes"] and e["doctor_verdict"], e["key"]
    if name == "batch_size":
        by = {e["key"]: e for e in results["cells"]}
        for seed in protocol.QUICK_SEEDS:
            # The full batch (16 in --quick): running averages, PreciseBN and
            # train-mode evaluation at 1, 2 and its own 16, all on the test split.
            full = by[f"bn_g16_s{seed}"]
            for key in ("running", "precise_bn", "train_mode_1", "train_mode_2"):
                assert 0.0 <= full[f"eval_{key}_accuracy"] <= 1.0, (key, full["key"])
            # The doctor's evaluation with the running averages is the trainer's own.
            assert full["eval_running_accuracy"] == pytest.approx(full["test_accuracy"], abs=1e-6)
            assert 0.0 <= full["eval_train_mode_16_accuracy"] <= 1.0
            assert "eval_train_mode_1_accuracy" not in by[f"bn_g2_s{seed}"]
            assert 0.0 <= by[f"gn_s{seed}"]["validation_accuracy"] <= 1.0
        claims = batch_size.claims(results["cells"])
        assert {c["verdict"] for c in claims} <= set(protocol.VERDICTS)
        arms = {protocol.arm_of(k) for k in by}
        for c in claims:  # bn_g4 and bn_g32 are not in --quick: those claims wait
            ran = c["arm"] in arms and c["base"] in arms
            assert c["diff"]["seeds"] == (list(protocol.QUICK_SEEDS) if ran else []), c
            assert ran or c["verdict"] == "pending", c


def check_sync(cells):
    by = {e["key"]: e for e in cells}
    # SyncBN over 8 devices x 2 examples is batch norm over the global batch of 16:
    # every logged training loss equals the single device's to float rounding.
    diff = sync.max_abs_diff(by["all"], by["single"], "train_loss")
    assert diff is not None and diff < 1e-5
    assert len(by["all"]["curve"]) >= 4
    # Per-device statistics (BN over 2) are a different function: visibly different.
    assert sync.max_abs_diff(by["none"], by["single"], "train_loss") > 100 * diff


def test_resume_skips_finished_cells_and_only_reruns_one(tmp_path, data_dir):
    args = quick_args(tmp_path, data_dir)
    grid.main(sync.EXPERIMENT, args)
    first = {e["key"]: e for e in load(tmp_path, "sync")["cells"]}
    grid.main(sync.EXPERIMENT, args)
    again = {e["key"]: e for e in load(tmp_path, "sync")["cells"]}
    assert again == first  # nothing rerun
    grid.main(sync.EXPERIMENT, [*args, "--only", "groups2"])
    after = {e["key"]: e for e in load(tmp_path, "sync")["cells"]}
    assert after["groups2"]["cell_time_s"] != first["groups2"]["cell_time_s"]
    assert {k: v for k, v in after.items() if k != "groups2"} == {
        k: v for k, v in first.items() if k != "groups2"
    }
    with pytest.raises(SystemExit, match="no such cell"):
        grid.main(sync.EXPERIMENT, [*args, "--only", "nonexistent"])


def test_raising_cell_is_recorded_as_diverged(tmp_path, data_dir):
    base = {**grid.QUICK_RESNET, **grid.QUIET, "batch_size": 16, "eval_batch_size": 16}
    base.update(num_train_steps=1, warmup_epochs=0.0, precise_bn_batches=0)
    bad = grid.Cell(
        "bad",
        "fashion_mnist_norms",
        {**base, "model_kwargs.norm_kwargs": {"ghost_batch_size": 3}},
        devices=0,
    )  # 3 does not divide the batch: train raises
    good = grid.Cell("good", "fashion_mnist_norms", base, devices=0)
    exp = grid.Experiment(
        name="toy",
        description="toy",
        cells=lambda quick: [bad, good],
        table=lambda entries: grid.markdown_table(["k"], [[e["key"]] for e in entries]),
        plot=lambda entries, path: grid.save_figure(grid.new_figure()[0], path),
    )
    entries = grid.main(exp, quick_args(tmp_path, data_dir))
    by = {e["key"]: e for e in entries}
    assert by["bad"]["status"] == "error" and by["bad"]["diverged"] is True
    assert "ghost_batch_size" in by["bad"]["error"]
    assert by["good"]["status"] != "error" and by["good"]["steps"] == 1


@pytest.mark.parametrize(
    ("summary", "error", "status"),
    [
        ({"test_loss": 0.5, "test_accuracy": 0.8}, None, "ok"),
        ({"test_loss": math.nan, "test_accuracy": 0.8}, None, "diverged"),
        ({"test_loss": math.inf, "test_accuracy": 0.8}, None, "diverged"),
        ({"test_loss": None, "test_accuracy": None}, None, "diverged"),  # the trainer stopped
        ({"test_loss": 2.3, "test_accuracy": 0.1}, None, "at_chance"),  # 1 / 10 classes
        ({"test_loss": 2.0, "test_accuracy": 0.15}, None, "at_chance"),  # 1.5 / 10: the margin
        ({"test_loss": 2.0, "test_accuracy": 0.16}, None, "ok"),
        ({}, "ValueError: boom", "error"),
    ],
)
def test_cell_status(summary, error, status):
    assert grid.cell_status(summary, error) == status


def test_table_marks_failed_cells():
    assert grid.pct({"test_loss": 0.4, "test_accuracy": 0.81}) == "81.0"
    assert grid.pct({"test_loss": 2.3, "test_accuracy": 0.1}) == "10.0 (at chance)"
    assert grid.pct({"test_loss": None, "test_accuracy": 0.1}) == "10.0 (diverged)"
    assert grid.pct({"error": "ValueError: x"}) == "n/a (error)"


def test_cell_with_changed_overrides_or_an_error_is_rerun(tmp_path):
    cells = [grid.Cell("a", "fashion_mnist_norms", {"batch_size": 16, "model_kwargs.widths": (4,)})]
    same = {"key": "a", "overrides": {"batch_size": 16, "model_kwargs.widths": [4]}}
    assert grid.stale_keys(cells, [same]) == set()
    changed = {"key": "a", "overrides": {"batch_size": 32, "model_kwargs.widths": [4]}}
    assert grid.stale_keys(cells, [changed]) == {"a"}
    exp = grid.Experiment(
        name="toy", description="toy", cells=lambda quick: cells, table=None, plot=None
    )
    out = tmp_path / "out"
    out.mkdir()
    ctx = grid.parse_args("toy", ["--out", str(out), "--workdir-root", str(tmp_path / "w")])[0]
    raised = {**same, "status": "error", "error": "RuntimeError: can't start new thread"}
    for entry, pending in ((same, []), (changed, ["a"]), (raised, ["a"])):
        grid.save_results(out / "toy.json", {"cells": [entry]})
        assert [c.key for c in grid.pending_cells(exp, cells, ctx)] == pending


def test_overrides_reject_unknown_keys():
    cell = grid.Cell("x", "fashion_mnist_norms", {"batch_sise": 3})
    with pytest.raises(KeyError, match="batch_sise"):
        grid.build_config(cell)
    cell = grid.Cell("x", "fashion_mnist_norms", {"model_kwargs.widths": [4, 8]})
    assert grid.build_config(cell).model_kwargs.widths == (4, 8)
