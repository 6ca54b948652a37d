"""Is the run still training? Divergence rules and the health fields of summary.json.

A run has *diverged* (the loop stops it, keeps its last good checkpoint, writes
``summary.json`` with ``"diverged": true`` and ``train.py`` exits non-zero) when

- ``config.max_consecutive_skipped_steps`` (> 0) training steps in a row were
  skipped by the non-finite guard (the state counts the longest such run, so a
  streak is seen even between two checks), or
- an evaluation gives a non-finite test loss.

A loss can also blow up without ever becoming non-finite (an SGD + batch-norm run
reaching 1e16, say). That is not stopped, but flagged: ``loss_exploded`` is True
when the largest logged train loss exceeds ``EXPLODED_FACTOR * ln(num_classes)``,
i.e. a hundred times the loss of a uniform guess, which no healthy run reaches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

EXPLODED_FACTOR = 100.0
ADVICE = "lower learning_rate or enable agc_clip"


class TrainingDiverged(RuntimeError):
    """The run diverged; the message says where and what to change. ``summary`` is the
    summary dict also written to summary.json."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


def divergence_message(step: int, reason: str) -> str:
    """``"diverged at step N (reason); lower learning_rate or enable agc_clip"``."""
    return f"diverged at step {step} ({reason}); {ADVICE}"


def streak_reason(longest: int, limit: int) -> str | None:
    """Why a skip streak of ``longest`` steps means divergence under ``limit`` (0 = off)."""
    if limit and longest >= limit:
        return f"{longest} non-finite steps in a row, max_consecutive_skipped_steps={limit}"
    return None


def eval_reason(results: dict) -> str | None:
    """Why evaluation ``results`` ({"test_loss": ...}) mean divergence, or None."""
    loss = results.get("test_loss")
    if loss is not None and not math.isfinite(loss):
        return f"test_loss is {loss}"
    return None


def loss_health(records: Iterable[dict], num_classes: int) -> dict:
    """``{"max_train_loss": float | None, "loss_exploded": bool}`` over metrics records."""
    losses = [r["train_loss"] for r in records if r.get("train_loss") is not None]
    losses = [v for v in losses if math.isfinite(v)]
    largest = max(losses) if losses else None
    limit = EXPLODED_FACTOR * math.log(max(num_classes, 2))
    return {"max_train_loss": largest, "loss_exploded": largest is not None and largest > limit}


__all__ = [
    "ADVICE",
    "EXPLODED_FACTOR",
    "TrainingDiverged",
    "divergence_message",
    "eval_reason",
    "loss_health",
    "streak_reason",
]
