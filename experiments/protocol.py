"""The evidence protocol every experiment follows (DESIGN.md section 5b).

- **Split.** ``VALIDATION_EXAMPLES`` of the 60,000 Fashion-MNIST training images
  are held out as the validation split (the same images in every run, whatever the
  seed: ``nfnets.training.datasets.split_validation``). Everything that is chosen
  (optimizer, learning rate, budget, the default config) is chosen on
  ``validation_accuracy`` by code; the test split is only reported.
- **One architecture.** Every norm arm is :data:`TWIN`: ``resnet50_v2_small`` with
  the stem, widths, depths and bottleneck ratio of ``configs/default.py``'s NF
  model, the pre-activation bottleneck layout with a norm where the NF model has
  scaled WS. Arms differ only in ``norm`` / ``norm_kwargs`` (and ``ws_conv`` for
  GN+WS). The NF arm is ``configs/default.py``'s model itself.
- **One recipe.** ``configs/default.py``'s optimizer and schedule (AdamW, warmup
  0.1 epoch, cosine to 0, weight decay 1e-4, label smoothing 0.1, flips, batch 128)
  with the learning rate and the number of epochs chosen by
  :mod:`experiments.recipe` for BN at the full batch, then kept for every arm.
- **Paired seeds.** ``SEEDS``: seed s fixes the initialization, the data order and
  the augmentation, identically in every arm.
- **Statistics** (scipy's Student t): per cell the mean and the 95% t-interval
  over seeds; per claim the paired difference (arm minus baseline, seed by seed)
  with its 95% t-interval, and a verdict computed from it (:func:`verdict`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments import grid

VALIDATION_EXAMPLES = 5000
SEEDS = (0, 1, 2)
QUICK_SEEDS = (0, 1)  # --quick: two, the fewest that give an interval
CONFIDENCE = 0.95
FULL_BATCH = 128
# An "equal" claim (e.g. renorm matches BN at the full batch) is reproduced when the
# paired interval lies within +-EQUAL_MARGIN of 0 (accuracy, as a fraction).
EQUAL_MARGIN = 0.01
VERDICTS = ("reproduced", "contradicted", "inconclusive", "pending")

# The BN twin of configs/default.py's NF model (same stem, widths, depths, ratio).
TWIN_MODEL = "resnet50_v2_small"
TWIN = {
    "stem_width": 16,
    "stem_stride": 2,
    "widths": (32, 64, 128),
    "depths": (1, 1, 1),
    "bottleneck_ratio": 0.5,
}
# --quick: one stage of width 8 (compiles in about a second), a few steps.
QUICK_TWIN = {
    "stem_width": 4,
    "stem_stride": 2,
    "widths": (8,),
    "depths": (1,),
    "bottleneck_ratio": 0.5,
}
QUICK_NF = {"stem_width": 4, "widths": (4,), "depths": (1,)}
QUICK = {
    **grid.QUIET,
    "batch_size": 16,
    "eval_batch_size": 16,
    "num_train_steps": 2,
    "warmup_epochs": 0.0,
    "log_every_steps": 1,
    "validation_examples": 16,
    "checkpoint_every_steps": 1000,
}


# ----------------------------------------------------------------------------- recipe


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The learning rate and budget chosen on validation by :mod:`experiments.recipe`."""

    learning_rate: float
    num_epochs: float


QUICK_RECIPE = Recipe(learning_rate=0.01, num_epochs=0.0)


def seeds(quick: bool) -> tuple[int, ...]:
    """The paired seeds of every arm (``QUICK_SEEDS`` with ``--quick``)."""
    return QUICK_SEEDS if quick else SEEDS


def recipe_path(out: Path) -> Path:
    return out / "recipe.json"


def load_recipe(out: Path, quick: bool) -> Recipe:
    """The recipe that ``out/recipe.json``'s cells choose; SystemExit when not chosen yet."""
    if quick:
        return QUICK_RECIPE
    from experiments.recipe import choose

    path = recipe_path(out)
    chosen = choose(grid.load_results(path).get("cells", []))
    if chosen["num_epochs"] is None:
        raise SystemExit(
            f"{path}: no recipe chosen yet; run `python -m experiments.recipe` first "
            "(or `python -m experiments.run_all`)"
        )
    return Recipe(float(chosen["learning_rate"]), float(chosen["num_epochs"]))


# ----------------------------------------------------------------------------- cells


def base_overrides(quick: bool, recipe: Recipe | None) -> dict[str, Any]:
    """Overrides shared by every arm: the split, output switches and the recipe."""
    if quick:
        return dict(QUICK)
    out = {**grid.QUIET, "validation_examples": VALIDATION_EXAMPLES, "log_every_steps": 200}
    if recipe is not None:
        out.update(learning_rate=recipe.learning_rate, num_epochs=recipe.num_epochs)
    return out


def twin_cell(
    key: str,
    norm: str,
    norm_kwargs: dict | None,
    seed: int,
    quick: bool,
    recipe: Recipe | None,
    *,
    ws_conv: bool = False,
    extra: dict | None = None,
    devices: int = 1,
    info: dict | None = None,
) -> grid.Cell:
    """A cell of the BN twin with ``norm``; arms differ only in the norm arguments."""
    model_kwargs = {**(QUICK_TWIN if quick else TWIN), "norm": norm}
    model_kwargs["norm_kwargs"] = dict(norm_kwargs or {})
    if ws_conv:
        model_kwargs["ws_conv"] = True
    overrides = {
        **base_overrides(quick, recipe),
        "model": TWIN_MODEL,
        "model_kwargs": model_kwargs,
        "seed": seed,
        **(extra or {}),
    }
    info = {**(info or {}), "seed": seed}
    return grid.Cell(f"{key}_s{seed}", "default", overrides, devices, info)


def nf_cell(
    key: str,
    seed: int,
    quick: bool,
    recipe: Recipe | None,
    info: dict | None = None,
    extra: dict | None = None,
) -> grid.Cell:
    """A cell of configs/default.py's NF model under the same recipe (None: its own)."""
    overrides = {**base_overrides(quick, recipe), "seed": seed, **(extra or {})}
    if quick:
        overrides.update({f"model_kwargs.{k}": v for k, v in QUICK_NF.items()})
    return grid.Cell(f"{key}_s{seed}", "default", overrides, 1, {**(info or {}), "seed": seed})


def arm_of(key: str) -> str:
    """The arm of a cell key (``bn_g2_s1`` -> ``bn_g2``)."""
    return key.rsplit("_s", 1)[0]


# ----------------------------------------------------------------------------- statistics


def t_quantile(n: int) -> float:
    """The two-sided ``CONFIDENCE`` Student-t quantile with n - 1 degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1))


def interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean and 95% t-interval of ``values``: ``{"n", "mean", "low", "high", "half"}``.

    ``half = t_{0.975, n-1} * s / sqrt(n)`` with the sample standard deviation s
    (ddof 1); with fewer than 2 values the interval is unknown (None).
    """
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "low": None, "high": None, "half": None}
    mean = sum(xs) / n
    if n < 2:
        return {"n": 1, "mean": mean, "low": None, "high": None, "half": None}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(n) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half, "half": half}


def score(entry: dict, metric: str) -> float | None:
    """A cell's ``metric``; a diverged cell scores chance (1 / classes).

    Counting diverged runs at chance keeps them in the paired differences: a norm
    that diverges at one seed is penalized, not silently dropped. A cell that raised
    an error has no score (a bug, not a result): its claims stay pending.
    """
    status = grid.cell_status(entry, entry.get("error"))
    if status == "error":
        return None
    if status == "diverged":
        return 1.0 / grid.NUM_CLASSES
    value = entry.get(metric)
    return None if value is None else float(value)


def by_seed(entries: Sequence[dict], arm: str, metric: str) -> dict[int, float]:
    """``seed -> score`` of the recorded cells of ``arm``."""
    out = {}
    for e in entries:
        if arm_of(e["key"]) == arm:
            value = score(e, metric)
            if value is not None:
                out[int(e["seed"])] = value
    return out


def paired(entries: Sequence[dict], arm: str, base: str, metric: str) -> dict[str, Any]:
    """Paired difference ``arm - base`` over the seeds both have, with its t-interval."""
    a, b = by_seed(entries, arm, metric), by_seed(entries, base, metric)
    seeds = sorted(set(a) & set(b))
    return {**interval([a[s] - b[s] for s in seeds]), "seeds": seeds}


def verdict(diff: dict[str, Any], direction: str) -> str:
    """The verdict on a paired difference (arm minus baseline).

    ``direction`` is the paper's: ``"+"`` (arm better), ``"-"`` (arm worse) or
    ``"="`` (no difference). For ``+``/``-``: "reproduced" when the 95% interval
    excludes 0 in the paper's direction, "contradicted" when it excludes 0 the
    other way, "inconclusive" otherwise. For ``=``: "reproduced" when the interval
    lies inside +-EQUAL_MARGIN, "contradicted" when it excludes 0, else
    "inconclusive". Fewer than 2 paired seeds: "pending".
    """
    if direction not in ("+", "-", "="):
        raise ValueError(f"direction={direction!r}: give '+', '-' or '='")
    low, high = diff.get("low"), diff.get("high")
    if low is None or high is None:
        return "pending"
    if direction == "=":
        if -EQUAL_MARGIN <= low and high <= EQUAL_MARGIN:
            return "reproduced"
        return "contradicted" if low > 0 or high < 0 else "inconclusive"
    sign = 1.0 if direction == "+" else -1.0
    lo, hi = sorted((sign * low, sign * high))
    if lo > 0:
        return "reproduced"
    if hi < 0:
        return "contradicted"
    return "inconclusive"


def fmt_interval(iv: dict[str, Any], scale: float = 100.0, signed: bool = False) -> str:
    """``"91.2 ± 0.4"`` (percentage points); "—" when unknown."""
    if iv.get("mean") is None:
        return "—"
    sign = "+" if signed else ""
    mean = f"{scale * iv['mean']:{sign}.1f}"
    if iv.get("half") is None:
        return f"{mean} (n=1)"
    return f"{mean} ± {scale * iv['half']:.1f}"


def seeds_to_settle(diff: dict[str, Any], direction: str, limit: int = 100) -> int | None:
    """Seeds at which an interval this wide around this mean would settle the claim.

    Assumes the paired differences keep their mean and sample standard deviation:
    the smallest n with ``t_{n-1} * s / sqrt(n) < |mean|`` (for ``=``: below
    ``EQUAL_MARGIN - |mean|``). None when more than ``limit`` seeds would be needed
    or the spread is unknown (a mean inside the noise needs a bigger effect, not
    more seeds).
    """
    mean, half, n = diff.get("mean"), diff.get("half"), diff.get("n", 0)
    if mean is None or half is None or n < 2:
        return None
    sd = half * math.sqrt(n) / t_quantile(n)
    target = EQUAL_MARGIN - abs(mean) if direction == "=" else abs(mean)
    if target <= 0:
        return None
    for m in range(2, limit + 1):
        if t_quantile(m) * sd / math.sqrt(m) < target:
            return m
    return None


def settle_note(row: dict[str, Any]) -> str:
    """What a claim row needs: nothing when decided, else the seeds (or why not)."""
    if row["verdict"] in ("reproduced", "contradicted"):
        return ""
    if row["verdict"] == "pending":
        return "cells still to run"
    m = seeds_to_settle(row["diff"], row["direction"])
    if m is None:
        return "the difference is inside the noise: > 100 seeds at this spread"
    return f"about {m} seeds at this spread"


def claims_table(rows: Sequence[dict[str, Any]]) -> str:
    """The claim rows of an experiment as a markdown table, with the verdict rule."""
    body = [
        [
            r["id"],
            r["claim"],
            r["paper"],
            f"`{r['arm']}` − `{r['base']}`",
            fmt_interval(r["diff"], signed=True),
            r["diff"]["n"],
            f"**{r['verdict']}**",
            settle_note(r) or "—",
        ]
        for r in rows
    ]
    headers = ["claim", "tested", "paper", "paired difference", "points (95% CI)", "seeds"]
    headers += ["verdict", "to settle it"]
    note = (
        "Paired difference: arm minus baseline, seed by seed, in accuracy points on the "
        "test split (two evaluations of the same cells where arm and baseline are one "
        "arm); verdict computed by `experiments.protocol.verdict`: reproduced when the "
        "95% interval excludes 0 in the paper's direction, contradicted when it excludes "
        f"0 the other way; for 'matches', reproduced within ±{100 * EQUAL_MARGIN:g} points. "
        "A failed (diverged) cell counts at chance accuracy."
    )
    return grid.markdown_table(headers, body) + "\n\n" + note
