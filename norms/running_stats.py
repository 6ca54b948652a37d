"""Running statistics shared by every stateful norm: state, update, staleness, sync.

Batch norm, batch renorm, switchable norm and EvoNorm-B0 all keep a running mean
and variance of their batch statistics (Ioffe & Szegedy, 2015), following the
flax/Keras convention, ``momentum`` being the weight on the OLD value::

    new = momentum * old + (1 - momentum) * batch

This module holds the state type (:class:`BatchNormState`), the update
(:func:`update_running_stats`), the eval-time check that the statistics were ever
updated (:func:`check_stale`) and the cross-device merge of running statistics
(:func:`sync_batch_stats`). The argument checks live in :mod:`norms.checks`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from norms.moments import check_axis_name, check_sync_strategy, merge_across_devices


class StaleStatisticsWarning(UserWarning):
    """Eval ran on running statistics that were never updated (count == 0)."""


class StaleStatisticsError(RuntimeError):
    """Eval ran on running statistics that were never updated (count == 0)."""


class BatchNormState(NamedTuple):
    """Running statistics of a batch norm layer.

    Attributes:
      mean: (C,) running mean (float32 unless created with another ``dtype``).
      var: (C,) running variance, same dtype (biased unless ``unbiased_running_var``).
      count: () int32 number of running updates applied so far (skipped
        non-finite batches do not count).
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array


def init_batch_norm_state(num_features: int, dtype=jnp.float32) -> BatchNormState:
    """Fresh running statistics: mean 0, var 1 (shape (C,), ``dtype``), count 0 (int32).

    ``dtype`` is the dtype the running statistics are kept in (every update casts
    the batch moments to it): float32 by default, e.g. ``jnp.float64`` (with
    ``jax_enable_x64``) to keep float64 statistics of float64 inputs.
    """
    if not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"init_batch_norm_state: dtype={dtype!r} is not a floating dtype; use "
            "jnp.float32 (the default) or jnp.float64"
        )
    return BatchNormState(
        mean=jnp.zeros((num_features,), dtype),
        var=jnp.ones((num_features,), dtype),
        count=jnp.zeros((), jnp.int32),
    )


class BatchMoments(NamedTuple):
    """(C,) batch moments of one training call, as used for the running update.

    ``count`` is the total number of values behind each statistic (over devices,
    masks applied, summed over ghost batches), the weight for merging calls
    (:func:`norms.recompute_batch_stats`).
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array


def update_running_stats(
    state,
    mean: jax.Array,
    var: jax.Array,
    count: jax.Array,
    *,
    momentum=0.9,
    unbiased: bool = False,
    zero_debias: bool = False,
):
    """One running-statistics update from batch moments; shared by every stateful norm.

    ``state`` is any NamedTuple with fields ``mean``, ``var``, ``count`` (e.g.
    :class:`BatchNormState`, ``BatchRenormState``); other fields pass through.
    ``mean``, ``var`` (biased) and ``count`` (values per statistic) are the
    (C,) batch moments from :func:`norms.moments` (cross-device and masked counts
    included). Returns ``state._replace(mean=..., var=..., count=count + 1)``::

        new = momentum * old + (1 - momentum) * batch

    ``unbiased``: the batch variance entering the update is ``n / (n - 1) * var``
    with ``n = count`` (PyTorch's running variance).

    ``zero_debias``: the stored statistics are the bias-corrected
    exponential moving average of the batch statistics, as in Adam: with t the
    update number, ``E_t = momentum * E_{t-1} + (1 - momentum) * batch_t`` from
    ``E_0 = 0`` and ``stored_t = E_t / (1 - momentum^t)``. It is applied on the fly
    (the weight on the old value is ``momentum * (1 - momentum^(t-1)) / (1 -
    momentum^t)``), so the first update REPLACES the initial values: any
    initialization works (no zero-initialized state is needed) and eval needs no
    correction. It relies on ``count`` numbering the updates, so keep ``momentum``
    fixed.

    Non-finite batches are skipped: when any batch mean/variance is NaN/Inf, or no
    value entered some statistic (everything masked), the state is returned
    unchanged (count not incremented), so one bad batch cannot poison the running
    statistics even when the optimizer skips that step. Under ``axis_name`` the
    batch moments are identical on every device, so all devices skip together.
    """
    old_mean, old_var = state.mean, state.var
    sdt = old_mean.dtype
    mean = mean.astype(sdt)
    var = var.astype(sdt)
    count = count.astype(sdt)
    if unbiased:
        var = var * count / jnp.maximum(count - 1.0, 1.0)
    t = state.count + 1
    if zero_debias:
        mt = jnp.asarray(momentum, sdt) ** t.astype(sdt)
        mt_prev = jnp.asarray(momentum, sdt) ** (t - 1).astype(sdt)
        keep = momentum * (1.0 - mt_prev) / jnp.maximum(1.0 - mt, jnp.finfo(sdt).tiny)
    else:
        keep = jnp.asarray(momentum, sdt)
    new_mean = keep * old_mean + (1.0 - keep) * mean
    new_var = keep * old_var + (1.0 - keep) * var
    ok = jnp.all(jnp.isfinite(mean)) & jnp.all(jnp.isfinite(var)) & jnp.all(count > 0)
    return state._replace(
        mean=jnp.where(ok, new_mean, old_mean),
        var=jnp.where(ok, new_var, old_var),
        count=jnp.where(ok, t, state.count).astype(jnp.asarray(state.count).dtype),
    )


def _stale_message(who: str) -> str:
    return (
        f"{who}: eval (train=False) uses running statistics that were never updated "
        "(count == 0): outputs are normalized with the initial mean 0 / var 1. Train "
        "first (train=True with a mutable batch_stats collection), restore a "
        "checkpoint, or recompute them with norms.recompute_batch_stats (PreciseBN); "
        "pass on_stale='ignore' if this is intended."
    )


def _report_stale(count, on_stale: str, who: str) -> None:
    if int(np.min(np.asarray(count))) > 0:
        return
    if on_stale == "error":
        raise StaleStatisticsError(_stale_message(who))
    warnings.warn(_stale_message(who), StaleStatisticsWarning, stacklevel=4)


def check_stale(count, on_stale: str, who: str) -> None:
    """Warns or raises (per ``on_stale``) when ``count == 0`` in eval mode.

    With a concrete count the check runs now; under tracing (jit, pmap, grad, ...)
    it runs on the host at execution time via ``jax.debug.callback``; a raised
    error then surfaces as a ``JaxRuntimeError`` carrying the message. Nothing is
    checked under ``jax.eval_shape`` (nothing executes).
    """
    if on_stale == "ignore":
        return
    if isinstance(count, jax.core.Tracer):
        jax.debug.callback(lambda c: _report_stale(c, on_stale, who), count)
    else:
        _report_stale(count, on_stale, who)


def is_stats_node(node: Any) -> bool:
    """True for a NamedTuple or mapping with ``mean``, ``var`` and ``count`` entries."""
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return all(f in node._fields for f in ("mean", "var", "count"))
    if isinstance(node, Mapping):
        return all(k in node for k in ("mean", "var", "count"))
    return False


def stats_field(node: Any, key: str) -> Any:
    """``node[key]`` for a mapping, ``node.key`` for a NamedTuple (see :func:`is_stats_node`)."""
    return node[key] if isinstance(node, Mapping) else getattr(node, key)


def has_stats_field(node: Any, key: str) -> bool:
    """True when the mapping or NamedTuple ``node`` has an entry ``key``."""
    return key in node if isinstance(node, Mapping) else key in getattr(node, "_fields", ())


def replace_stats(node: Any, **new: Any) -> Any:
    """``node`` with the entries of ``new`` that it already has replaced (mapping or NamedTuple)."""
    if isinstance(node, Mapping):
        return {**node, **{k: v for k, v in new.items() if k in node}}
    return node._replace(**{k: v for k, v in new.items() if k in node._fields})


def _sync_one(node, axis_name, axis_index_groups, sync_strategy):
    mean, var, count = (jnp.asarray(stats_field(node, k)) for k in ("mean", "var", "count"))
    sdt = jnp.promote_types(mean.dtype, jnp.float32)
    gc = jax.lax.all_gather(count, axis_name, axis_index_groups=axis_index_groups)
    new_count = jnp.max(gc, axis=0)
    # Devices that never updated carry no information; if none did, weigh equally.
    w = jnp.where(new_count > 0, count, 1).astype(sdt)
    w = jnp.broadcast_to(w, mean.shape)
    total, new_mean, m2 = merge_across_devices(
        w, mean.astype(sdt), var.astype(sdt) * w, axis_name, axis_index_groups, sync_strategy
    )
    new_var = m2 / jnp.maximum(total, jnp.finfo(sdt).tiny)
    return replace_stats(
        node,
        mean=new_mean.astype(mean.dtype),
        var=new_var.astype(var.dtype),
        count=new_count.astype(count.dtype),
    )


def sync_batch_stats(
    state: Any,
    axis_name: str | tuple[str, ...],
    *,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    sync_strategy: str | None = None,
) -> Any:
    """Makes running statistics agree across devices (call inside pmap/shard_map).

    ``state`` is any pytree holding batch-norm states: NamedTuples with fields
    ``mean``, ``var``, ``count`` (:class:`BatchNormState`, ``BatchRenormState``)
    or mappings with those keys (a flax ``batch_stats`` collection). Every such
    node is replaced by the union of the per-device populations, each device
    weighted by its update ``count`` (devices that never updated contribute
    nothing; if none did, all weigh equally)::

        mean = sum_i w_i mean_i / sum_i w_i
        var  = sum_i w_i (var_i + (mean_i - mean)^2) / sum_i w_i
        count = max_i count_i

    i.e. Chan's merge of the devices' running moments, evaluated by the same
    cross-device merge as SyncBN's batch statistics
    (:func:`norms.moments.merge_across_devices`; ``sync_strategy`` ``"gather"``,
    ``"psum"`` or ``"auto"``, None meaning ``norms.moments.SYNC_STRATEGY``), after
    one ``all_gather`` of the counts. Unlike a plain average of
    variances this includes the spread of the per-device means, so running stats
    that were accumulated from per-device batches (no ``axis_name`` in training)
    describe the whole population. Running stats that were already computed with
    ``axis_name`` are equal on every device and come back unchanged. Other leaves
    (e.g. a renorm ``step``) are returned as they are. Use it before eval and
    before checkpointing a data-parallel model.
    """
    check_sync_strategy(sync_strategy)
    check_axis_name(axis_name, "sync_batch_stats")

    def sync(n):
        return _sync_one(n, axis_name, axis_index_groups, sync_strategy)

    return jax.tree_util.tree_map(
        lambda n: sync(n) if is_stats_node(n) else n,
        state,
        is_leaf=is_stats_node,
    )


__all__ = [
    "BatchMoments",
    "BatchNormState",
    "StaleStatisticsError",
    "StaleStatisticsWarning",
    "check_stale",
    "has_stats_field",
    "init_batch_norm_state",
    "is_stats_node",
    "replace_stats",
    "stats_field",
    "sync_batch_stats",
    "update_running_stats",
]
