"""The evidence pages are generated from the JSON, and the committed ones are current.

``experiments.report --check`` on the committed files must find nothing to change:
no number in docs/experiments/*.md, docs/experiments.md or README's results table
is typed by hand. Also: a round trip on synthetic results (generate, edit, check
fails), and the library-code bookkeeping behind ``--stale-code``.
"""

from __future__ import annotations

import shutil

import pytest

from experiments import grid, protocol, report


def test_committed_pages_equal_what_the_json_generates(capsys):
    assert report.main(["--check"]) == 0, capsys.readouterr().out


def synthetic_batch_size(seed_offsets=(0.0, 0.004, -0.003)):
    cells = []
    for seed, d in zip(protocol.SEEDS, seed_offsets, strict=True):
        for arm, acc, info in (
            ("bn_g128", 0.91, {"arm": "bn_g128", "label": "BN", "norm_batch": 128}),
            ("bn_g2", 0.80, {"arm": "bn_g2", "label": "BN", "norm_batch": 2}),
            ("gn", 0.905, {"arm": "gn", "label": "GN", "norm_batch": None}),
        ):
            cells.append(
                {
                    "key": f"{arm}_s{seed}",
                    "seed": seed,
                    "info": info,
                    "status": "ok",
                    "test_loss": 0.3,
                    "test_accuracy": acc + d,
                    "validation_accuracy": acc + d,
                    "cell_time_s": 1.0,
                    "git_commit": None,
                    "library_code": "tree-a",
                }
            )
    return {"experiment": "batch_size", "quick": False, "cells": cells}


@pytest.fixture
def pages(tmp_path, monkeypatch):
    out = tmp_path / "experiments"
    out.mkdir()
    for name in ("docs", "readme"):
        src = report.DOCS if name == "docs" else report.README
        shutil.copy(src, tmp_path / src.name)
    monkeypatch.setattr(report, "DOCS", tmp_path / report.DOCS.name)
    monkeypatch.setattr(report, "README", tmp_path / report.README.name)
    results = synthetic_batch_size()
    results["environment"] = (
        grid.load_results(report.grid.REPO / "docs" / "experiments" / "recipe.json").get(
            "environment"
        )
        or grid.environment()
    )
    grid.save_results(out / "batch_size.json", results)
    return out


def test_generate_then_check_round_trip(pages):
    out = pages
    assert report.main(["--out", str(out), "--check"]) == 1  # nothing generated yet
    assert report.main(["--out", str(out)]) == 0
    assert report.main(["--out", str(out), "--check"]) == 0
    readme = report.README.read_text()
    # The verdict row of "BN at ghost batch 2 is worse": -11.0 points in every seed.
    row = next(line for line in readme.splitlines() if "ghost batch 2 is worse" in line)
    assert "-11.0 ± 0.0" in row and "**reproduced**" in row
    docs = report.DOCS.read_text()
    assert "GN matches BN at the full batch" in docs and "not chosen yet" in docs
    md = out / "batch_size.md"
    md.write_text(md.read_text().replace("-11.0", "-12.0"))
    assert report.main(["--out", str(out), "--check"]) == 1


def test_stale_code_names_the_minority():
    entries = [
        {"key": "a", "library_code": "x"},
        {"key": "b", "library_code": "x"},
        {"key": "c", "library_code": "y"},
        {"key": "d", "library_code": None},
    ]
    assert grid.stale_code_keys(entries) == ["c", "d"]
    assert "`--stale-code`" not in grid.stale_code_note("e", entries[:2])
    assert "c, d" in grid.stale_code_note("e", entries)


def test_library_code_is_the_tree_of_norms_and_nfnets():
    head = grid.git_state()["commit"]
    code = grid.library_code(head)
    assert code is not None and len(code.split("+")) == 2
    assert grid.library_code("0" * 40) is None
    assert grid.library_code(None) is None


def test_stale_code_flag_reruns_only_those(tmp_path):
    out = tmp_path / "out"
    grid.save_results(
        out / "toy.json",
        {
            "cells": [
                {"key": "a", "library_code": "x"},
                {"key": "b", "library_code": "x"},
                {"key": "c", "library_code": "y"},
            ]
        },
    )
    ctx, _ = grid.parse_args("toy", ["--out", str(out), "--stale-code"])
    assert ctx.only == ("c",)
    grid.save_results(out / "toy.json", {"cells": [{"key": "a", "library_code": "x"}]})
    with pytest.raises(SystemExit) as e:
        grid.parse_args("toy", ["--out", str(out), "--stale-code"])
    assert e.value.code == 0
