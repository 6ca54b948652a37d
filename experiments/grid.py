"""Shared core of the experiments: cells, resume by cell, outputs, environment record.

An experiment is a grid of :class:`Cell` s. A cell is a config file of ``configs/``
(its ``get_config()``) plus a dict of dotted overrides, trained by
``nfnets.training.train``, the library ``train.py`` uses, in its own workdir
``<workdir-root>/<experiment>/<key>``. Results go to ``<out>/<experiment>.json``
(one entry per cell), ``<experiment>.md`` (a table) and ``<experiment>.png``.

Resume: a cell whose key is in the JSON is not rerun unless ``--force`` (all
cells) or ``--only KEY`` (that cell) asks; an interrupted cell resumes from its
workdir's checkpoint (``train`` resumes by itself). A recorded cell whose
overrides differ from its definition now is stale: it is rerun from scratch. A cell
that raises is recorded with status "error" and run again on the next resume (from
its checkpoint: an exception is most often the machine's, out of memory or
threads), one whose run ends with a non-finite
test loss as "diverged", one whose test accuracy is at chance with a finite loss
(an evaluation that collapsed, while training did not) as "at_chance". None of
them stops the grid.

Devices: a cell names the number of (virtual CPU) devices it needs. Cells whose
count differs from this process's run in one child process per count, started
with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (jax fixes the device
count at start-up).

Command line of every experiment module::

    python -m experiments.<name> [--quick] [--only KEY] [--out docs/experiments] [--force]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10  # Fashion-MNIST
CHANCE_MARGIN = 1.5  # accuracy <= 1.5 / num_classes counts as chance
PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "numpy",
    "ml-collections",
    "matplotlib",
)

# The model every norm experiment trains: the small-input pre-activation ResNet-18 of
# configs/fashion_mnist_norms.py cut to three single-block stages of widths 8/16/32
# (stem 8), so that each full experiment fits in about 12 minutes on 2 CPU cores.
TINY_RESNET = {
    "model_kwargs.stem_width": 8,
    "model_kwargs.widths": (8, 16, 32),
    "model_kwargs.depths": (1, 1, 1),
}
# --quick: one stage of width 4 (compiles in about a second), a few steps.
QUICK_RESNET = {
    "model_kwargs.stem_width": 4,
    "model_kwargs.widths": (4,),
    "model_kwargs.depths": (1,),
}
# Output switches shared by every cell: per-cell progress lines replace the bar.
QUIET = {"progress_bar": False, "tensorboard": False}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of a grid.

    Attributes:
      key: unique name within the experiment (``--only KEY``, JSON ``key``).
      config: module name in ``configs/`` whose ``get_config()`` starts the config.
      overrides: dotted config keys -> values, applied in order (the full record).
      devices: virtual devices the run needs (0: any count, for custom runners).
      info: labels for tables and figures (norm, normalization batch, lr, ...).
    """

    key: str
    config: str
    overrides: dict[str, Any]
    devices: int = 1
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """What an experiment module defines; ``main`` runs it.

    Attributes:
      name: module name; also the file stem of the outputs.
      description: markdown paragraph for the top of ``<name>.md`` (sizes, claim).
      cells: ``quick -> cells``.
      table: ``entries -> markdown`` (entries in cell order).
      plot: ``(entries, png_path) -> None``.
      after_cell: optional ``(cell, config, workdir, entry) -> extra fields``, e.g.
        curves read from ``metrics.jsonl`` or extra evaluations.
      run_cells: optional custom runner ``(cells_to_run, all_cells, ctx) ->
        entries`` replacing training (the throughput experiment).
      reads_results: ``cells`` is ``(quick, out) -> cells``: the cells depend on
        results recorded under ``out`` (a recipe chosen there, a budget search that
        adds cells as earlier ones finish); ``main`` runs until none is pending.
    """

    name: str
    description: str
    cells: Callable[[bool], list[Cell]]
    table: Callable[[list[dict]], str]
    plot: Callable[[list[dict], str], None]
    after_cell: Callable[..., dict] | None = None
    run_cells: Callable[..., list[dict]] | None = None
    reads_results: bool = False


@dataclasses.dataclass(frozen=True)
class Context:
    """Options of one invocation (paths absolute)."""

    quick: bool
    out: Path
    workdir_root: Path
    data_dir: str
    force: bool
    only: tuple[str, ...]
    cache_dir: Path

    def workdir(self, experiment: str, key: str) -> Path:
        return self.workdir_root / experiment / key


# ----------------------------------------------------------------------------- configs


def experiment_cells(exp: Experiment, ctx: Context) -> list[Cell]:
    """``exp``'s cells now (they may depend on results recorded under ``ctx.out``)."""
    return exp.cells(ctx.quick, ctx.out) if exp.reads_results else exp.cells(ctx.quick)


def build_config(cell: Cell, data_dir: str = ""):
    """``configs.<cell.config>.get_config()`` with ``cell.overrides`` (and ``data_dir``)."""
    module = importlib.import_module(f"configs.{cell.config}")
    config = module.get_config()
    apply_overrides(config, cell.overrides)
    if data_dir:
        config.data_dir = data_dir
    return config


def apply_overrides(config, overrides: dict[str, Any]) -> None:
    """Sets dotted keys; new keys only inside ``model_kwargs`` (model fields)."""
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for part in parents:
            if part not in node:
                raise KeyError(f"override {dotted!r}: the config has no {part!r}")
            node = node[part]
        if leaf not in node and "model_kwargs" not in parents:
            raise KeyError(f"override {dotted!r}: the config has no key {leaf!r}")
        node[leaf] = tuple(value) if isinstance(value, list) else value


# ----------------------------------------------------------------------------- records


def environment() -> dict[str, Any]:
    """Package versions, machine and the git commit of the code (dirty = uncommitted)."""
    import jax

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    cpu = ""
    if os.path.exists("/proc/cpuinfo"):
        names = re.findall(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        cpu = names[0].strip() if names else ""
    mem_gb = None
    if os.path.exists("/proc/meminfo"):
        m = re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text())
        mem_gb = round(int(m.group(1)) / 2**20, 1) if m else None
    machine = {
        "platform": platform.platform(),
        "cpu": cpu or platform.processor(),
        "cpu_count": os.cpu_count(),
        "memory_gb": mem_gb,
        "jax_backend": jax.default_backend(),
        "jax_devices": jax.device_count(),
    }
    return {"versions": versions, "machine": machine, "git": git_state()}


def git_state() -> dict[str, Any]:
    """HEAD commit and whether the code (not the results) differs from it."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)

    head = git("rev-parse", "HEAD")
    if head.returncode:
        return {"commit": None, "dirty": None}
    code = ["experiments", "nfnets", "norms", "configs", "train.py"]
    dirty = git("diff", "--quiet", "HEAD", "--", *code).returncode != 0
    return {"commit": head.stdout.strip(), "dirty": dirty}


LIBRARY = ("norms", "nfnets")  # the code whose version decides a cell's numbers


def library_code(commit: str | None) -> str | None:
    """Git tree ids of ``norms/`` and ``nfnets/`` at ``commit`` (None if unknown).

    Two cells with the same value ran the same library code, whatever else
    changed between their commits (docs, experiments, tests).
    """
    if not commit:
        return None
    out = subprocess.run(
        ["git", "rev-parse", *(f"{commit}:{path}" for path in LIBRARY)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    return None if out.returncode else "+".join(t[:12] for t in out.stdout.split())


def current_library_code() -> str | None:
    """:func:`library_code` of HEAD, or None when ``norms/``/``nfnets/`` have edits."""
    dirty = subprocess.run(
        ["git", "diff", "--quiet", "HEAD", "--", *LIBRARY], cwd=REPO, capture_output=True
    )
    return None if dirty.returncode else library_code(git_state()["commit"])


def stale_code_keys(entries: Sequence[dict]) -> list[str]:
    """Keys of cells whose library code differs from the majority's (or is unknown)."""
    codes = [e.get("library_code") for e in entries]
    known = [c for c in codes if c]
    if not known:
        return [e["key"] for e in entries]
    majority = max(sorted(set(known)), key=known.count)
    return [e["key"] for e in entries if e.get("library_code") != majority]


def finite_or_none(x: Any) -> Any:
    """JSON-safe number: non-finite floats become None (JSON has no NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def cell_status(summary: dict, error: str | None) -> str:
    """ "error" (raised), "diverged" (non-finite or missing test loss), "at_chance"
    (test accuracy <= 1.5 / classes with a finite loss) or "ok".

    ``summary`` is the run's summary or a recorded cell entry (same test keys).
    """
    if error is not None:
        return "error"
    loss, acc = summary.get("test_loss"), summary.get("test_accuracy")
    if loss is None or not math.isfinite(loss):
        return "diverged"
    if acc is None or acc <= CHANCE_MARGIN / NUM_CLASSES:
        return "at_chance"
    return "ok"


def describe(module_doc: str) -> str:
    """An experiment's ``description``: its module docstring without the title line
    and without the closing ``--quick`` paragraph."""
    return module_doc.split("\n\n", 1)[1].rsplit("``--quick``", 1)[0]


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """The records of ``workdir/metrics.jsonl`` (one JSON object per line, with ``step``)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_results(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {}


def results_text(results: dict) -> str:
    """The JSON text of an experiment's results, as committed."""
    return json.dumps(results, indent=1, sort_keys=False) + "\n"


def save_results(path: Path, results: dict) -> None:
    """Atomic write (a killed run never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(results_text(results))
    os.replace(tmp, path)


def record_entry(exp: Experiment, ctx: Context, entry: dict) -> None:
    """Adds/replaces one cell's entry in the experiment's JSON (re-read first)."""
    path = ctx.out / f"{exp.name}.json"
    results = load_results(path)
    cells = [e for e in results.get("cells", []) if e["key"] != entry["key"]]
    results.update(
        experiment=exp.name, quick=ctx.quick, environment=environment(), cells=[*cells, entry]
    )
    save_results(path, results)


# ----------------------------------------------------------------------------- running


def run_cell(exp: Experiment, cell: Cell, ctx: Context, fresh: bool) -> dict | None:
    """Trains one cell; returns its JSON entry (None if interrupted by a signal)."""
    from nfnets.training import train

    config = build_config(cell, ctx.data_dir)
    workdir = ctx.workdir(exp.name, cell.key)
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    t0, c0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    error = None
    try:
        summary = train(config, str(workdir))
    except Exception as e:  # noqa: BLE001 - a run that raises is a diverged cell
        traceback.print_exc()
        summary, error = {}, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    if summary.get("interrupted"):
        return None
    status = cell_status(summary, error)
    entry = {
        "key": cell.key,
        "config": f"configs/{cell.config}.py",
        "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in cell.overrides.items()},
        "seed": int(config.seed),
        "devices": cell.devices,
        "info": cell.info,
        "status": status,
        "diverged": status in ("error", "diverged"),
        "at_chance": status == "at_chance",
        "error": error,
        **{
            k: finite_or_none(v)
            for k, v in summary.items()
            if k.startswith(("test_", "validation_"))
        },
        "steps": summary.get("steps"),
        "skipped_steps": summary.get("skipped_steps"),
        "wall_time_s": summary.get("wall_time_s"),
        "images_per_sec": summary.get("images_per_sec"),
        "cell_time_s": time.perf_counter() - t0,
        "cpu_time_s": time.process_time() - c0,
        "load_avg_1m": [load0, os.getloadavg()[0]],
        "workdir": os.path.relpath(workdir, REPO),
        "git_commit": git_state()["commit"],
        "library_code": current_library_code(),
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if exp.after_cell is not None and error is None:
        entry.update(exp.after_cell(cell, config, workdir, entry))
    return entry


def recorded_overrides(cell: Cell) -> dict:
    """``cell.overrides`` as its JSON entry holds them (tuples become lists)."""
    return json.loads(json.dumps(cell.overrides))


def stale_keys(cells: list[Cell], recorded: list[dict]) -> set[str]:
    """Keys of recorded cells whose overrides differ from the cell's definition now."""
    by_key = {e["key"]: e for e in recorded}
    return {
        c.key
        for c in cells
        if c.key in by_key and by_key[c.key].get("overrides") != recorded_overrides(c)
    }


def error_keys(path: Path) -> set[str]:
    """Keys of the recorded cells of ``path`` whose run raised."""
    return {e["key"] for e in load_results(path).get("cells", []) if e.get("status") == "error"}


def pending_cells(exp: Experiment, cells: list[Cell], ctx: Context) -> list[Cell]:
    """Cells to run now: unfinished or stale ones, ``--only`` ones, or all with ``--force``."""
    keys = [c.key for c in cells]
    unknown = sorted(set(ctx.only) - set(keys))
    if unknown:
        raise SystemExit(f"--only {unknown}: no such cell in {exp.name}; cells: {', '.join(keys)}")
    if ctx.only:
        return [c for c in cells if c.key in ctx.only]
    if ctx.force:
        return list(cells)
    recorded = load_results(ctx.out / f"{exp.name}.json").get("cells", [])
    done = {e["key"] for e in recorded} - stale_keys(cells, recorded)
    done -= error_keys(ctx.out / f"{exp.name}.json")
    return [c for c in cells if c.key not in done]


def child_command(exp: Experiment, ctx: Context, devices: int) -> tuple[list[str], dict]:
    """Command and environment of the child process that runs the ``devices`` cells."""
    cmd = [sys.executable, "-m", f"experiments.{exp.name}", "--devices", str(devices)]
    cmd += ["--out", str(ctx.out), "--workdir-root", str(ctx.workdir_root)]
    cmd += ["--cache-dir", str(ctx.cache_dir)]
    cmd += ["--quick"] * ctx.quick + ["--force"] * ctx.force
    cmd += ["--data-dir", ctx.data_dir] if ctx.data_dir else []
    for key in ctx.only:
        cmd += ["--only", key]
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags.strip()} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"  # virtual devices exist only on the host platform
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return cmd, env


def enable_compilation_cache(directory: Path) -> None:
    """JAX's persistent compilation cache: cells share many programs (optimizer, eval)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run_grid(exp: Experiment, ctx: Context, devices_only: int | None) -> None:
    """Runs the pending cells: this process's device count here, others in children."""
    import jax

    enable_compilation_cache(ctx.cache_dir)

    cells = experiment_cells(exp, ctx)
    todo = pending_cells(exp, cells, ctx)
    skipped = 0 if ctx.force or ctx.only else len(cells) - len(todo)
    if devices_only is not None:
        todo = [c for c in todo if c.devices == devices_only]
    if skipped and devices_only is None:
        print(f"[{exp.name}] {skipped} cell(s) finished already (--force or --only reruns)")
    fresh = ctx.force or bool(ctx.only)
    stale = stale_keys(cells, load_results(ctx.out / f"{exp.name}.json").get("cells", []))
    if stale and devices_only is None:
        print(f"[{exp.name}] rerun from scratch, overrides changed: {', '.join(sorted(stale))}")
    errored = [c.key for c in todo if c.key in error_keys(ctx.out / f"{exp.name}.json")]
    if errored and devices_only is None and not fresh:
        print(f"[{exp.name}] run again, raised last time: {', '.join(errored)}")
    if exp.run_cells is not None:
        for entry in exp.run_cells(todo, cells, ctx) if todo else []:
            record_entry(exp, ctx, entry)
        return
    here = jax.device_count()
    local = [c for c in todo if c.devices in (0, here)]
    for i, cell in enumerate(local, 1):
        print(f"[{exp.name}] cell {i}/{len(local)} {cell.key} ({here} device(s))", flush=True)
        entry = run_cell(exp, cell, ctx, fresh or cell.key in stale)
        if entry is None:
            raise SystemExit(f"[{exp.name}] interrupted in cell {cell.key}; rerun to resume")
        record_entry(exp, ctx, entry)
        acc = entry.get("test_accuracy")
        print(
            f"[{exp.name}] cell {cell.key}: {entry['status']}, test accuracy "
            f"{acc if acc is None else round(acc, 4)}, {entry['cell_time_s']:.0f} s",
            flush=True,
        )
    if devices_only is not None:
        return
    for devices in sorted({c.devices for c in todo} - {0, here}):
        n = sum(c.devices == devices for c in todo)
        print(f"[{exp.name}] {n} cell(s) on {devices} devices: child process", flush=True)
        cmd, env = child_command(exp, ctx, devices)
        rc = subprocess.run(cmd, env=env, cwd=REPO).returncode
        if rc:
            raise SystemExit(f"[{exp.name}] the {devices}-device child process failed (rc {rc})")


def render(exp: Experiment, ctx: Context) -> tuple[dict, list[dict], str]:
    """``(results, entries, markdown)`` of ``<name>.json``: entries in cell order.

    The order is the experiment's cell order where its cells can be listed (a stage
    that waits for the recipe cannot list them yet: then the recorded order).
    """
    results = load_results(ctx.out / f"{exp.name}.json")
    recorded = results.get("cells", [])
    by_key = {e["key"]: e for e in recorded}
    try:
        order = [c.key for c in experiment_cells(exp, ctx)]
    except SystemExit:
        order = [e["key"] for e in recorded]
    entries = [by_key[k] for k in order if k in by_key]
    if "environment" not in results:
        results["environment"] = environment()
    results.update(experiment=exp.name, quick=ctx.quick, cells=entries)
    results["total_cell_time_s"] = sum(e.get("cell_time_s") or 0.0 for e in entries)
    return results, entries, markdown_page(exp, results, entries)


def write_outputs(exp: Experiment, ctx: Context) -> list[dict]:
    """``<name>.json`` in cell order, ``<name>.md`` and ``<name>.png`` from it."""
    results, entries, markdown = render(exp, ctx)
    save_results(ctx.out / f"{exp.name}.json", results)
    exp.plot(entries, str(ctx.out / f"{exp.name}.png"))
    (ctx.out / f"{exp.name}.md").write_text(markdown)
    return entries


def markdown_page(exp: Experiment, results: dict, entries: list[dict]) -> str:
    env = results["environment"]
    v, m, g = env["versions"], env["machine"], env["git"]
    commits = sorted({e.get("git_commit") or "?" for e in entries})
    lines = [
        f"# Experiment `{exp.name}`{' (--quick: NOT a result)' if results['quick'] else ''}",
        "",
        exp.description.strip(),
        "",
        f"![{exp.name}]({exp.name}.png)",
        "",
        exp.table(entries).strip(),
        "",
        f"Cells: {len(entries)}; compute: {results['total_cell_time_s'] / 60:.1f} min of "
        "wall time in all (shared 2-core machine; see `cpu_time_s` and `load_avg_1m` "
        f"in `{exp.name}.json`).",
        f"Code: commit(s) {', '.join(c[:10] for c in commits)}"
        f"{' (uncommitted changes)' if g.get('dirty') else ''}. "
        f"{stale_code_note(exp.name, entries)}"
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, {m['memory_gb']} GB. "
        + "Packages: "
        + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        "",
    ]
    return "\n".join(lines)


def stale_code_note(name: str, entries: Sequence[dict]) -> str:
    stale = stale_code_keys(entries)
    if not stale:
        return "Every cell ran the same `norms/` and `nfnets/` code. "
    return (
        f"Cells whose `norms/`/`nfnets/` code differs from the majority's: {', '.join(stale)} "
        f"(`python -m experiments.{name} --stale-code` reruns them). "
    )


# ----------------------------------------------------------------------------- tables


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; ``None`` cells print as an em dash."""

    def fmt(x: Any) -> str:
        return "—" if x is None else str(x)

    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(out)


def pct(entry: dict | None, key: str = "test_accuracy") -> str | None:
    """Accuracy as a percentage string; diverged and at-chance runs marked."""
    if entry is None:
        return None
    x = entry.get(key)
    s = "n/a" if x is None else f"{100 * x:.1f}"
    if key != "test_accuracy":
        return s
    mark = {"error": " (error)", "diverged": " (diverged)", "at_chance": " (at chance)"}
    return s + mark.get(cell_status(entry, entry.get("error")), "")


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.2):
    """A matplotlib figure on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)


def legend_below(ax, ncol: int = 2) -> None:
    """The legend under the axes, off the data (none when nothing is labelled)."""
    if not ax.get_legend_handles_labels()[0]:
        return
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=ncol, fontsize=7, frameon=False)


def save_figure(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI


def parse_args(name: str, argv: Sequence[str] | None) -> tuple[Context, int | None]:
    p = argparse.ArgumentParser(prog=f"python -m experiments.{name}")
    p.add_argument("--quick", action="store_true", help="every cell, a few steps (tests)")
    p.add_argument("--only", action="append", default=[], help="rerun this cell (repeatable)")
    p.add_argument("--out", default="docs/experiments", help="folder of the JSON/MD/PNG")
    p.add_argument("--force", action="store_true", help="rerun finished cells too")
    p.add_argument(
        "--stale-code",
        action="store_true",
        help="rerun the cells whose norms/ and nfnets/ code differs from the majority's",
    )
    p.add_argument("--workdir-root", default="runs/experiments", help="cell workdirs go here")
    p.add_argument("--data-dir", default="", help="Fashion-MNIST IDX folder (default: config)")
    p.add_argument(
        "--cache-dir", default="", help="JAX compilation cache (default: <workdir-root>/.jax_cache)"
    )
    p.add_argument("--devices", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    ctx = Context(
        quick=a.quick,
        out=Path(a.out).resolve(),
        workdir_root=Path(a.workdir_root).resolve(),
        data_dir=str(Path(a.data_dir).resolve()) if a.data_dir else "",
        force=a.force,
        only=tuple(k for arg in a.only for k in arg.split(",") if k),
        cache_dir=Path(a.cache_dir or Path(a.workdir_root) / ".jax_cache").resolve(),
    )
    if a.stale_code:
        if ctx.only:
            p.error("--stale-code chooses the cells itself; drop --only")
        recorded = load_results(ctx.out / f"{name}.json").get("cells", [])
        stale = tuple(stale_code_keys(recorded))
        print(f"[{name}] --stale-code: {', '.join(stale) or 'no cell'} to rerun", flush=True)
        if not stale:
            raise SystemExit(0)
        ctx = dataclasses.replace(ctx, only=stale)
    return ctx, a.devices


def main(exp: Experiment, argv: Sequence[str] | None = None) -> list[dict]:
    """Runs ``exp`` per the command line; returns the entries written (cell order)."""
    ctx, devices_only = parse_args(exp.name, argv)
    existing = load_results(ctx.out / f"{exp.name}.json")
    if existing and existing.get("quick") != ctx.quick and not ctx.force:
        raise SystemExit(
            f"{ctx.out / exp.name}.json holds {'--quick' if existing['quick'] else 'full'} "
            "results; use another --out or --force to replace them"
        )
    if devices_only is not None:
        import jax

        if jax.device_count() != devices_only:
            raise SystemExit(f"--devices {devices_only}: jax sees {jax.device_count()} devices")
    run_grid(exp, ctx, devices_only)
    if devices_only is not None:
        return []
    # Cells that depend on results (a budget search) appear as earlier ones finish.
    while exp.reads_results and pending_cells(exp, experiment_cells(exp, ctx), ctx):
        if ctx.only or ctx.force:
            break
        run_grid(exp, ctx, None)
    return write_outputs(exp, ctx)
