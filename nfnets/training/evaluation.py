"""Evaluation over a whole split, every example counted exactly once.

The eval iterator pads the last batch to the full batch size and marks the real
examples with a boolean ``"mask"``; the step sums loss and correctness over masked
examples only and ``psum``s the sums over the device axis, and the host adds the
sums of all batches. Nothing is dropped and padding never counts, whatever the
batch size. The model runs in eval mode (running statistics, no dropout), so
padding cannot leak into any statistics either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nfnets.training.losses import accuracy, smoothed_cross_entropy
from nfnets.training.parallel import BATCH, PER_DEVICE, REPLICATED, Pmap, ShardMap
from norms import apply_recomputed_stats, recompute_batch_stats, sync_batch_stats

PyTree = Any


def make_eval_step(model: nn.Module, axis_name: str = "batch") -> Callable:
    """Per-device ``(variables, batch) -> sums`` for ``jax.pmap(..., axis_name)``.

    ``batch`` holds "image" (n, H, W, C), "label" (n,) and "mask" (n,) bool.
    Returns ``{"loss": sum of masked per-example cross-entropies (no smoothing),
    "correct": number of masked examples classified right, "count": number of masked
    examples}``, summed over all devices of the axis.
    """

    def eval_step(variables: PyTree, batch: dict) -> dict[str, jax.Array]:
        logits = model.apply(variables, batch["image"], train=False)
        return masked_sums(logits, batch, axis_name)

    return eval_step


def masked_sums(logits: jax.Array, batch: dict, axis_name: str) -> dict[str, jax.Array]:
    """The eval sums of one device's logits (n, K) over ``batch["mask"]``, psummed over the axis."""
    mask = batch["mask"].astype(bool)
    loss = smoothed_cross_entropy(logits, batch["label"], 0.0)
    sums = {
        "loss": jnp.sum(jnp.where(mask, loss, 0.0)),
        "correct": jnp.sum(jnp.where(mask, accuracy(logits, batch["label"]), 0.0)),
        "count": jnp.sum(mask.astype(jnp.int32)),
    }
    return jax.lax.psum(sums, axis_name)


def make_pmapped_eval_step(model: nn.Module, axis_name: str = "batch") -> Callable:
    """``jax.pmap`` of ``make_eval_step``; variables replicated, batch sharded."""
    return jax.pmap(make_eval_step(model, axis_name), axis_name=axis_name)


def evaluate(
    p_eval_step: Callable,
    variables: PyTree,
    batches: Iterable[dict],
    *,
    expected_count: int | None = None,
    fetch: Callable[[dict], dict] | None = None,
) -> dict[str, float]:
    """Runs ``p_eval_step`` over every (device-sharded) batch; returns loss, accuracy, count.

    Args:
      p_eval_step: from ``make_pmapped_eval_step``.
      variables: replicated model variables ({"params", "batch_stats"?}).
      batches: device-sharded batches with "mask" (leading axis = local devices).
      expected_count: when given, the number of examples the split holds; a
        different count (examples dropped or counted twice) raises.
      fetch: the step's (device-identical) sums -> one host copy; default: the
        first local device's entry of pmap's per-device results.

    Returns ``{"loss": mean loss, "accuracy": fraction correct, "count": examples}``
    over the masked examples of all batches (and all processes).
    """
    # psum made every device's sums identical: one device's copy is read.
    fetch = fetch or (lambda sums: Pmap().host(sums, REPLICATED))
    loss_sum, correct, count = 0.0, 0.0, 0
    for batch in batches:
        sums = fetch(p_eval_step(variables, batch))
        loss_sum += float(sums["loss"])
        correct += float(sums["correct"])
        count += int(sums["count"])
    if count == 0:
        raise ValueError("evaluation saw no examples: the eval split is empty")
    if expected_count is not None and count != expected_count:
        raise RuntimeError(
            f"evaluation counted {count} examples but the split holds {expected_count}; "
            "the eval iterator must pad and mask the last batch, not drop or repeat it"
        )
    return {"loss": loss_sum / count, "accuracy": correct / count, "count": count}


def make_precise_bn(
    model: nn.Module, axis_name: str = "batch", parallel: Pmap | ShardMap | None = None
) -> Callable:
    """PreciseBN for a mapped model: ``(p_variables, batches, num_batches, rng) -> batch_stats``.

    Runs the frozen model in train mode over ``num_batches`` device-sharded batches,
    collects every stateful norm's batch moments (the ``"batch_moments"``
    collection), merges them exactly and count-weighted over batches
    (``norms.recompute_batch_stats``), writes them into the running statistics
    (``norms.apply_recomputed_stats``) and finally merges them across
    devices (``sync_batch_stats``; a no-op when the norms already synced over
    ``axis_name``). Returns the new ``batch_stats`` in ``parallel``'s per-device
    layout (default :class:`~nfnets.training.parallel.Pmap`); parameters and the
    training state are untouched.
    """

    def stats_fn(variables, batch, rng):
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        _, state = model.apply(
            variables,
            batch["image"],
            train=True,
            rngs={"dropout": rng},
            mutable=["batch_stats", "batch_moments"],
        )
        return state["batch_moments"]

    par = parallel or Pmap(axis_name)
    var_kinds = {"params": REPLICATED, "batch_stats": PER_DEVICE}
    p_stats = par.map(stats_fn, (var_kinds, BATCH, REPLICATED), PER_DEVICE)
    p_apply = par.map(
        lambda stats, moments: sync_batch_stats(apply_recomputed_stats(stats, moments), axis_name),
        (PER_DEVICE, PER_DEVICE),
        PER_DEVICE,
    )

    def precise(p_variables, batches, num_batches: int, rng):
        rng = par.put(rng, REPLICATED)
        moments = recompute_batch_stats(
            lambda b: p_stats(p_variables, b, rng), batches, num_batches=num_batches
        )
        return p_apply(p_variables["batch_stats"], moments)

    return precise
