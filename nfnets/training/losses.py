"""Losses and metrics of the classification head: cross-entropy with label smoothing, accuracy.

Labels are integer class ids (N,) or soft targets (N, K) (e.g. MixUp / CutMix
rows that sum to 1); logits are (N, K). Both functions return per-example (N,)
float32 values, so callers choose the reduction (mean in training, masked sums
in evaluation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def smoothed_cross_entropy(
    logits: jax.Array, labels: jax.Array, smoothing: float = 0.0
) -> jax.Array:
    """Per-example softmax cross-entropy with label smoothing, shape (N,) in float32.

    `logits` (N, K); `labels` integer class ids (N,) or (soft) targets (N, K), e.g. from
    MixUp. Targets become `(1 - smoothing) * y + smoothing / K` (`optax.smooth_labels`),
    loss `-sum_k y_k log_softmax(logits)_k` (`optax.softmax_cross_entropy`).
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
    logits = jnp.asarray(logits, jnp.float32)
    num_classes = logits.shape[-1]
    if jnp.shape(labels) == logits.shape[:-1]:
        if not jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer):
            raise ValueError(
                f"labels of shape {jnp.shape(labels)} must be integer class ids, "
                f"got dtype {jnp.asarray(labels).dtype}"
            )
        targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    elif jnp.shape(labels) == logits.shape:
        targets = jnp.asarray(labels, jnp.float32)
    else:
        raise ValueError(
            f"labels shape {jnp.shape(labels)} fits neither class ids "
            f"{logits.shape[:-1]} nor targets {logits.shape}"
        )
    if smoothing:
        targets = optax.smooth_labels(targets, smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """(N,) float32 1/0 correctness; soft (N, K) labels are compared by their argmax."""
    if labels.ndim == logits.ndim:
        labels = jnp.argmax(labels, axis=-1)
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


__all__ = ["accuracy", "smoothed_cross_entropy"]
