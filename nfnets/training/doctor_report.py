"""The BN doctor's verdict, table, doctor.json and doctor.png (no JAX in here).

Causes (codes in ``report["causes"]``), checked in this order:

- ``never_updated``: some layer's running statistics have ``count == 0``, or are
  still exactly the initial mean 0 / var 1 after updates (``momentum=1.0`` keeps
  the old value forever).
- ``stale_running_average``: the running averages disagree with the PreciseBN
  re-estimate AND that costs accuracy: max mean shift over layers above
  ``SHIFT_SIGMA`` or max absolute log variance ratio above ``VAR_LOG_RATIO``, and
  PreciseBN beats the running averages by at least ``ACCURACY_GAP``.
- ``small_normalization_batch``: training normalized batches of at most
  ``SMALL_BATCH`` examples, and eval with train-mode batch statistics at that size
  differs from eval with the PreciseBN statistics by at least ``ACCURACY_GAP``.
- ``unsynced_devices``: the same, where the small batch comes from
  ``sync_batch_stats="none"`` over several devices while the global batch is
  not small (SyncBN would fix it).
- ``healthy``: none of the above.

Thresholds. Measured on tiny runs (the two-stage ResNet-18 v2 of
tests/nfnets/training/test_doctor.py, widths 8/16, batch 16 on 8 devices, 96
steps of AdamW on 256 noisy-grating images, 200 test images, PreciseBN from 8
batches) and on the README run (Fashion-MNIST, momentum 0.9999, 300 steps):

- healthy statistics (momentum 0.9; SyncBN, ``sync_batch_stats="none"``, ghost
  batches of 2): max mean shift 0.020, 0.023 and 0.032 sigma; max |log var
  ratio| 0.10 (SyncBN run); running / PreciseBN loss ratio 0.99-1.00;
- stale or never-moving statistics (momentum 0.9999 for 96 steps, momentum 1.0
  for 32 steps, momentum 0.9999 for 300 Fashion-MNIST steps): max mean shift
  1.19, 1.06 and 1.95 sigma; max |log var ratio| 1.5 or more (2.1 in the
  README run); running loss 18.4 vs 1.36 and 38.0 vs 0.68 with PreciseBN,
  accuracy 20.5% vs 46.0% and 19.8% vs 76.3%.

So ``SHIFT_SIGMA = 0.5`` is 15x the largest healthy shift and half the smallest
broken one; ``VAR_LOG_RATIO = log 1.5 = 0.41`` is 4x the healthy 0.10 and under
a third of the broken 1.5. A statistics gap alone is not a cause: accuracy must
drop by ``ACCURACY_GAP = 5`` points or the loss grow ``LOSS_RATIO = 1.25``-fold.
An accuracy gap alone is not one either: the healthy SyncBN run scored 42.0%
running vs 46.0% PreciseBN on 200 test images (8 images; a barely trained model)
with a max shift of 0.02 sigma. Train-mode eval at the run's normalization
batch: 45.0% vs 46.0% PreciseBN with SyncBN over 16 examples; 22.0% vs 40.0%
with ghost batches of 2 and 23.5% vs 53.0% with unsynced per-device batches of
2 (hence ``ACCURACY_GAP`` there too). ``SMALL_BATCH = 8``: batch-norm error
grows quickly below 8-16 examples per normalization batch (Wu & He, 2018,
"Group Normalization", Fig. 1); the 16-example SyncBN run above lost 1 point.
"""

from __future__ import annotations

import json
import math
import os

SHIFT_SIGMA = 0.5
VAR_LOG_RATIO = math.log(1.5)
ACCURACY_GAP = 0.05
SMALL_BATCH = 8
LOSS_RATIO = 1.25

CAUSES = (
    "never_updated",
    "stale_running_average",
    "small_normalization_batch",
    "unsynced_devices",
    "healthy",
    "no_batch_statistics",
)
REPORT_FILE = "doctor.json"
FIGURE_FILE = "doctor.png"


def batch_dependence_relevant(run: dict) -> bool:
    """True where eval (d) applies: ghost batches, or a small normalization batch."""
    return bool(run.get("ghost_batch_size")) or run["normalization_batch"] <= SMALL_BATCH


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _worst(layers: list[dict], key: str) -> dict | None:
    rows = [r for r in layers if r[key] is not None]
    return max(rows, key=lambda r: r[key]) if rows else None


def _never_updated(layers: list[dict], evals: dict, run: dict) -> str | None:
    zero = [r for r in layers if r["count"] == 0]
    at_init = [r for r in layers if r["name"] in run.get("layers_at_init", ()) and r["count"]]
    pop, ran = _pct(evals["precise_bn"]["accuracy"]), _pct(evals["running"]["accuracy"])
    fix = (
        f"re-estimate them with PreciseBN (precise_bn_batches=50: {pop} vs {ran} with the "
        "running statistics)"
    )
    if zero:
        return (
            f"running statistics never updated (count 0) in {len(zero)} of {len(layers)} layers, "
            f"e.g. {zero[0]['name']}: eval normalizes with the initial mean 0 / var 1; train "
            f"with train=True and a mutable batch_stats collection, or {fix}"
        )
    if at_init:
        return (
            f"running statistics never updated: {len(at_init)} of {len(layers)} layers (e.g. "
            f"{at_init[0]['name']}) still hold the initial mean 0 / var 1 after "
            f"{at_init[0]['count']} updates; momentum={run['momentum']:g} keeps the old value "
            "(it is the weight on the OLD value: PyTorch's momentum=0.1 is 0.9 here); use "
            f"momentum 0.9, or {fix}"
        )
    return None


def _averaging_window(run: dict) -> str:
    m, steps = run["momentum"], run["step"]
    if not 0.0 < m < 1.0:
        return f"momentum {m:g}"
    window = 1.0 / (1.0 - m)
    init_weight = m**steps
    text = f"momentum {m:g} over {steps} steps averages over ~{window:.0f} steps"
    if init_weight >= 0.01:
        text += f" (the initial mean 0 / var 1 still weigh {_pct(init_weight)})"
    return text


def _stale(layers: list[dict], evals: dict, run: dict) -> str | None:
    shift, var = _worst(layers, "mean_shift_max"), _worst(layers, "var_log_ratio_max")
    off_shift = shift is not None and shift["mean_shift_max"] > SHIFT_SIGMA
    off_var = var is not None and var["var_log_ratio_max"] > VAR_LOG_RATIO
    run_eval, pop_eval = evals["running"], evals["precise_bn"]
    costs = (
        pop_eval["accuracy"] - run_eval["accuracy"] >= ACCURACY_GAP
        or run_eval["loss"] >= LOSS_RATIO * pop_eval["loss"]
    )
    if not (off_shift or off_var) or not costs:
        return None
    where = (
        f"max mean shift {shift['mean_shift_max']:.1f} sigma in {shift['name']}"
        if off_shift
        else f"max |log var ratio| {var['var_log_ratio_max']:.2f} in {var['name']}"
    )
    return (
        f"running averages lag the weights: {where}; {_averaging_window(run)}; "
        f"PreciseBN scores {_pct(pop_eval['accuracy'])} (loss {pop_eval['loss']:.3f}) vs "
        f"{_pct(run_eval['accuracy'])} (loss {run_eval['loss']:.3f}) with the running averages; "
        "use precise_bn_batches=50 or momentum 0.9"
    )


def _by_size_text(evals: dict) -> str:
    by_size = evals.get("batch_stats_by_size") or {}
    if not by_size:
        return ""
    parts = ", ".join(
        f"{k}: {_pct(v['accuracy'])}" for k, v in sorted(by_size.items(), key=lambda kv: int(kv[0]))
    )
    return f" (by normalization batch: {parts})"


def _small_batch(evals: dict, run: dict) -> tuple[str, str] | None:
    n = run["normalization_batch"]
    own, pop = evals["batch_stats"]["accuracy"], evals["precise_bn"]["accuracy"]
    if n > SMALL_BATCH or abs(own - pop) < ACCURACY_GAP:
        return None
    evidence = (
        f"eval with batch statistics of {n} examples scores {_pct(own)} vs {_pct(pop)} with "
        f"population statistics{_by_size_text(evals)}"
    )
    unsynced = run["sync_batch_stats"] == "none" and run["num_devices"] > 1
    if unsynced and run["batch_size"] > SMALL_BATCH and not run.get("ghost_batch_size"):
        return "unsynced_devices", (
            f"devices normalized their own {n}-example batches (sync_batch_stats=none over "
            f"{run['num_devices']} devices): {evidence}; use sync_batch_stats=all (SyncBN over "
            f"the global batch of {run['batch_size']})"
        )
    return "small_normalization_batch", (
        f"the normalization batch is too small: {evidence}; use group_norm, "
        "sync_batch_stats=all, or batch_renorm"
    )


def judge(layers: list[dict], evals: dict, run: dict) -> tuple[list[str], list[str]]:
    """``(causes, verdict)``: cause codes and one plain-words line per cause, with its fix.

    ``layers``: rows with ``name``, ``mean_shift_max``, ``var_log_ratio_max``,
    ``count`` (depth order); ``evals``: ``running``, ``precise_bn``,
    ``batch_stats`` (each with ``accuracy``) and optionally
    ``batch_stats_by_size``; ``run``: ``momentum``, ``step``,
    ``normalization_batch``, ``ghost_batch_size``, ``sync_batch_stats``,
    ``num_devices``, ``batch_size`` and ``layers_at_init`` (names).
    """
    causes, verdict = [], []
    line = _never_updated(layers, evals, run)
    if line:
        causes.append("never_updated")
        verdict.append(line)
    else:
        line = _stale(layers, evals, run)
        if line:
            causes.append("stale_running_average")
            verdict.append(line)
    small = _small_batch(evals, run)
    if small:
        causes.append(small[0])
        verdict.append(small[1])
    if not causes:
        causes.append("healthy")
        verdict.append(_healthy(layers, evals, run))
    return causes, verdict


def _healthy(layers: list[dict], evals: dict, run: dict) -> str:
    shift, var = _worst(layers, "mean_shift_max"), _worst(layers, "var_log_ratio_max")
    stats = []
    if shift is not None:
        stats.append(f"max mean shift {shift['mean_shift_max']:.2f} sigma ({shift['name']})")
    if var is not None:
        stats.append(f"max |log var ratio| {var['var_log_ratio_max']:.2f} ({var['name']})")
    return (
        f"healthy: running statistics agree with the population ({', '.join(stats)}); "
        f"running {_pct(evals['running']['accuracy'])}, PreciseBN "
        f"{_pct(evals['precise_bn']['accuracy'])}, batch statistics of "
        f"{run['normalization_batch']}: {_pct(evals['batch_stats']['accuracy'])}"
    )


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def format_report(report: dict, top: int = 10) -> str:
    """The console text: the ``top`` worst layers, the evaluations and the verdict."""
    if not report["layers"]:
        return "\n".join(report["verdict"])
    rows = sorted(
        report["layers"],
        key=lambda r: (r["mean_shift_max"] or 0.0, r["var_log_ratio_max"]),
        reverse=True,
    )[:top]
    width = max(len("layer"), *(len(r["name"]) for r in rows))
    head = (
        f"{'layer':<{width}}  {'count':>6}  {'shift max':>9}  {'shift mean':>10}  "
        f"{'|log var| max':>13}  {'mean':>6}"
    )
    lines = [
        f"{len(rows)} worst of {len(report['layers'])} layers (mean shift in population sigmas):",
        head,
    ]
    for r in rows:
        lines.append(
            f"{r['name']:<{width}}  {r['count']:>6}  {_fmt(r['mean_shift_max']):>9}  "
            f"{_fmt(r['mean_shift_mean']):>10}  {_fmt(r['var_log_ratio_max']):>13}  "
            f"{_fmt(r['var_log_ratio_mean']):>6}"
        )
    lines.append("")
    lines.append("test split, each example once:")
    for label, r in _eval_bars(report):
        lines.append(f"  {label:<28} accuracy {_pct(r['accuracy']):>6}  loss {r['loss']:.4f}")
    lines.append("")
    lines.extend(f"verdict: {v}" for v in report["verdict"])
    return "\n".join(lines)


def _eval_bars(report: dict) -> list[tuple[str, dict]]:
    ev, run = report["eval"], report["run"]
    bars = [("running averages", ev["running"]), ("PreciseBN", ev["precise_bn"])]
    bars.append((f"batch stats of {run['normalization_batch']} (run's)", ev["batch_stats"]))
    for k, v in sorted(ev.get("batch_stats_by_size", {}).items(), key=lambda kv: int(kv[0])):
        bars.append((f"batch stats of {k}", v))
    return bars


def plot_report(report: dict, path: str) -> str:
    """doctor.png: mean shift and log variance ratio by depth, and the evaluations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    depth = list(range(len(layers)))
    fig, (ax_shift, ax_var, ax_eval) = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, label in (
        (ax_shift, "mean_shift", "|mean shift| / population sigma"),
        (ax_var, "var_log_ratio", "|log(var_run / var_pop)|"),
    ):
        for stat, style in (("max", "o-"), ("mean", "s--")):
            ys = [math.nan if r[f"{key}_{stat}"] is None else r[f"{key}_{stat}"] for r in layers]
            ax.plot(depth, ys, style, label=f"{stat} over channels")
        ax.set_xlabel("layer (forward order)")
        ax.set_ylabel(label)
        ax.set_xticks(depth, [r["name"] for r in layers], rotation=80, fontsize=6)
        ax.legend()
        ax.grid(alpha=0.3)
    ax_shift.axhline(SHIFT_SIGMA, color="grey", lw=0.8, ls=":")
    ax_var.axhline(VAR_LOG_RATIO, color="grey", lw=0.8, ls=":")
    bars = _eval_bars(report)
    ax_eval.bar(range(len(bars)), [100 * r["accuracy"] for _, r in bars], color="tab:blue")
    ax_eval.set_xticks(range(len(bars)), [b for b, _ in bars], rotation=30, ha="right", fontsize=7)
    ax_eval.set_ylabel("test accuracy (%)")
    ax_eval.set_title(", ".join(report["causes"]))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict, out_dir: str) -> list[str]:
    """Writes doctor.json (and doctor.png when there are layers) into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, REPORT_FILE)]
    with open(paths[0], "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    if report["layers"]:
        paths.append(plot_report(report, os.path.join(out_dir, FIGURE_FILE)))
    return paths


__all__ = [
    "ACCURACY_GAP",
    "CAUSES",
    "SHIFT_SIGMA",
    "SMALL_BATCH",
    "VAR_LOG_RATIO",
    "batch_dependence_relevant",
    "format_report",
    "judge",
    "plot_report",
    "write_report",
]
