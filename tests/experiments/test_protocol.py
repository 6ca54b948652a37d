"""The evidence protocol's statistics and choices, against scipy and hand-made records.

``interval`` is checked against ``scipy.stats.t.interval`` on the standard error
(numpy's ddof=1 std), ``paired`` against differences paired by hand, ``verdict``
on intervals on each side of 0, and the recipe's choices on synthetic cells.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from experiments import batch_size, grid, protocol, recipe


def entry(key: str, seed: int, **metrics) -> dict:
    base = {"test_loss": 0.3, "test_accuracy": 0.9, "info": {}}
    return {**base, "key": f"{key}_s{seed}", "seed": seed, **metrics}


@pytest.mark.parametrize("values", [[0.91, 0.905, 0.92], [0.5, 0.7], [0.1, 0.2, 0.3, 0.35, 0.8]])
def test_interval_is_scipys_t_interval(values):
    x = np.asarray(values, np.float64)
    low, high = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    iv = protocol.interval(values)
    assert iv["n"] == len(values)
    assert iv["mean"] == pytest.approx(x.mean(), abs=1e-12)
    assert iv["low"] == pytest.approx(low, abs=1e-12)
    assert iv["high"] == pytest.approx(high, abs=1e-12)
    # n = 3: t_{0.975, 2} = 4.303 times the standard error.
    if len(x) == 3:
        assert iv["half"] == pytest.approx(4.302653 * x.std(ddof=1) / np.sqrt(3), rel=1e-6)


def test_interval_of_one_value_has_no_width():
    assert protocol.interval([0.4]) == {
        "n": 1,
        "mean": 0.4,
        "low": None,
        "high": None,
        "half": None,
    }
    assert protocol.interval([])["mean"] is None


def test_paired_uses_the_seeds_both_arms_have():
    entries = [
        entry("a", 0, test_accuracy=0.80),
        entry("a", 1, test_accuracy=0.82),
        entry("a", 2, test_accuracy=0.85),
        entry("b", 0, test_accuracy=0.70),
        entry("b", 1, test_accuracy=0.75),  # b has no seed 2
    ]
    d = protocol.paired(entries, "a", "b", "test_accuracy")
    assert d["seeds"] == [0, 1]
    ref = protocol.interval([0.80 - 0.70, 0.82 - 0.75])
    assert d["mean"] == pytest.approx(0.085) and d["half"] == pytest.approx(ref["half"])


def test_diverged_scores_chance_and_error_has_no_score():
    diverged = entry("a", 0, test_loss=None, test_accuracy=0.5)
    assert protocol.score(diverged, "test_accuracy") == pytest.approx(1 / grid.NUM_CLASSES)
    errored = {**entry("a", 1), "error": "ValueError: x"}
    assert protocol.score(errored, "test_accuracy") is None
    assert protocol.score(entry("a", 2, test_accuracy=0.87), "test_accuracy") == 0.87


@pytest.mark.parametrize(
    ("low", "high", "direction", "expected"),
    [
        (0.01, 0.05, "+", "reproduced"),
        (0.01, 0.05, "-", "contradicted"),
        (-0.05, -0.01, "-", "reproduced"),
        (-0.05, -0.01, "+", "contradicted"),
        (-0.02, 0.03, "+", "inconclusive"),
        (-0.02, 0.03, "-", "inconclusive"),
        (-0.005, 0.008, "=", "reproduced"),
        (-0.005, 0.02, "=", "inconclusive"),  # wider than the margin, contains 0
        (0.002, 0.02, "=", "contradicted"),  # excludes 0
        (None, None, "+", "pending"),
    ],
)
def test_verdict(low, high, direction, expected):
    assert protocol.verdict({"low": low, "high": high}, direction) == expected
    assert expected in protocol.VERDICTS


def test_verdict_rejects_unknown_direction():
    with pytest.raises(ValueError, match="direction"):
        protocol.verdict({"low": 0.0, "high": 1.0}, ">")


def sweep(means: dict[float, float], epochs: float = 4.0) -> list[dict]:
    """Three seeds per learning rate whose validation accuracies average to ``means``."""
    out = []
    for lr, m in means.items():
        for seed, offset in zip(protocol.SEEDS, (-0.01, 0.0, 0.01), strict=True):
            out.append(entry(f"bn_lr{lr:g}_e{epochs:g}", seed, validation_accuracy=m + offset))
    return out


def test_recipe_chooses_on_validation_and_extends_the_budget_only_when_short(tmp_path):
    # The best validation rate wins, whatever the test accuracy says.
    entries = sweep({0.003: 0.88, 0.01: 0.905, 0.03: 0.89})
    entries[0]["test_accuracy"] = 0.99
    chosen = recipe.choose(entries)
    assert chosen["learning_rate"] == 0.01 and chosen["num_epochs"] == 4.0
    grid.save_results(tmp_path / "recipe.json", {"cells": entries})
    assert len(recipe.cells(False, tmp_path)) == 9  # 4 epochs reach the target
    assert protocol.load_recipe(tmp_path, False) == protocol.Recipe(0.01, 4.0)

    short = sweep({0.003: 0.85, 0.01: 0.88, 0.03: 0.87})
    grid.save_results(tmp_path / "recipe.json", {"cells": short})
    assert recipe.choose(short)["num_epochs"] is None
    keys = [c.key for c in recipe.cells(False, tmp_path)]
    assert keys[9:] == [f"bn_lr0.01_e6_s{s}" for s in protocol.SEEDS]  # 6, not yet 8
    with pytest.raises(SystemExit, match="no recipe chosen yet"):
        protocol.load_recipe(tmp_path, False)
    six = short + sweep({0.01: 0.902}, epochs=6.0)
    assert recipe.choose(six)["num_epochs"] == 6.0


def test_recipe_waits_for_every_seed():
    entries = sweep({0.003: 0.88, 0.01: 0.905, 0.03: 0.89})[:-1]  # lr 0.03 lacks seed 2
    assert recipe.choose(entries)["learning_rate"] is None


def test_claims_are_computed_from_the_paired_seeds():
    rows = []
    for seed, noise in zip(protocol.SEEDS, (0.0, 0.004, -0.003), strict=True):
        full = {"norm_batch": 128, "label": "BN"}
        rows.append(
            {
                **entry("bn_g128", seed, test_accuracy=0.91 + noise),
                "info": full,
                "eval_running_accuracy": 0.91 + noise,
                "eval_train_mode_1_accuracy": 0.30 + noise,
            }
        )
        rows.append(
            {
                **entry("bn_g2", seed, test_accuracy=0.80 + noise),
                "info": {"norm_batch": 2, "label": "BN"},
            }
        )
        rows.append({**entry("gn", seed, test_accuracy=0.905 - noise), "info": {"label": "GN"}})
    by = {(c["arm"], c["base"], c["claim"]): c for c in batch_size.claims(rows)}
    single = by[
        ("bn_g128", "bn_g128", "train-mode eval at batch 1 is worse than the running averages")
    ]
    assert single["diff"]["mean"] == pytest.approx(-0.61) and single["verdict"] == "reproduced"
    ghost2 = by[("bn_g2", "bn_g128", "BN at ghost batch 2 is worse than at 128")]
    assert ghost2["diff"]["mean"] == pytest.approx(-0.11) and ghost2["verdict"] == "reproduced"
    gn_small = by[("gn", "bn_g2", "GN beats BN at batch 2")]
    assert gn_small["verdict"] == "reproduced" and gn_small["diff"]["seeds"] == [0, 1, 2]
    gn_full = by[("gn", "bn_g128", "GN matches BN at the full batch")]
    diffs = [-0.005 - 2 * n for n in (0.0, 0.004, -0.003)]
    assert gn_full["diff"]["half"] == pytest.approx(protocol.interval(diffs)["half"])
    assert gn_full["verdict"] == protocol.verdict(protocol.interval(diffs), "=")
    frn = by[("frn", "bn_g2", "FRN beats BN at batch 2")]
    assert frn["verdict"] == "pending" and frn["diff"]["n"] == 0
