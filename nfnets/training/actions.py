"""The periodic actions of the training loop, in the spirit of clu's ``periodic_actions``.

After every training step the loop calls each action in order with the shared
:class:`RunState`; an action decides itself whether this step is one of its
steps. In order: :class:`LogMetrics` (read and reset the metric sums, write a
record), :class:`ShowProgress` (the console bar), :class:`PeriodicEvaluation`,
:class:`PeriodicCheckpoint` (orbax's save-interval policy) and
:class:`StopOnSignal` (SIGTERM/SIGINT or ``stop_at_step``: checkpoint, then end
the loop) and :class:`StopOnDivergence` (see :mod:`nfnets.training.health`: end
the loop without a checkpoint, so the last good one is kept). Every action that
reads the model first merges the running statistics across devices, and the
metric sums live in the checkpointed state, so a resumed run repeats an
uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from nfnets.training import health
from nfnets.training.checkpoints import Checkpointer
from nfnets.training.outputs import MetricsWriter, ProgressBar
from nfnets.training.step import TrainState


@dataclasses.dataclass
class RunState:
    """What the loop and its actions share: the replicated state and the clocks.

    Attributes:
      p_state: the training state in the device layout of ``config.parallelism``.
      step: steps done so far (the data position).
      start_step: the step this process started (or resumed) at.
      prior_time: training seconds spent before this process resumed.
      t0: ``time.perf_counter()`` when this process's loop started.
      info: the last logged ``loss``, ``accuracy`` and ``images_per_sec`` (for the bar).
      interrupted: set by :class:`StopOnSignal`; the loop ends after this step.
      diverged: ``(step, reason)`` once the run diverged (the loop ends after this step).
    """

    p_state: TrainState
    step: int
    start_step: int
    prior_time: float
    t0: float
    info: dict[str, float] = dataclasses.field(default_factory=dict)
    interrupted: bool = False
    diverged: tuple[int, str] | None = None

    def train_time(self) -> float:
        """Seconds in the training loop, summed over resumed runs."""
        return self.prior_time + time.perf_counter() - self.t0


def checkpoint_meta(config: ml_collections.ConfigDict, train_time: float) -> dict[str, Any]:
    """The JSON record saved next to the state: wall time so far and the config."""
    return {"train_time_s": train_time, "config": json.loads(config.to_json_best_effort())}


def save_checkpoint(trainer, ckpt: Checkpointer, run: RunState) -> None:
    """Merges the running statistics across devices, then saves the host state at ``run.step``."""
    run.p_state = trainer.sync_stats(run.p_state)
    meta = checkpoint_meta(trainer.config, run.train_time())
    ckpt.save(run.step, trainer.host_state(run.p_state), meta)


def say(bar: ProgressBar | None, text: str) -> None:
    """A console line that does not break the progress bar."""
    if bar is not None:
        bar.message(text)
    else:
        print(text, flush=True)


class LogMetrics:
    """Every ``log_every_steps`` and at the last step: mean train metrics since the last log.

    Reads and resets the metric sums in the state, so the window of a record is the
    same whether or not the run was resumed inside it.
    """

    def __init__(self, trainer, writer: MetricsWriter | None, bar: ProgressBar | None, run):
        self.trainer, self.writer, self.bar = trainer, writer, bar
        self.every = trainer.config.log_every_steps
        self.last_t, self.last_step = run.t0, run.step

    def __call__(self, run: RunState) -> None:
        plan, step = self.trainer.plan, run.step
        if step % self.every and step != plan.total_steps:
            return
        run.p_state, sums = self.trainer.read_metrics(run.p_state)
        now = time.perf_counter()
        good = int(sums["steps"])
        images = (step - self.last_step) * self.trainer.config.batch_size
        # An interval whose steps were all skipped has no loss: NaN (null in JSON), never 0.
        run.info = {
            "loss": float(sums["loss"]) / good if good else math.nan,
            "accuracy": float(sums["accuracy"]) / good if good else math.nan,
            "images_per_sec": images / (now - self.last_t),
        }
        skipped = int(sums["skipped"])
        if skipped and self.trainer.is_writer:
            say(self.bar, f"step {step}: skipped {skipped} non-finite step(s)")
        self.last_t, self.last_step = now, step
        if self.writer:
            self.writer.write(
                step,
                {
                    "train_loss": run.info["loss"],
                    "train_accuracy": run.info["accuracy"],
                    "learning_rate": float(self.trainer.schedule(step - 1)),
                    "skipped_steps": skipped,
                    "epoch": step / plan.steps_per_epoch,
                    "images_per_sec": run.info["images_per_sec"],
                },
            )


class ShowProgress:
    """Every step: moves the console bar (tqdm redraws at most twice a second)."""

    def __init__(self, bar: ProgressBar):
        self.bar = bar

    def __call__(self, run: RunState) -> None:
        self.bar.update(run.step, run.info)


class PeriodicEvaluation:
    """Every ``eval_every_steps`` before the last step (which the final evaluation covers)."""

    def __init__(self, trainer, writer: MetricsWriter | None):
        self.trainer, self.writer = trainer, writer
        self.every = trainer.config.eval_every_steps

    def __call__(self, run: RunState) -> None:
        if not self.every or run.step % self.every or run.step >= self.trainer.plan.total_steps:
            return
        run.p_state = self.trainer.sync_stats(run.p_state)
        results = self.trainer.eval_all(run.p_state)
        if self.writer:
            self.writer.write(
                run.step, {k: v for k, v in results.items() if not k.endswith("_count")}
            )
        reason = health.eval_reason(results)
        if reason and run.diverged is None:
            run.diverged = (run.step, reason)


class PeriodicCheckpoint:
    """At the steps orbax's save-interval policy picks (``Checkpointer.should_save``);
    never once the run diverged (the last checkpoint stays the last good state)."""

    def __init__(self, trainer, ckpt: Checkpointer):
        self.trainer, self.ckpt = trainer, ckpt

    def __call__(self, run: RunState) -> None:
        if run.diverged is None and self.ckpt.should_save(run.step):
            save_checkpoint(self.trainer, self.ckpt, run)


class StopOnSignal:
    """On SIGTERM/SIGINT (or at ``stop_at_step``) before the last step: checkpoint and stop.

    Use as a context manager: it installs the signal handlers (main thread only)
    and restores the old ones on exit.
    """

    def __init__(self, trainer, ckpt: Checkpointer, bar, stop_at_step: int | None = None):
        self.trainer, self.ckpt, self.bar = trainer, ckpt, bar
        self.stop_at_step = stop_at_step
        self.signum = None
        self._old = {}

    def __enter__(self) -> StopOnSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def __call__(self, run: RunState) -> None:
        if self.stop_at_step is not None and run.step == self.stop_at_step:
            self.signum = signal.SIGTERM
        if self.signum is None or run.diverged or run.step >= self.trainer.plan.total_steps:
            return
        save_checkpoint(self.trainer, self.ckpt, run)
        say(self.bar, f"signal {self.signum}: saved checkpoint at step {run.step}; rerun to resume")
        run.interrupted = True


class StopOnDivergence:
    """Ends a run whose longest streak of skipped steps reached the configured limit.

    Reads one counter every ``min(log_every_steps, max_consecutive_skipped_steps)``
    steps and at the last step (the state tracks the longest streak, so no streak
    is missed between reads). Saves nothing: the last checkpoint is the last good one.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.limit = int(trainer.config.max_consecutive_skipped_steps)
        self.every = min(self.limit, trainer.config.log_every_steps) if self.limit else 0

    def __call__(self, run: RunState) -> None:
        last = run.step == self.trainer.plan.total_steps
        if not self.every or run.diverged or (run.step % self.every and not last):
            return
        # One device's copy (no gather): the counter is equal on every device.
        streak = run.p_state.longest_skip_streak.addressable_data(0)
        longest = int(np.asarray(streak).reshape(-1)[0])
        reason = health.streak_reason(longest, self.limit)
        if reason:
            run.diverged = (run.step, reason)


def wait(run: RunState) -> float:
    """Blocks until the last step finished; returns the seconds this process's loop took."""
    jax.block_until_ready(run.p_state)
    return time.perf_counter() - run.t0
