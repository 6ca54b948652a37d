"""Training outputs: metrics.jsonl, TensorBoard events, a console progress bar (tqdm),
summary.json and a PNG of the training curves.

Every record is a flat dict with an integer ``"step"`` and float values; the
same record goes to ``metrics.jsonl`` (one JSON object per line) and to
TensorBoard (one scalar per key). Only the writing process (process 0 in a
multi-host run) should create these objects.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CURVES_FILE = "training_curves.png"
SUMMARY_KEYS = ("test_accuracy", "test_loss", "steps", "wall_time_s", "images_per_sec")


class MetricsFileError(ValueError):
    """metrics.jsonl holds a line that is not JSON (other than a torn last line)."""


def _parse_metrics(path: str) -> tuple[list[dict], bool]:
    """``(records, torn)``: ``torn`` when the last line was cut off mid-write (it is left out).

    A crash while writing leaves a last line without its newline; any other line
    that is not JSON raises ``MetricsFileError`` naming the file, the line and the fix.
    """
    with open(path) as f:
        text = f.read()
    lines = text.split("\n")
    records, torn = [], False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines) and not text.endswith("\n"):
                torn = True  # the last write was interrupted
                continue
            raise MetricsFileError(
                f"{path}: line {number} is not JSON ({e.msg}); delete that line (or the "
                "file, losing the earlier curves) and rerun"
            ) from None
    return records, torn


def read_metrics(workdir: str) -> list[dict]:
    """All records of ``workdir/metrics.jsonl`` in file order ([] when absent).

    A torn last line (a crash mid-write) is left out; any other bad line raises
    ``MetricsFileError``.
    """
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    return _parse_metrics(path)[0]


def truncate_metrics(workdir: str, last_step: int) -> str | None:
    """Drops records with ``step > last_step`` (written after the checkpoint a run resumes from).

    So a resumed run's metrics.jsonl is the same as an uninterrupted run's, without
    duplicated steps. A torn last line is dropped too; returns a message saying so
    (None when there was none).
    """
    path = os.path.join(workdir, METRICS_FILE)
    records, torn = _parse_metrics(path) if os.path.exists(path) else ([], False)
    records = [r for r in records if r["step"] <= last_step]
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    if torn:
        return f"{path}: dropped a torn last line (the previous run stopped mid-write)"
    return None


class TensorBoardScalars:
    """Scalars appended to a TensorBoard event file in ``logdir`` and flushed at once.

    tensorboardX's ``SummaryWriter`` hands events to a background thread that writes
    them every ``flush_secs`` (and its ``flush`` does not wait for that thread), so a
    killed run lost its events. This writes them synchronously through tensorboardX's
    own ``EventsWriter`` and ``summary.scalar``, so the event file holds at least
    what metrics.jsonl holds.
    """

    def __init__(self, logdir: str):
        from tensorboardX.event_file_writer import EventsWriter

        os.makedirs(logdir, exist_ok=True)
        self._writer = EventsWriter(os.path.join(logdir, "events"))
        self._writer.flush()

    def write(self, step: int, values: dict[str, float]) -> None:
        """One scalar event per key at ``step``, then a flush to disk."""
        from tensorboardX.proto import event_pb2
        from tensorboardX.summary import scalar

        for tag, value in values.items():
            summary = scalar(tag, float(value))
            event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary)
            self._writer.write_event(event)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MetricsWriter:
    """Appends records to ``metrics.jsonl`` and TensorBoard event files in ``workdir``."""

    def __init__(self, workdir: str, *, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self.workdir = workdir
        self._file = open(os.path.join(workdir, METRICS_FILE), "a")  # noqa: SIM115
        self._tb = TensorBoardScalars(os.path.join(workdir, "tensorboard")) if tensorboard else None

    def write(self, step: int, record: dict[str, float]) -> None:
        """Writes ``{"step": step, **record}``; a None or non-finite value is stored as null
        in JSON and left out of TensorBoard. Both files are flushed."""
        clean = {}
        for k, v in record.items():
            v = float("nan") if v is None else v
            v = float(v) if not isinstance(v, str) else v
            clean[k] = v if isinstance(v, str) or math.isfinite(v) else None
        self._file.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._file.flush()
        if self._tb is not None:
            self._tb.write(
                step, {k: v for k, v in clean.items() if v is not None and not isinstance(v, str)}
            )

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class ProgressBar:
    """A ``tqdm`` bar over the training steps with the last logged loss, accuracy, images/s.

    ``step/total [elapsed, ETA remaining, loss .. acc .. img/s]``; the ETA is tqdm's,
    from the average rate of this run (``smoothing=0``; a resumed run starts at
    ``initial`` so its rate counts only its own steps). tqdm redraws at most every
    ``min_interval_s`` seconds, so ``update`` is cheap to call every step.
    """

    def __init__(self, total_steps: int, *, initial: int = 0, stream=None, min_interval_s=0.5):
        from tqdm import tqdm

        self._stream = stream if stream is not None else sys.stderr
        self._bar = tqdm(
            total=max(int(total_steps), 1),
            initial=int(initial),
            file=self._stream,
            mininterval=min_interval_s,
            smoothing=0.0,
            unit="step",
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, ETA {remaining}{postfix}]",
        )

    @staticmethod
    def fields(info: dict[str, float]) -> str:
        """``info`` (keys loss, accuracy, images_per_sec; all optional) as the bar's postfix."""
        parts = []
        if "loss" in info:
            parts.append(f"loss {info['loss']:.4f}")
        if "accuracy" in info:
            parts.append(f"acc {info['accuracy']:.4f}")
        if "images_per_sec" in info:
            parts.append(f"{info['images_per_sec']:.0f} img/s")
        return ", ".join(parts)

    def update(self, step: int, info: dict[str, float]) -> None:
        """Moves the bar to ``step`` and shows ``info``."""
        self._bar.set_postfix_str(self.fields(info), refresh=False)
        self._bar.update(step - self._bar.n)

    def message(self, text: str) -> None:
        """Prints ``text`` on its own line without breaking the bar."""
        self._bar.write(text, file=self._stream)

    def close(self) -> None:
        self._bar.close()


def strict_json(value):
    """``value`` with every non-finite float replaced by None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_summary(workdir: str, summary: dict) -> str:
    """Writes ``workdir/summary.json`` as strict JSON (null where there is no number).

    It must hold every key of ``SUMMARY_KEYS`` (their value may be None).
    """
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    if missing:
        raise ValueError(f"summary is missing keys {missing}; it needs {list(SUMMARY_KEYS)}")
    path = os.path.join(workdir, SUMMARY_FILE)
    with open(path, "w") as f:
        json.dump(strict_json(summary), f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")
    return path


def plot_curves(records: Iterable[dict], path: str) -> str:
    """Plots train loss/accuracy and every ``validation_*`` / ``test_*`` accuracy/loss
    against step into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = list(records)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    keys = sorted({k for r in records for k in r if k != "step"})
    for key, ax in (("loss", ax_loss), ("accuracy", ax_acc)):
        for k in keys:
            if not k.endswith(key) or not k.startswith(("train", "validation", "test")):
                continue
            pts = [(r["step"], r[k]) for r in records if r.get(k) is not None]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker=None if k.startswith("train") else "o", label=k)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
