"""PreciseBN (Wu & Johnson, 2021): population statistics re-estimated from N batches.

Running averages lag behind the weights and weigh recent batches more. PreciseBN
instead runs the (frozen) model over a few batches in training mode, collects each
batch-norm layer's batch moments and merges them EXACTLY, count-weighted, with
Chan's formula (:func:`norms.merge_moments`)::

    n = sum_b n_b
    mean = sum_b n_b mean_b / n
    var = sum_b n_b (var_b + (mean_b - mean)^2) / n

so batches of different sizes (or different numbers of masked examples) give the
statistics of their concatenation. With ``axis_name`` (SyncBN) each batch's moments
are already over every device, so the result is the statistics of all devices'
data; without it, moments are per device, and :func:`norms.sync_batch_stats` makes
them agree afterwards.

For a flax model built from :mod:`norms.linen`, every batch-norm layer ``sow``s its
batch moments into the ``"batch_moments"`` collection in train mode (stored only
when that collection is mutable)::

    def stats_fn(batch):
        _, state = model.apply(variables, batch, train=True,
                               mutable=["batch_stats", "batch_moments"])
        return state["batch_moments"]

    moments = recompute_batch_stats(jax.jit(stats_fn), batches, num_batches=200)
    batch_stats = apply_recomputed_stats(variables["batch_stats"], moments)

(The updated ``batch_stats`` returned by ``apply`` are discarded: the model is
frozen.) For pure functions, ``batch_norm(..., return_batch_stats=True)`` returns
the same :class:`~norms.running_stats.BatchMoments`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from norms.moments import merge_moments
from norms.running_stats import has_stats_field as _has
from norms.running_stats import is_stats_node
from norms.running_stats import replace_stats as _replace
from norms.running_stats import stats_field as _get


def _merge_node(a, b):
    counts = jnp.stack([jnp.asarray(_get(a, "count")), jnp.asarray(_get(b, "count"))])
    counts = counts.astype(jnp.promote_types(counts.dtype, jnp.float32))
    means = jnp.stack([_get(a, "mean"), _get(b, "mean")]).astype(counts.dtype)
    vars_ = jnp.stack([_get(a, "var"), _get(b, "var")]).astype(counts.dtype)
    count, mean, m2 = merge_moments(counts, means, vars_ * counts, axis=0)
    return _replace(a, mean=mean, var=m2 / jnp.maximum(count, 1.0), count=count)


@jax.jit
def merge_stats_trees(a: Any, b: Any) -> Any:
    """Exact count-weighted merge of two trees of (mean, var, count) nodes.

    Nodes are NamedTuples (:class:`~norms.running_stats.BatchMoments`) or mappings
    with ``mean``, ``var`` (biased) and ``count`` entries; the trees must have the
    same structure. Leading axes (e.g. a pmap device axis) are merged elementwise.
    """
    return jax.tree.map(_merge_node, a, b, is_leaf=is_stats_node)


def recompute_batch_stats(
    stats_fn: Callable[[Any], Any],
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
) -> Any:
    """PreciseBN: merges ``stats_fn(batch)`` over ``batches`` exactly.

    Args:
      stats_fn: maps one batch to a pytree whose stats nodes have ``mean``,
        ``var`` (biased) and ``count`` (values per statistic, e.g. the flax
        ``"batch_moments"`` collection, see the module docstring). It should run
        the model in training mode WITHOUT changing its weights.
      batches: any iterable of batches (sizes may differ).
      num_batches: use at most this many batches (``None``: all of them).

    Returns:
      A tree like ``stats_fn``'s output holding, per layer, the mean, biased
      variance and total count over every value of every batch, exactly as if
      all batches had been concatenated into one.

    Raises:
      ValueError: if ``batches`` yields nothing.
    """
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    acc = None
    for batch in itertools.islice(batches, num_batches):
        stats = stats_fn(batch)
        acc = stats if acc is None else merge_stats_trees(acc, stats)
    if acc is None:
        raise ValueError("recompute_batch_stats: `batches` yielded no batch; pass at least one")
    return acc


def apply_recomputed_stats(batch_stats: Any, recomputed: Any, *, unbiased: bool = False) -> Any:
    """Writes recomputed (mean, var) into running statistics; returns the new tree.

    ``batch_stats`` is a flax ``"batch_stats"`` collection (nested dicts) or any
    tree of states (:class:`~norms.running_stats.BatchNormState`, ...);
    ``recomputed`` is the output of :func:`recompute_batch_stats` and may cover a
    subset of the layers (others are left as they are). Each covered layer gets
    ``mean``/``var`` replaced (cast to the stored dtype) and ``count`` set to at
    least 1, so eval no longer reports never-updated statistics. Other entries
    (e.g. a renorm ``step``) are kept.

    ``unbiased=True`` stores ``n / (n - 1) * var`` (n the total count), for layers
    trained with ``unbiased_running_var=True``.
    """
    return _apply(batch_stats, recomputed, unbiased, path=())


def _apply(target, rec, unbiased, path):
    if is_stats_node(rec):
        if not is_stats_node(target) and not (isinstance(target, Mapping) and "var" in target):
            raise ValueError(
                f"apply_recomputed_stats: no running statistics at {'/'.join(path) or '<root>'}"
            )
        count = jnp.asarray(_get(rec, "count"))
        var = jnp.asarray(_get(rec, "var"))
        if unbiased:
            var = var * count / jnp.maximum(count - 1.0, 1.0)
        new = {"var": var.astype(jnp.asarray(_get(target, "var")).dtype)}
        if _has(target, "mean"):
            new["mean"] = jnp.asarray(_get(rec, "mean")).astype(
                jnp.asarray(_get(target, "mean")).dtype
            )
        if _has(target, "count"):
            old = jnp.asarray(_get(target, "count"))
            new["count"] = jnp.maximum(old, 1).astype(old.dtype)
        return _replace(target, **new)
    if isinstance(rec, Mapping):
        if not isinstance(target, Mapping):
            raise ValueError(
                f"apply_recomputed_stats: {'/'.join(path) or '<root>'} is not a collection"
            )
        out = dict(target)
        for key, sub in rec.items():
            if key not in target:
                raise ValueError(
                    f"apply_recomputed_stats: {'/'.join(path + (str(key),))} has recomputed "
                    f"statistics but no running statistics; available: {sorted(target)}"
                )
            out[key] = _apply(target[key], sub, unbiased, path + (str(key),))
        return out
    if isinstance(rec, list | tuple):
        return type(target)(
            _apply(t, r, unbiased, path + (str(i),))
            for i, (t, r) in enumerate(zip(target, rec, strict=True))
        )
    raise ValueError(
        f"apply_recomputed_stats: unexpected {type(rec).__name__} at {'/'.join(path) or '<root>'}"
    )


__all__ = ["apply_recomputed_stats", "merge_stats_trees", "recompute_batch_stats"]
