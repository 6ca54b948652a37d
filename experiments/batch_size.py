"""Test accuracy against the normalization batch size at a fixed optimizer batch.

Claim (Wu & He, "Group Normalization", ECCV 2018, Figure 1; ResNet-50, ImageNet):
BN's validation error grows as the batch it normalizes over shrinks (23.6 / 23.7
/ 24.8 / 27.3 / 34.7 % at 32 / 16 / 8 / 4 / 2 images per device) while GN stays
flat (24.1 / 24.2 / 24.0 / 24.2 / 24.1 %).

Here: Fashion-MNIST, the small-input pre-activation ResNet-18 of
``configs/fashion_mnist_norms.py`` cut to stem 8 and three single-block stages of
widths 8/16/32 (``grid.TINY_RESNET``), optimizer batch 128 for every cell, 200
SGD-Nesterov steps (lr 0.05, 0.05 epochs of warmup then cosine; 25,600
images, 0.43 epochs), crop+flip augmentation, evaluated on the whole 10,000-image
test split.

- BN (``norm_kwargs.ghost_batch_size`` 2, 4, 8, 16, 32, or the full 128),
  evaluated with its running averages and with PreciseBN (20 training batches).
- Batch renorm at every size, with the paper's r_max / d_max schedule scaled to
  the run (``configs/fashion_mnist_batch_renorm.py``: batch norm for the first
  1/16 of the steps, d_max = 5 at 5/16, r_max = 3 at half the run), and
  switchable norm and EvoNorm-B0 at 2 and 128.
  These norms have no ghost batches, so the small sizes run on 64 virtual CPU
  devices with 2 examples each (``sync_batch_stats="none"`` for 2, device groups
  of 2..16 for 4..32); 128 runs on one device.
- Batch-independent, once each: GN (4 groups), GN + weight-standardized convs, LN,
  IN, FRN + TLU, EvoNorm-S0 (4 groups), and the NF-ResNet of
  ``configs/default.py`` (its own AdamW recipe), drawn as flat lines.
- Seed spread: BN over the full batch with seeds 0, 1, 2.

``--quick``: one stage of width 4, batch 64, 2 steps, on whatever (tiny) data
``--data-dir`` points to.
"""

from __future__ import annotations

import statistics
import sys

from experiments import grid
from nfnets.training.plan import PAPER_SCALED

GHOSTS = (2, 4, 8, 16, 32)
SIZES = (*GHOSTS, "full")
STATEFUL = {"bn": "batch_norm", "brn": "batch_renorm", "sn": "switchable_norm"}
STATEFUL["evonorm_b0"] = "evonorm_b0"
FLAT = {  # key -> (label, norm, norm_kwargs, ws_conv)
    "gn": ("GN", "group_norm", {"num_groups": 4}, False),
    "gn_ws": ("GN+WS", "group_norm", {"num_groups": 4}, True),
    "ln": ("LN", "layer_norm", {}, False),
    "in": ("IN", "instance_norm", {}, False),
    "frn": ("FRN+TLU", "frn", {}, False),
    "evonorm_s0": ("EvoNorm-S0", "evonorm_s0", {"num_groups": 4}, False),
}
LABELS = {"bn": "BN", "brn": "BRN", "sn": "SN", "evonorm_b0": "EvoNorm-B0"}
SEEDS = (1, 2)


def sizes(quick: bool) -> dict:
    if quick:
        return {
            **grid.QUICK_RESNET,
            **grid.QUIET,
            "batch_size": 64,
            "eval_batch_size": 64,
            "num_train_steps": 2,
            "warmup_epochs": 0.0,
            "log_every_steps": 1,
        }
    return {
        **grid.TINY_RESNET,
        **grid.QUIET,
        "batch_size": 128,
        "eval_batch_size": 1024,  # divisible by the 64 devices (the last batch is masked)
        "num_train_steps": 200,
        "warmup_epochs": 0.05,
        "log_every_steps": 50,
    }


def _stateful_cell(family: str, size, base: dict, quick: bool, seed: int = 0) -> grid.Cell:
    batch = base["batch_size"]
    norm_batch = batch if size == "full" else size
    kwargs, devices, sync = {}, 1, {"sync_batch_stats": "all"}
    if family == "brn":  # the paper's r_max / d_max ramps, scaled to the run's length
        kwargs = {"r_max": PAPER_SCALED, "d_max": PAPER_SCALED}
    if size != "full" and family == "bn":
        kwargs = {"ghost_batch_size": size}
    elif size != "full":  # 2 examples per device; groups of devices make the rest
        devices = batch // 2
        group = size // 2
        sync = {"sync_batch_stats": "none"} if group == 1 else {}
        sync = sync or {"sync_batch_stats": "groups", "sync_group_size": group}
    precise = (1 if quick else 20) if family in ("bn", "brn") else 0
    overrides = {
        **base,
        "seed": seed,
        "model_kwargs.norm": STATEFUL[family],
        "model_kwargs.norm_kwargs": kwargs,
        "precise_bn_batches": precise,
        **sync,
    }
    key = f"{family}_{size}" + (f"_seed{seed}" if seed else "")
    info = {"family": family, "label": LABELS[family], "norm_batch": norm_batch, "seed": seed}
    return grid.Cell(key, "fashion_mnist_norms", overrides, devices, info)


def cells(quick: bool) -> list[grid.Cell]:
    base = sizes(quick)
    out = [_stateful_cell(f, s, base, quick) for f in ("bn", "brn") for s in SIZES]
    out += [_stateful_cell(f, s, base, quick) for f in ("sn", "evonorm_b0") for s in (2, "full")]
    out += [_stateful_cell("bn", "full", base, quick, seed) for seed in SEEDS]
    for key, (label, norm, kwargs, ws) in FLAT.items():
        if quick and "num_groups" in kwargs:
            kwargs = {"num_groups": 2}  # width-4 quick model
        overrides = {
            **base,
            "model_kwargs.norm": norm,
            "model_kwargs.norm_kwargs": kwargs,
            "model_kwargs.ws_conv": ws,
            "precise_bn_batches": 0,
        }
        out.append(grid.Cell(key, "fashion_mnist_norms", overrides, 1, {"label": label}))
    nf = {k: v for k, v in base.items() if not k.startswith("model_kwargs.") or quick}
    # configs/default.py's recipe keys, copied into the overrides so that a change of
    # the default shows up as a changed cell (the grid compares overrides only).
    recipe = default_recipe()
    nf = {**nf, "checkpoint_every_steps": 0, **recipe}
    out.append(grid.Cell("nf", "default", nf, 1, {"label": "NF-ResNet"}))
    return out


def default_recipe() -> dict:
    """The label smoothing and bottleneck ratio of ``configs/default.py``."""
    from configs import default

    c = default.get_config()
    return {
        "model_kwargs.bottleneck_ratio": c.model_kwargs.bottleneck_ratio,
        "label_smoothing": c.label_smoothing,
    }


def _by_key(entries: list[dict]) -> dict[str, dict]:
    return {e["key"]: e for e in entries}


def seed_spread(entries: list[dict]) -> dict | None:
    """Mean, sample std and range of BN-full test accuracy over its seeds."""
    e = _by_key(entries)
    accs = [e[k]["test_accuracy"] for k in ("bn_full", "bn_full_seed1", "bn_full_seed2") if k in e]
    accs = [a for a in accs if a is not None]
    if len(accs) < 2:
        return None
    return {
        "n": len(accs),
        "mean": statistics.mean(accs),
        "std": statistics.stdev(accs),
        "range": max(accs) - min(accs),
    }


COLUMNS = (32, 16, 8, 4, 2, "full")  # the GN paper's order, then the full batch


def table(entries: list[dict]) -> str:
    e = _by_key(entries)
    headers = ["norm (test accuracy %)", *(f"batch {s}" for s in COLUMNS[:-1]), "batch 128"]
    rows = [
        _row(e, "bn", precise=False),
        _row(e, "bn", precise=True),
        _row(e, "brn", precise=False),
        _row(e, "brn", precise=True),
        _row(e, "sn", precise=False),
        _row(e, "evonorm_b0", precise=False),
    ]
    text = grid.markdown_table(headers, rows)
    flat = [(FLAT[k][0] if k in FLAT else "NF-ResNet", grid.pct(e.get(k))) for k in (*FLAT, "nf")]
    text += "\n\nBatch-independent norms (one run each):\n\n"
    text += grid.markdown_table(["norm", "test accuracy %"], flat)
    spread = seed_spread(entries)
    if spread:
        text += (
            f"\n\nSeed spread (BN, full batch, {spread['n']} seeds): mean "
            f"{100 * spread['mean']:.2f} %, std {100 * spread['std']:.2f} points, range "
            f"{100 * spread['range']:.2f} points. Read every difference against it."
        )
    return text


def _row(e: dict, family: str, *, precise: bool) -> list:
    label = LABELS[family] + (" + PreciseBN" if precise else " (running averages)")
    key = "test_accuracy_precise_bn" if precise else "test_accuracy"
    return [label, *(grid.pct(e.get(f"{family}_{s}"), key) for s in COLUMNS)]


def plot(entries: list[dict], path: str) -> None:
    """Error vs normalization batch, x decreasing to the right (GN paper, Figure 1)."""
    e = _by_key(entries)
    fig, axes = grid.new_figure(width=7.5, height=4.8)
    ax = axes[0][0]
    series = [("bn", "test_accuracy", "BN (running averages)", "o-")]
    series += [("bn", "test_accuracy_precise_bn", "BN + PreciseBN", "s--")]
    series += [("brn", "test_accuracy", "BRN", "^-"), ("sn", "test_accuracy", "SN", "v-")]
    series += [("evonorm_b0", "test_accuracy", "EvoNorm-B0", "d-")]
    xs_all = set()
    for family, key, label, style in series:
        pts = []
        for entry in e.values():
            info = entry.get("info", {})
            if info.get("family") == family and not info.get("seed") and entry.get(key):
                pts.append((info["norm_batch"], 100 * (1 - entry[key])))
        pts.sort()
        if pts:
            xs_all.update(x for x, _ in pts)
            ax.plot([x for x, _ in pts], [y for _, y in pts], style, label=label)
    styles = (":", "-.", (0, (5, 2)), (0, (1, 1)), (0, (3, 1, 1, 1)), "--", ":")
    flat = [k for k in (*FLAT, "nf") if k in e and e[k].get("test_accuracy") is not None]
    for i, key in enumerate(flat):
        label = e[key].get("info", {}).get("label", key)
        y = 100 * (1 - e[key]["test_accuracy"])
        ax.axhline(y, ls=styles[i % len(styles)], lw=1.3, c=f"C{5 + i}", label=label)
    spread = seed_spread(entries)
    if spread and "bn_full" in e:
        x = e["bn_full"]["info"]["norm_batch"]
        ax.errorbar([x], [100 * (1 - spread["mean"])], yerr=[100 * spread["std"]], fmt="k_")
    ax.set_xscale("log", base=2)
    if xs_all:
        ticks = sorted(xs_all)
        ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.invert_xaxis()
    ax.set_xlabel("normalization batch (examples)")
    ax.set_ylabel("test error (%)")
    ax.set_title("Fashion-MNIST, optimizer batch fixed; error vs normalization batch")
    ax.legend(fontsize=7, ncol=2)
    grid.save_figure(fig, path)


EXPERIMENT = grid.Experiment(
    name="batch_size",
    description=grid.describe(__doc__),
    cells=cells,
    table=table,
    plot=plot,
)

if __name__ == "__main__":
    grid.main(EXPERIMENT, sys.argv[1:])
