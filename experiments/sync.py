"""Per-device BN against SyncBN at 2 examples per device, and SyncBN's exactness.

Claim (the flax ImageNet example, ResNet-50: 71.6 % top-1 with per-device BN at
small per-device batches, 76.5 % with cross-device statistics): normalizing over
each device's few examples hurts; synchronizing the statistics recovers it. And
SyncBN over all devices computes the same function as one device with the whole
batch, so training must match it to float rounding.

Here: the tiny ResNet-18 v2 of ``batch_size`` on Fashion-MNIST, global batch 16
for every cell, 600 SGD steps (lr 0.1 per 256 examples, i.e. 0.00625; 9,600
images), 8 virtual CPU devices with 2 examples each: ``sync_batch_stats`` "none"
(BN over 2), "groups" of 2 and of 4 devices (BN over 4 and 8), "all" (SyncBN,
16), against one device with batch 16. Training loss and accuracy are logged
every 10 steps and the test split evaluated every 200; the table gives, per cell,
the largest absolute difference from the single device over every logged step.

``--quick``: one stage of width 4, 4 steps, logged every step.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from experiments import grid

MODES = {  # key -> (devices, overrides, normalization batch)
    "none": (8, {"sync_batch_stats": "none"}, 2),
    "groups2": (8, {"sync_batch_stats": "groups", "sync_group_size": 2}, 4),
    "groups4": (8, {"sync_batch_stats": "groups", "sync_group_size": 4}, 8),
    "all": (8, {"sync_batch_stats": "all"}, 16),
    "single": (1, {"sync_batch_stats": "all"}, 16),
}
REFERENCE = "single"


def sizes(quick: bool) -> dict:
    model = grid.QUICK_RESNET if quick else grid.TINY_RESNET
    return {
        **model,
        **grid.QUIET,
        "batch_size": 16,
        "eval_batch_size": 64 if quick else 1000,
        "num_train_steps": 4 if quick else 600,
        "warmup_epochs": 0.0 if quick else 0.01,
        "log_every_steps": 1 if quick else 10,
        "eval_every_steps": 2 if quick else 200,
        "precise_bn_batches": 0,
        "model_kwargs.norm": "batch_norm",
        "model_kwargs.norm_kwargs": {},
    }


def cells(quick: bool) -> list[grid.Cell]:
    out = []
    for key, (devices, sync, norm_batch) in MODES.items():
        info = {"devices": devices, "norm_batch": norm_batch}
        out.append(grid.Cell(key, "fashion_mnist_norms", {**sizes(quick), **sync}, devices, info))
    return out


def after_cell(cell: grid.Cell, config, workdir: Path, entry: dict) -> dict:
    """Every logged training loss/accuracy and every test evaluation, by step."""
    records = grid.read_metrics(workdir)
    keys = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")
    curve = [{"step": r["step"], **{k: r[k] for k in keys if k in r}} for r in records]
    return {"curve": curve}


def max_abs_diff(entry: dict, reference: dict, key: str) -> float | None:
    """Largest |entry - reference| of ``key`` over the steps both logged."""
    a = {p["step"]: p[key] for p in entry.get("curve") or [] if key in p}
    b = {p["step"]: p[key] for p in reference.get("curve") or [] if key in p}
    common = sorted(set(a) & set(b))
    if not common:
        return None
    diffs = [abs(a[s] - b[s]) for s in common]
    return math.inf if any(not math.isfinite(d) for d in diffs) else max(diffs)


def _sci(x: float | None) -> str | None:
    return None if x is None else f"{x:.1e}"


def table(entries: list[dict]) -> str:
    ref = next((e for e in entries if e["key"] == REFERENCE), None)
    rows = []
    for e in entries:
        diffs = (
            [None] * 3
            if ref is None
            else [
                max_abs_diff(e, ref, k) for k in ("train_loss", "train_accuracy", "test_accuracy")
            ]
        )
        rows.append(
            [
                e["key"],
                e["info"]["devices"],
                e["info"]["norm_batch"],
                grid.pct(e),
                *(_sci(d) for d in diffs),
            ]
        )
    headers = [
        "cell",
        "devices",
        "BN batch",
        "test accuracy %",
        "max abs diff train loss vs single",
        "max abs diff train acc vs single",
        "max abs diff test acc vs single",
    ]
    return grid.markdown_table(headers, rows)


def plot(entries: list[dict], path: str) -> None:
    fig, axes = grid.new_figure(ncols=2, width=6.0, height=4.5)
    ref = next((e for e in entries if e["key"] == REFERENCE), None)
    for i, e in enumerate(entries):
        curve = [p for p in e.get("curve") or [] if "train_loss" in p]
        label = f"{e['key']} (BN over {e['info']['norm_batch']})"
        axes[0][0].plot(
            [p["step"] for p in curve],
            [p["train_loss"] for p in curve],
            c=f"C{i}",
            label=label,
            lw=1,
        )
        if ref is not None and e is not ref:
            r = {p["step"]: p["train_loss"] for p in ref.get("curve") or [] if "train_loss" in p}
            pts = [
                (p["step"], abs(p["train_loss"] - r[p["step"]])) for p in curve if p["step"] in r
            ]
            axes[0][1].semilogy(
                [s for s, _ in pts], [max(d, 1e-12) for _, d in pts], c=f"C{i}", label=label, lw=1
            )
    axes[0][0].set(xlabel="step", ylabel="training loss (logged mean)", title="Training loss")
    axes[0][1].set(
        xlabel="step",
        ylabel="|loss - single device loss|",
        title="Difference from one device with batch 16",
    )
    axes[0][0].legend(fontsize=7)
    axes[0][1].legend(fontsize=7)
    grid.save_figure(fig, path)


EXPERIMENT = grid.Experiment(
    name="sync",
    description=grid.describe(__doc__),
    cells=cells,
    table=table,
    plot=plot,
    after_cell=after_cell,
)

if __name__ == "__main__":
    grid.main(EXPERIMENT, sys.argv[1:])
