"""The one recipe: learning rate and budget chosen on validation for BN at the full batch.

Every arm of the norm experiments trains with the recipe chosen here, so that no arm
is tuned and the others not (:mod:`experiments.protocol`). The BN twin of
``configs/default.py`` (``resnet50_v2_small``, stem 16 with stride 2, widths
32/64/128, one bottleneck block per stage, ratio 0.5) trains at batch 128 with
``configs/default.py``'s optimizer and schedule (AdamW, 0.1 epoch of warmup,
cosine to 0, weight decay 1e-4, label smoothing 0.1, flips) and

1. learning rates 0.003, 0.01 and 0.03 at 4 epochs, 3 seeds each: the rate with
   the highest mean validation accuracy is chosen;
2. budget: the smallest number of epochs in 4, 6, 8, 10 at which BN with the
   chosen rate reaches a mean validation accuracy >= 90%, 3 seeds each (the
   longer budgets are run only when the shorter ones fall short); 10 when none does.

All choices are made by :func:`choose` from ``validation_accuracy``, never from the
test split, whose accuracy is only reported. 5,000 of the 60,000 training images
are the validation split (the same in every run).

``--quick``: every cell of step 1 for two steps on whatever (tiny) data
``--data-dir`` points to.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from experiments import grid, protocol

LEARNING_RATES = (0.003, 0.01, 0.03)
SWEEP_EPOCHS = 4.0
BUDGETS = (4.0, 6.0, 8.0, 10.0)
TARGET = 0.90  # mean validation accuracy that counts as converged
METRIC = "validation_accuracy"


def _cell(lr: float, epochs: float, seed: int, quick: bool) -> grid.Cell:
    recipe = protocol.Recipe(lr, 0.0 if quick else epochs)
    info = {"learning_rate": lr, "num_epochs": epochs}
    key = f"bn_lr{lr:g}_e{epochs:g}"
    return protocol.twin_cell(key, "batch_norm", {}, seed, quick, recipe, info=info)


def _mean(entries: list[dict], lr: float, epochs: float, seeds: Sequence[int]) -> float | None:
    """Mean validation accuracy of the (lr, epochs) cells, None until every seed ran."""
    arm = f"bn_lr{lr:g}_e{epochs:g}"
    scores = protocol.by_seed(entries, arm, METRIC)
    if set(scores) != set(seeds):
        return None
    return sum(scores.values()) / len(scores)


def choose(entries: list[dict], seeds: Sequence[int] = protocol.SEEDS) -> dict:
    """The choice the recorded cells support so far.

    Returns ``{"learning_rate", "num_epochs", "means", "budget_means"}``: the
    rate is None until every sweep cell ran; ``num_epochs`` is None until the
    budget search has its answer; the means are validation accuracies.
    """
    means = {lr: _mean(entries, lr, SWEEP_EPOCHS, seeds) for lr in LEARNING_RATES}
    out = {"learning_rate": None, "num_epochs": None, "means": means, "budget_means": {}}
    if any(m is None for m in means.values()):
        return out
    lr = max(LEARNING_RATES, key=lambda r: means[r])
    out["learning_rate"] = lr
    for epochs in BUDGETS:
        m = _mean(entries, lr, epochs, seeds)
        out["budget_means"][epochs] = m
        if m is None:
            return out
        if m >= TARGET:
            out["num_epochs"] = epochs
            return out
    out["num_epochs"] = BUDGETS[-1]
    return out


def cells(quick: bool, out: Path) -> list[grid.Cell]:
    seeds = protocol.seeds(quick)
    sweep = [_cell(lr, SWEEP_EPOCHS, s, quick) for lr in LEARNING_RATES for s in seeds]
    if quick:
        return sweep
    chosen = choose(grid.load_results(out / "recipe.json").get("cells", []))
    lr, extra = chosen["learning_rate"], []
    if lr is None:
        return sweep
    # A longer budget only once the previous one finished and fell short of TARGET.
    for previous, epochs in zip(BUDGETS, BUDGETS[1:], strict=False):
        done = chosen["budget_means"].get(previous)
        if done is None or done >= TARGET:
            break
        extra += [_cell(lr, epochs, s, quick) for s in seeds]
    return sweep + extra


def _arms(entries: list[dict]) -> list[tuple[float, float]]:
    seen = []
    for e in entries:
        arm = (e["info"]["learning_rate"], e["info"]["num_epochs"])
        if arm not in seen:
            seen.append(arm)
    return seen


def table(entries: list[dict]) -> str:
    chosen = choose(entries)
    rows = []
    for lr, epochs in _arms(entries):
        arm = f"bn_lr{lr:g}_e{epochs:g}"
        val = protocol.interval(protocol.by_seed(entries, arm, METRIC).values())
        test = protocol.interval(protocol.by_seed(entries, arm, "test_accuracy").values())
        statuses = ", ".join(
            sorted({e["status"] for e in entries if protocol.arm_of(e["key"]) == arm})
        )
        mark = ""
        if lr == chosen["learning_rate"] and epochs == chosen["num_epochs"]:
            mark = " **chosen**"
        rows.append(
            [
                f"{lr:g}",
                f"{epochs:g}",
                val["n"],
                protocol.fmt_interval(val) + mark,
                protocol.fmt_interval(test),
                statuses,
            ]
        )
    headers = ["lr", "epochs", "seeds", "validation acc. % (95% CI)", "test acc. %", "status"]
    text = grid.markdown_table(headers, rows)
    lr, epochs = chosen["learning_rate"], chosen["num_epochs"]
    if lr is None:
        return text + "\n\nChoice: pending (not every sweep cell has run)."
    budget = "pending" if epochs is None else f"{epochs:g} epochs"
    return (
        f"{text}\n\nChoice (by validation accuracy, computed by `experiments.recipe.choose`): "
        f"learning rate {lr:g}; budget {budget}."
    )


def plot(entries: list[dict], path: str) -> None:
    fig, axes = grid.new_figure()
    ax = axes[0][0]
    for epochs in sorted({e["info"]["num_epochs"] for e in entries}):
        xs, ys, errs = [], [], []
        for lr in sorted({e["info"]["learning_rate"] for e in entries}):
            iv = protocol.interval(
                protocol.by_seed(entries, f"bn_lr{lr:g}_e{epochs:g}", METRIC).values()
            )
            if iv["mean"] is not None:
                xs.append(lr)
                ys.append(100 * iv["mean"])
                errs.append(0.0 if iv["half"] is None else 100 * iv["half"])
        ax.errorbar(xs, ys, yerr=errs, fmt="o", capsize=3, label=f"{epochs:g} epochs")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (AdamW)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("BN twin at batch 128: mean and 95% CI over 3 seeds")
    grid.legend_below(ax, ncol=4)
    grid.save_figure(fig, path)


EXPERIMENT = grid.Experiment(
    name="recipe",
    description=grid.describe(__doc__),
    cells=cells,
    table=table,
    plot=plot,
    reads_results=True,
)

if __name__ == "__main__":
    grid.main(EXPERIMENT, sys.argv[1:])
