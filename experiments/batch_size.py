"""Accuracy against the normalization batch: BN, the batch-independent norms and NF.

Claims (each verdict computed by :func:`claims` from the paired seeds):

1. The seed's claim: evaluating BN with small-batch statistics breaks it, and the
   running averages fix it. The BN twin trained at batch 128 is evaluated on the
   whole test split in train mode (each eval batch normalized by its own
   statistics) at eval batches 1, 2, 8 and 32 and at its own 128, against its
   running averages and PreciseBN (50 training batches). At batch 1 the spatial
   statistics of one image are used: single-sample inference.
2. BN degrades as its normalization batch shrinks (Wu & He, "Group
   Normalization", ECCV 2018, Figure 1: 23.6 -> 34.7 % ImageNet error from 32 to 2
   images per device): ghost batches 2, 4, 8, 32 and the full 128, all at
   optimizer batch 128, each with running averages and PreciseBN.
3. Batch-independent norms stay flat and beat BN at small batches (the GN paper;
   FRN, Singh & Krishnan 2020, "FRN beats BN and GN at every batch size"): GN (16
   groups, the most that the 16-channel stem allows), GN + weight-standardized
   convs, LN, FRN + TLU and EvoNorm-S0 (16 groups). Their forward pass does not
   depend on the other examples of the batch, so training at one batch size (128)
   is their curve at every normalization batch.
4. Pointwise layers (DyT, Zhu et al. 2025; Derf, 2025) and RMSNorm: DyT's own
   limitation, that a pointwise layer does not match BN at the full batch in a
   ResNet; whether it beats BN at batch 2. DyT runs with the paper's alpha init 0.5
   and with 1.0; the one with the higher mean validation accuracy is the one compared.
5. The NF model of ``configs/default.py`` against its BN twin under the same recipe.

Every arm is the BN twin of ``configs/default.py`` (``experiments.protocol``),
differing only in its norm; the NF arm is ``configs/default.py``'s model. The
recipe (learning rate, epochs) is the one chosen on validation by
``experiments.recipe``; 3 paired seeds per arm; 5,000 training images held out as
the validation split; test accuracy on the whole 10,000-image test split.

``--quick``: the width-8 one-stage twin, batch 16, two steps, ghost batches 2 and
8, on whatever (tiny) data ``--data-dir`` points to.
"""

from __future__ import annotations

import sys
from pathlib import Path

from experiments import grid, protocol

GHOSTS = (2, 4, 8, 32)
QUICK_GHOSTS = (2, 8)
EVAL_SIZES = (1, 2, 8, 32)  # claim 1: train-mode eval batches besides the run's own
QUICK_EVAL_SIZES = (1, 2)
PRECISE_BATCHES = 50
GN_GROUPS = 16
DYT_ALPHAS = (0.5, 1.0)
# arm -> (label, norm, norm_kwargs, ws_conv); forward passes independent of the batch.
INDEPENDENT = {
    "gn": ("GN", "group_norm", {"num_groups": GN_GROUPS}, False),
    "gn_ws": ("GN+WS", "group_norm", {"num_groups": GN_GROUPS}, True),
    "ln": ("LN", "layer_norm", {}, False),
    "frn": ("FRN+TLU", "frn", {}, False),
    "evonorm_s0": ("EvoNorm-S0", "evonorm_s0", {"num_groups": GN_GROUPS}, False),
    "rms_norm": ("RMSNorm", "rms_norm", {}, False),
    **{f"dyt_a{a:g}": (f"DyT (alpha0 {a:g})", "dyt", {"alpha_init": a}, False) for a in DYT_ALPHAS},
    "derf": ("Derf", "derf", {}, False),
}
QUICK_GROUPS = 2  # the quick model has 4 and 8 channels


def full_batch(quick: bool) -> int:
    return protocol.QUICK["batch_size"] if quick else protocol.FULL_BATCH


def bn_arm(size: int) -> str:
    return f"bn_g{size}"


def cells(quick: bool, out: Path) -> list[grid.Cell]:
    recipe = protocol.load_recipe(out, quick)
    full = full_batch(quick)
    sizes = (*(QUICK_GHOSTS if quick else GHOSTS), full)
    out_cells = []
    for seed in protocol.seeds(quick):
        for size in (full, *sizes[:-1]):  # the full batch first: claim 1 and the baseline
            kwargs = {} if size == full else {"ghost_batch_size": size}
            info = {"arm": bn_arm(size), "label": "BN", "norm_batch": size}
            out_cells.append(
                protocol.twin_cell(
                    bn_arm(size), "batch_norm", kwargs, seed, quick, recipe, info=info
                )
            )
    for seed in protocol.seeds(quick):
        for arm, (label, norm, kwargs, ws) in INDEPENDENT.items():
            if quick and "num_groups" in kwargs:
                kwargs = {"num_groups": QUICK_GROUPS}
            info = {"arm": arm, "label": label, "norm_batch": None}
            out_cells.append(
                protocol.twin_cell(arm, norm, kwargs, seed, quick, recipe, ws_conv=ws, info=info)
            )
        info = {"arm": "nf", "label": "NF-ResNet", "norm_batch": None}
        out_cells.append(protocol.nf_cell("nf", seed, quick, recipe, info=info))
    return out_cells


def after_cell(cell: grid.Cell, config, workdir: Path, entry: dict) -> dict:
    """BN arms: running averages, PreciseBN and (full batch) train-mode eval by size."""
    from nfnets.training.doctor import diagnose

    # A run at chance still has running averages to compare; a diverged one has not.
    if cell.info.get("label") != "BN" or entry["status"] not in ("ok", "at_chance"):
        return {}
    quick = cell.overrides.get("num_train_steps") == protocol.QUICK["num_train_steps"]
    full = cell.info["norm_batch"] == config.batch_size
    sizes = (QUICK_EVAL_SIZES if quick else EVAL_SIZES) if full else ()
    d = diagnose(str(workdir), batches=1 if quick else PRECISE_BATCHES, sizes=sizes)
    ev = d["eval"]
    extra = {
        "eval_running_accuracy": ev["running"]["accuracy"],
        "eval_precise_bn_accuracy": ev["precise_bn"]["accuracy"],
        f"eval_train_mode_{ev['batch_stats']['batch_size']}_accuracy": ev["batch_stats"][
            "accuracy"
        ],
    }
    for size, r in ev["batch_stats_by_size"].items():
        extra[f"eval_train_mode_{size}_accuracy"] = r["accuracy"]
    extra["doctor_causes"] = d["causes"]
    return extra


# ----------------------------------------------------------------------------- claims


def chosen_dyt(entries: list[dict]) -> str:
    """The DyT arm with the higher mean validation accuracy (the paper's init on ties)."""

    def mean(arm: str) -> float:
        iv = protocol.interval(protocol.by_seed(entries, arm, "validation_accuracy").values())
        return -1.0 if iv["mean"] is None else iv["mean"]

    arms = [f"dyt_a{a:g}" for a in DYT_ALPHAS]
    return max(arms, key=lambda a: (mean(a), a == arms[0]))


def claims(entries: list[dict]) -> list[dict]:
    """Every claim of this experiment: paper's direction, paired interval, verdict.

    Each is ``{"id", "claim", "paper", "arm", "base", "metric", "direction",
    "diff", "verdict"}`` with ``diff`` from :func:`protocol.paired` (test accuracy
    unless the metric says otherwise).
    """
    full = max((e["info"].get("norm_batch") or 0 for e in entries), default=128)
    base, small = bn_arm(full), bn_arm(2)
    dyt = chosen_dyt(entries)
    rows = [
        (
            "1",
            "train-mode eval at batch 1 is worse than the running averages",
            "seed: single-sample inference breaks BN",
            base,
            base,
            "eval_train_mode_1_accuracy",
            "eval_running_accuracy",
            "-",
        ),
        (
            "1",
            "train-mode eval at batch 2 is worse than the running averages",
            "seed",
            base,
            base,
            "eval_train_mode_2_accuracy",
            "eval_running_accuracy",
            "-",
        ),
        (
            "1",
            "PreciseBN matches the running averages after a full run",
            "Wu & Johnson 2021: the gap closes at the end of training",
            base,
            base,
            "eval_precise_bn_accuracy",
            "eval_running_accuracy",
            "=",
        ),
        ("2", "BN at ghost batch 2 is worse than at 128", "GN paper: +11.1 points error", small),
        ("2", "BN at ghost batch 4 is worse than at 128", "GN paper: +3.7 points error", "bn_g4"),
        ("2", "BN at ghost batch 8 is worse than at 128", "GN paper: +1.2 points error", "bn_g8"),
        ("3", "GN beats BN at batch 2", "GN paper: 10.6 points better", "gn", small, "+"),
        ("3", "GN matches BN at the full batch", "GN paper: 0.5 points worse", "gn", base, "="),
        ("3", "GN+WS beats BN at batch 2", "WS paper (Qiao et al. 2019)", "gn_ws", small, "+"),
        ("3", "LN beats BN at batch 2", "GN paper: LN 1.7 points below BN at 32", "ln", small),
        ("3", "FRN beats BN at batch 2", "FRN paper", "frn", small, "+"),
        ("3", "FRN beats BN at the full batch", "FRN paper: at every batch size", "frn", base),
        ("3", "FRN beats GN", "FRN paper: at every batch size", "frn", "gn", "+"),
        ("3", "EvoNorm-S0 beats BN at batch 2", "EvoNorm paper (Liu et al. 2020)", "evonorm_s0"),
        ("4", f"{dyt} does not match BN at the full batch", "DyT paper's limitation", dyt, base),
        ("4", f"{dyt} beats BN at batch 2", "(by construction it is flat)", dyt, small, "+"),
        ("4", "Derf beats DyT", "Derf paper (transformers)", "derf", dyt, "+"),
        ("4", "RMSNorm matches LN", "RMSNorm paper (Zhang & Sennrich 2019)", "rms_norm", "ln"),
        ("5", "NF-ResNet matches its BN twin at batch 128", "Brock et al. 2021", "nf", base, "="),
    ]
    defaults = {  # per-claim defaults: base arm and direction when a row omits them
        "2": (base, "-"),
        "3": (small, "+"),
        "4": (base, "="),
    }
    out = []
    for row in rows:
        cid, text, paper, arm = row[:4]
        if len(row) == 8:
            _, _, _, arm, base_arm, metric, base_metric, direction = row
            diff = _paired_metrics(entries, arm, metric, base_metric)
        else:
            base_arm = row[4] if len(row) > 4 else defaults[cid][0]
            direction = row[5] if len(row) > 5 else defaults[cid][1]
            if cid == "4" and len(row) == 5:
                direction = "-" if "does not" in text else "="
            metric = base_metric = "test_accuracy"
            diff = protocol.paired(entries, arm, base_arm, metric)
        out.append(
            {
                "id": cid,
                "claim": text,
                "paper": paper,
                "arm": arm,
                "base": base_arm,
                "metric": metric if metric == base_metric else f"{metric} - {base_metric}",
                "direction": direction,
                "diff": diff,
                "verdict": protocol.verdict(diff, direction),
            }
        )
    return out


def _paired_metrics(entries: list[dict], arm: str, metric: str, base_metric: str) -> dict:
    """Paired difference of two metrics of the same cells (seed by seed)."""
    a = protocol.by_seed(entries, arm, metric)
    b = protocol.by_seed(entries, arm, base_metric)
    seeds = sorted(set(a) & set(b))
    return {**protocol.interval([a[s] - b[s] for s in seeds]), "seeds": seeds}


# ----------------------------------------------------------------------------- outputs


def arms(entries: list[dict]) -> list[dict]:
    """One row per arm, in cell order: label, norm batch, intervals per metric."""
    seen: dict[str, dict] = {}
    for e in entries:
        arm = protocol.arm_of(e["key"])
        if arm not in seen:
            seen[arm] = {"arm": arm, "label": e["info"]["label"], "norm_batch": None}
            seen[arm]["norm_batch"] = e["info"].get("norm_batch")
            seen[arm]["status"] = set()
        seen[arm]["status"].add(e["status"])
    for arm, row in seen.items():
        for metric in (
            "validation_accuracy",
            "test_accuracy",
            "eval_precise_bn_accuracy",
        ):
            row[metric] = protocol.interval(protocol.by_seed(entries, arm, metric).values())
    return list(seen.values())


def table(entries: list[dict]) -> str:
    rows = []
    for r in arms(entries):
        batch = r["norm_batch"] if r["norm_batch"] else "any (batch-independent)"
        rows.append(
            [
                r["label"],
                batch,
                r["test_accuracy"]["n"],
                protocol.fmt_interval(r["validation_accuracy"]),
                protocol.fmt_interval(r["test_accuracy"]),
                protocol.fmt_interval(r["eval_precise_bn_accuracy"]),
                ", ".join(sorted(r["status"])),
            ]
        )
    headers = ["norm", "normalization batch", "seeds", "validation %", "test %"]
    headers += ["test %, PreciseBN", "status"]
    text = grid.markdown_table(headers, rows)
    text += "\n\nMean ± half-width of the 95% t-interval over seeds (scipy). Train mode "
    text += "evaluation of BN at the full batch (claim 1), test accuracy %:\n\n"
    text += claim1_table(entries)
    text += "\n\n" + protocol.claims_table(claims(entries))
    return text


def claim1_table(entries: list[dict]) -> str:
    full = [e for e in entries if e["info"].get("label") == "BN"]
    size = max((e["info"]["norm_batch"] for e in full), default=0)
    arm = bn_arm(size)
    cols = [("running averages", "eval_running_accuracy")]
    cols += [("PreciseBN", "eval_precise_bn_accuracy")]
    sizes = sorted(
        {
            int(k.split("_")[3])
            for e in entries
            if protocol.arm_of(e["key"]) == arm
            for k in e
            if k.startswith("eval_train_mode_")
        }
    )
    cols += [(f"train mode, batch {s}", f"eval_train_mode_{s}_accuracy") for s in sizes]
    row = [
        protocol.fmt_interval(protocol.interval(protocol.by_seed(entries, arm, m).values()))
        for _, m in cols
    ]
    return grid.markdown_table([c for c, _ in cols], [row])


def plot(entries: list[dict], path: str) -> None:
    """Test accuracy vs normalization batch (measured points, 95% CI error bars)."""
    rows = arms(entries)
    fig, axes = grid.new_figure(ncols=2, width=6.2, height=4.6)
    ax = axes[0][0]
    bn = sorted((r for r in rows if r["label"] == "BN"), key=lambda r: r["norm_batch"])
    for metric, label, fmt in (
        ("test_accuracy", "BN, running averages", "o"),
        ("eval_precise_bn_accuracy", "BN, PreciseBN", "s"),
    ):
        pts = [(r["norm_batch"], r[metric]) for r in bn if r[metric]["mean"] is not None]
        if pts:
            ax.errorbar(
                [x for x, _ in pts],
                [100 * iv["mean"] for _, iv in pts],
                yerr=[100 * (iv["half"] or 0.0) for _, iv in pts],
                fmt=fmt,
                capsize=3,
                label=label,
            )
    others = [r for r in rows if r["label"] != "BN" and r["test_accuracy"]["mean"] is not None]
    full = bn[-1]["norm_batch"] if bn else protocol.FULL_BATCH
    for i, r in enumerate(others):
        x = full * 2 ** (0.12 * (i + 1))  # beside the full batch, where they were trained
        iv = r["test_accuracy"]
        ax.errorbar(
            [x], [100 * iv["mean"]], yerr=[100 * (iv["half"] or 0.0)], fmt="D", ms=4, capsize=2
        )
        ax.annotate(r["label"], (x, 100 * iv["mean"]), fontsize=6, rotation=60)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("normalization batch (examples; batch-independent norms at the right)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Trained at optimizer batch 128")
    grid.legend_below(ax)
    ax = axes[0][1]
    arm = bn_arm(full)
    sizes = sorted(
        {
            int(k.split("_")[3])
            for e in entries
            if protocol.arm_of(e["key"]) == arm
            for k in e
            if k.startswith("eval_train_mode_")
        }
    )
    ivs = [
        protocol.interval(protocol.by_seed(entries, arm, f"eval_train_mode_{s}_accuracy").values())
        for s in sizes
    ]
    pts = [(s, iv) for s, iv in zip(sizes, ivs, strict=True) if iv["mean"] is not None]
    if pts:
        ax.errorbar(
            [s for s, _ in pts],
            [100 * iv["mean"] for _, iv in pts],
            yerr=[100 * (iv["half"] or 0.0) for _, iv in pts],
            fmt="o",
            capsize=3,
            label="train-mode statistics of each eval batch",
        )
    for metric, label, fmt in (
        ("eval_running_accuracy", "running averages", "s"),
        ("eval_precise_bn_accuracy", "PreciseBN", "^"),
    ):
        iv = protocol.interval(protocol.by_seed(entries, arm, metric).values())
        if iv["mean"] is not None:
            x = 2 * max(sizes or [full])
            ax.errorbar(
                [x],
                [100 * iv["mean"]],
                yerr=[100 * (iv["half"] or 0.0)],
                fmt=fmt,
                capsize=3,
                label=label,
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation batch (examples)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("BN trained at 128, evaluated in train mode")
    grid.legend_below(ax)
    grid.save_figure(fig, path)


EXPERIMENT = grid.Experiment(
    name="batch_size",
    description=grid.describe(__doc__),
    cells=cells,
    table=table,
    plot=plot,
    after_cell=after_cell,
    reads_results=True,
)

if __name__ == "__main__":
    grid.main(EXPERIMENT, sys.argv[1:])
