"""Evaluation with BN running averages against PreciseBN, during training.

Claim (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021, Sec. 3): the EMA
of batch statistics lags the weights it is used with, so evaluation with running
averages underestimates the model while it changes quickly (large momentum) or
collapses (statistics never updated); PreciseBN (population statistics recomputed
with the final weights) removes the lag.

Here: the model and data of ``batch_size`` (tiny ResNet-18 v2, BN over the full
batch of 128), 600 SGD steps (1.3 epochs), evaluated on the test split every 100
steps with the running averages (the trainer's ``eval_every_steps``) and with
PreciseBN statistics from 20 training batches. BN momentum (weight on the old
value) 0.9, 0.99, 0.999, 0.9999, and 1.0 ("never updated": the running averages
stay at their initial mean 0 / variance 1).

PreciseBN at an intermediate step: the trainer computes PreciseBN only at the end
of a run, so the checkpoint of step s (``checkpoint_every_steps`` = the evaluation
interval) is copied with the run's ``config.json`` into a probe workdir and
``nfnets.training.doctor.diagnose`` evaluates it three ways: running averages,
PreciseBN (20 training batches) and train-mode batch statistics (each test batch
normalized by its own statistics, at the run's normalization batch). Its
running-average accuracy must equal the in-training evaluation at s (column
"probe check"). The doctor's verdict on each final workdir is in the table.

The final workdirs stay in ``runs/experiments/running_stats/<key>``.

``--quick``: one stage of width 4, 4 steps, evaluated every 2.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from experiments import grid

MOMENTA = {"m0.9": 0.9, "m0.99": 0.99, "m0.999": 0.999, "m0.9999": 0.9999, "never": 1.0}


def sizes(quick: bool) -> dict:
    model = grid.QUICK_RESNET if quick else grid.TINY_RESNET
    steps, every = (4, 2) if quick else (600, 100)
    return {
        **model,
        **grid.QUIET,
        "batch_size": 64 if quick else 128,
        "eval_batch_size": 64 if quick else 1000,
        "num_train_steps": steps,
        "warmup_epochs": 0.0 if quick else 0.05,
        "log_every_steps": 1 if quick else 50,
        "eval_every_steps": every,
        "checkpoint_every_steps": every,
        "keep_checkpoints": steps // every + 1,
        "precise_bn_batches": 1 if quick else 20,
    }


def cells(quick: bool) -> list[grid.Cell]:
    out = []
    for key, m in MOMENTA.items():
        overrides = {
            **sizes(quick),
            "model_kwargs.norm": "batch_norm",
            "model_kwargs.norm_kwargs": {"momentum": m},
        }
        out.append(grid.Cell(key, "fashion_mnist_norms", overrides, 1, {"momentum": m}))
    return out


def probe(config, workdir: Path, step: int | None = None) -> dict:
    """Test accuracy of the checkpoint at ``step`` (None: the final one) three ways.

    Runs ``nfnets.training.doctor.diagnose`` on a copy holding only that
    checkpoint: running averages, PreciseBN (20 training batches) and train-mode
    batch statistics at the run's normalization batch; also its verdict.
    """
    from nfnets.training.doctor import diagnose

    if step is None:
        d = diagnose(str(workdir), batches=20, sizes=())
    else:
        probe_dir = workdir.parent / f"{workdir.name}.probe{step}"
        if probe_dir.exists():
            shutil.rmtree(probe_dir)
        (probe_dir / "checkpoints").mkdir(parents=True)
        src = workdir / "checkpoints" / str(step)
        shutil.copytree(src, probe_dir / "checkpoints" / str(step))
        shutil.copy(workdir / "config.json", probe_dir / "config.json")
        d = diagnose(str(probe_dir), batches=20, sizes=())
        shutil.rmtree(probe_dir)
    ev = d["eval"]
    return {
        "running": ev["running"]["accuracy"],
        "precise_bn": ev["precise_bn"]["accuracy"],
        "batch_stats": ev["batch_stats"]["accuracy"],
        "causes": d["causes"],
        "verdict": d["verdict"],
    }


def after_cell(cell: grid.Cell, config, workdir: Path, entry: dict) -> dict:
    """The accuracy curves: running averages (in training) and PreciseBN (probes)."""
    records = grid.read_metrics(workdir)
    running = {r["step"]: r["test_accuracy"] for r in records if "test_accuracy" in r}
    total = int(config.num_train_steps)
    curve = []
    for step in sorted(running):
        p = probe(config, workdir, None if step == total else step)
        point = {"step": step, "running": running[step], "probe_running": p["running"]}
        point["precise_bn"] = grid.finite_or_none(p["precise_bn"])
        point["batch_stats"] = grid.finite_or_none(p["batch_stats"])
        curve.append(point)
    final = curve[-1] if curve else {}
    check = [
        abs(p["probe_running"] - p["running"]) for p in curve if p["probe_running"] is not None
    ]
    return {
        "curve": curve,
        "probe_max_abs_diff": max(check) if check else None,
        "test_accuracy_batch_stats": final.get("batch_stats"),
        "doctor_causes": p["causes"] if curve else None,
        "doctor_verdict": p["verdict"] if curve else None,
    }


def table(entries: list[dict]) -> str:
    rows = []
    for e in entries:
        curve = e.get("curve") or []
        gaps = [p["precise_bn"] - p["running"] for p in curve if p.get("precise_bn") is not None]
        rows.append(
            [
                e["key"],
                e["info"]["momentum"],
                grid.pct(e),
                grid.pct(e, "test_accuracy_precise_bn"),
                None if not gaps else f"{100 * max(gaps):+.1f}",
                None if not gaps else f"{100 * sum(gaps) / len(gaps):+.1f}",
                None if e.get("probe_max_abs_diff") is None else f"{e['probe_max_abs_diff']:.1e}",
                _fmt(e.get("test_accuracy_batch_stats")),
                ", ".join(e.get("doctor_causes") or []) or None,
            ]
        )
    headers = [
        "cell",
        "momentum",
        "final, running %",
        "final, PreciseBN %",
        "max gap (points)",
        "mean gap (points)",
        "probe check",
        "final, batch stats %",
        "doctor",
    ]
    text = grid.markdown_table(headers, rows)
    verdicts = [(e["key"], v) for e in entries for v in e.get("doctor_verdict") or []]
    if verdicts:
        text += "\n\n`python -m nfnets.doctor` on each final workdir:\n\n"
        text += "\n".join(f"- {key}: {v}" for key, v in verdicts)
    steps = sorted({p["step"] for e in entries for p in e.get("curve") or []})
    if steps:
        text += "\n\nTest accuracy % during training (running / PreciseBN / batch stats):\n\n"
        curve_rows = []
        for e in entries:
            by_step = {p["step"]: p for p in e.get("curve") or []}
            cells = []
            for s in steps:
                p = by_step.get(s)
                cells.append(
                    None
                    if p is None
                    else "{} / {} / {}".format(
                        _fmt(p["running"]), _fmt(p["precise_bn"]), _fmt(p.get("batch_stats"))
                    )
                )
            curve_rows.append([e["key"], *cells])
        text += grid.markdown_table(["cell", *(f"step {s}" for s in steps)], curve_rows)
    return text


def _fmt(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def plot(entries: list[dict], path: str) -> None:
    fig, axes = grid.new_figure(width=10.0, height=4.8)
    ax = axes[0][0]
    ways = (("running", "o-", "running"), ("precise_bn", "s--", "PreciseBN"))
    ways += (("batch_stats", "^:", "batch stats"),)
    for i, e in enumerate(entries):
        label = f"momentum {e['info']['momentum']}"
        for key, style, name in ways:
            pts = [p for p in e.get("curve") or [] if p.get(key) is not None]
            xs, ys = [p["step"] for p in pts], [100 * p[key] for p in pts]
            ax.plot(xs, ys, style, c=f"C{i}", label=f"{label}, {name}")
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Running averages (solid), PreciseBN (dashed), batch statistics (dotted)")
    # Outside the axes: inside, it covers the curves of the stale cells.
    ax.legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    grid.save_figure(fig, path)


EXPERIMENT = grid.Experiment(
    name="running_stats",
    description=grid.describe(__doc__),
    cells=cells,
    table=table,
    plot=plot,
    after_cell=after_cell,
)

if __name__ == "__main__":
    grid.main(EXPERIMENT, sys.argv[1:])
