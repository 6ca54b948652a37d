"""Batch normalization (Ioffe & Szegedy, 2015) as a pure function with explicit state.

Train mode normalizes with the statistics of the current batch (per channel, over
every other axis, biased variance) and returns updated running statistics; eval
mode (also "frozen" BN for fine-tuning) normalizes with the running statistics,
leaves them unchanged and still lets gradients flow to ``x``, ``scale`` and
``bias``::

    y = (x - mean) * rsqrt(var + eps) * scale + bias

Running statistics follow the flax/Keras convention, ``momentum`` being the
weight on the OLD value::

    new = momentum * old + (1 - momentum) * batch

PyTorch's ``momentum`` is the weight on the NEW value: PyTorch ``momentum=0.1``
is ``momentum=0.9`` here (``ours = 1 - theirs``). PyTorch also stores the
unbiased batch variance ``n / (n - 1) * var`` in its running variance; pass
``unbiased_running_var=True`` to do the same (the normalization itself always
uses the biased variance, as in both frameworks).

Cross-device (SyncBN): with ``axis_name`` the batch statistics are over the union
of all devices' (unmasked) examples on that axis, count-weighted and exact for
uneven or masked per-device batches, with one collective (see
:func:`norms.moments`). Under ``jax.jit`` with a sharded batch and no
``axis_name``, XLA already reduces over the global batch, so the statistics are
global there too.

Train mode normalizes through :func:`norms.standardize.standardize` (shared with
group norm): a closed-form JVP whose backward pass is two per-channel reductions
and one elementwise pass (plus one collective under ``axis_name``), about 0.7x the
time of ``flax.linen.BatchNorm`` fwd+bwd on CPU (benchmarks/norms_bench.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from norms.checks import prepare
from norms.moments import (
    broadcast_mask,
    check_axis_name,
    inv_std,
    merge_moments,
    moments,
    stats_dtype,
)
from norms.running_stats import (
    BatchMoments,
    BatchNormState,
    check_stale,
    update_running_stats,
)
from norms.standardize import Population, standardize


def _channel_shape(ndim: int, axis: int, num_channels: int) -> tuple[int, ...]:
    shape = [1] * ndim
    shape[axis] = num_channels
    return tuple(shape)


class BatchStats(NamedTuple):
    """Batch statistics of one call.

    ``mean``/``var`` broadcast against the input (ghost-batch shaped when ghost
    batches are used; see :func:`batch_statistics`) and are what train mode
    normalizes with. ``run_mean``/``run_var``/``run_count`` are (C,) and feed
    :func:`update_running_stats`.
    """

    mean: jax.Array
    var: jax.Array
    run_mean: jax.Array
    run_var: jax.Array
    run_count: jax.Array
    count: jax.Array

    def moments(self) -> BatchMoments:
        """(C,) moments of the whole call: run_mean, run_var and the total count."""
        return BatchMoments(self.run_mean, self.run_var, self.count)


def _batch_layout(x, axis: int, mask, ghost_batch_size, axis_name, who: str):
    """``x`` and ``mask`` laid out for per-channel statistics, with the entry checks.

    Returns ``(x, mask, axis, reduce_axes)``: unchanged without ghost batches;
    with ``ghost_batch_size=g`` reshaped to ``(N // g, g, ...)`` (channel axis moved
    up by one, the ghost-batch axis 0 kept). ``mask`` is broadcast to ``x``'s shape.
    """
    ndim = x.ndim
    reduce_axes = tuple(a for a in range(ndim) if a != axis)
    mask = broadcast_mask(mask, x.shape, who)
    check_axis_name(axis_name, who)
    if ghost_batch_size is not None:
        if axis == 0:
            raise ValueError(
                f"{who}: ghost batches split axis 0 (the batch axis), which is the channel "
                "axis here; put channels on another axis or drop ghost_batch_size."
            )
        g = ghost_batch_size
        n = x.shape[0]
        if not isinstance(g, int) or g < 1:
            raise ValueError(f"{who}: ghost_batch_size must be a positive int, got {g!r}")
        if n % g:
            raise ValueError(
                f"{who}: the batch size {n} is not divisible by ghost_batch_size={g}; "
                f"choose a ghost batch size that divides {n} or pad the batch (with a mask)."
            )
        x = x.reshape((n // g, g) + x.shape[1:])
        if mask is not None:
            mask = mask.reshape(x.shape)
        axis += 1
        reduce_axes = tuple(a for a in range(1, ndim + 1) if a != axis)
    per_stat = math.prod(x.shape[a] for a in reduce_axes)
    if per_stat == 1 and axis_name is None:
        raise ValueError(
            f"{who}: training would reduce over one value per channel (input shape "
            f"{x.shape}, channel axis {axis}), so the batch variance is 0 and the output "
            "is all zeros. Use a bigger batch (or ghost batch), pass axis_name to pool "
            "statistics across devices, or use a batch-independent norm (group_norm, "
            "layer_norm, filter_response_norm)."
        )
    return x, mask, axis, reduce_axes


def _combine_ghosts(mean, var, count, channels: int, ghost: bool) -> BatchStats:
    """:class:`BatchStats` from (keepdims) moments; see :func:`batch_statistics`."""
    if not ghost:
        count = count.reshape(-1)
        return BatchStats(mean, var, mean.reshape(-1), var.reshape(-1), count, count)
    gc, gm, gv = (t.reshape(-1, channels) for t in (count, mean, var))
    total, run_mean, _ = merge_moments(gc, gm, gv * gc, axis=0)
    within_var = jnp.sum(gv * gc, axis=0) / jnp.maximum(total, 1.0)
    groups = jnp.maximum(jnp.sum((gc > 0).astype(gc.dtype), axis=0), 1.0)
    return BatchStats(mean, var, run_mean, within_var, total / groups, total)


def batch_statistics(
    x: jax.Array,
    *,
    axis: int,
    axis_name=None,
    axis_index_groups=None,
    mask=None,
    ghost_batch_size: int | None = None,
    who: str = "batch_norm",
) -> BatchStats:
    """Per-channel batch moments of ``x`` (channel axis ``axis``, batch axis 0).

    Without ghost batches ``mean``/``var`` have ``x``'s rank with size-1 reduced
    axes. With ``ghost_batch_size=g`` they have shape ``(N // g, 1, ...)`` against
    ``x`` reshaped to ``(N // g, g, ...)``: each run of g consecutive examples has its
    own statistics (with ``axis_name``, ghost batch j is the union of the j-th run
    of g examples on every device).

    For the running update the ghost-batch moments are combined exactly as
    ``run_mean = sum_j n_j mean_j / sum_j n_j`` (the whole batch's mean) and
    ``run_var = sum_j M2_j / sum_j n_j`` (the pooled WITHIN-ghost-batch variance,
    i.e. the count-weighted average of the variances training normalized with, so
    eval normalizes on the same scale as training). ``run_count`` is the number of
    values behind one normalizing variance (``sum_j n_j / #non-empty ghost
    batches``), so the unbiased correction ``n / (n - 1)`` gives the pooled
    unbiased within-ghost variance ``sum_j M2_j / sum_j (n_j - 1)``. Without ghost
    batches these reduce to the plain batch mean, biased variance and count.
    ``count`` is the total (C,) count over the whole call.

    Raises ValueError at trace time when each channel would be reduced over a
    single value (no ``axis_name``): a silent NaN/zero otherwise.
    """
    x, mask, axis, reduce_axes = _batch_layout(x, axis, mask, ghost_batch_size, axis_name, who)
    mean, var, count = moments(
        x,
        reduce_axes,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        mask=mask,
        keepdims=True,
    )
    return _combine_ghosts(mean, var, count, x.shape[axis], ghost_batch_size is not None)


def _normalize_train(
    x, scale, bias, *, eps, axis, axis_name, axis_index_groups, mask, ghost_batch_size, who
):
    """Train-mode ``y`` (``x``'s dtype) and :class:`BatchStats` (no gradient), one pass.

    The normalization with the batch's own statistics goes through
    :func:`norms.standardize.standardize` (closed-form derivatives).
    """
    xr, mask, ax, reduce_axes = _batch_layout(x, axis, mask, ghost_batch_size, axis_name, who)
    cdt = stats_dtype(x.dtype)
    c = xr.shape[ax]
    shape = _channel_shape(xr.ndim, ax, c)
    scale, bias = (None if p is None else p.astype(cdt).reshape(shape) for p in (scale, bias))
    pop = Population.of(reduce_axes, axis_name=axis_name, axis_index_groups=axis_index_groups)
    y, mean, var, count = standardize(xr.astype(cdt), pop, scale, bias, eps=eps, mask=mask)
    stats = _combine_ghosts(
        *(jax.lax.stop_gradient(t) for t in (mean, var, count)), c, ghost_batch_size is not None
    )
    return y.reshape(x.shape).astype(x.dtype), stats


def normalize(x, mean, var, scale, bias, *, eps, axis: int, out_dtype, r=None, d=None):
    """``(x - mean) * rsqrt(var + eps) * scale + bias`` in the statistics dtype.

    ``mean``/``var`` broadcast against ``x``; ``scale``/``bias`` are (C,) or None
    and are placed on channel axis ``axis``. Returns ``out_dtype``.

    Batch renorm's correction (``xhat = (x - mean) * rsqrt(var + eps) * r + d``)
    enters through ``r``/``d`` (broadcastable like ``mean``); with ``r = 1`` and
    ``d = 0`` it performs the same arithmetic as plain batch norm (bit-for-bit eagerly).
    """
    cdt = mean.dtype
    shape = _channel_shape(x.ndim, axis, x.shape[axis])
    scale = None if scale is None else scale.astype(cdt).reshape(shape)
    mul = inv_std(var, eps)
    if r is not None:
        mul = mul * r
    if scale is not None:
        mul = mul * scale
    y = (x.astype(cdt) - mean) * mul
    if d is not None:
        y = y + (d if scale is None else d * scale)
    if bias is not None:
        y = y + bias.astype(cdt).reshape(shape)
    return y.astype(out_dtype)


def normalize_with_running_stats(x, state, scale, bias, *, eps, axis: int, on_stale, who):
    """Eval / frozen normalization with ``state.mean``/``state.var`` (no update).

    ``axis`` is the non-negative channel axis. Checks staleness per ``on_stale``.
    Gradients flow to ``x``, ``scale`` and ``bias``.
    """
    check_stale(state.count, on_stale, who)
    mean = _as_channel_stat(state.mean, x.ndim, axis)
    var = _as_channel_stat(state.var, x.ndim, axis)
    cdt = jnp.promote_types(mean.dtype, jnp.promote_types(x.dtype, jnp.float32))
    return normalize(
        x, mean.astype(cdt), var.astype(cdt), scale, bias, eps=eps, axis=axis, out_dtype=x.dtype
    )


def _as_channel_stat(t: jax.Array, ndim: int, axis: int) -> jax.Array:
    return t.reshape(_channel_shape(ndim, axis, t.shape[-1]))


def batch_norm(
    x: jax.Array,
    state: BatchNormState,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    train: bool,
    momentum=0.9,
    eps: float = 1e-5,
    axis: int = -1,
    axis_name: str | tuple[str, ...] | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: jax.Array | None = None,
    ghost_batch_size: int | None = None,
    unbiased_running_var: bool = False,
    zero_debias: bool = False,
    on_stale: str = "warn",
    return_batch_stats: bool = False,
) -> tuple[jax.Array, BatchNormState]:
    """Batch normalization of ``x`` of shape (N, ..., C) (channel axis ``axis``).

    Train: per channel over every other axis (and over devices on ``axis_name``),
    biased variance, ``y = (x - mean) * rsqrt(var + eps) * scale + bias``; the
    returned state has updated running statistics (see
    :func:`update_running_stats`). Eval / frozen (``train=False``): normalizes
    with ``state.mean``/``state.var``, returns ``state`` unchanged; gradients
    still flow to ``x``, ``scale`` and ``bias``.

    Args:
      x: input, any real dtype. Batch statistics are float32 (wider for float64
        inputs); ``y`` has ``x``'s dtype, float32 for integer inputs.
      state: :class:`BatchNormState` with (C,) mean/var. The running statistics
        stay in the state's dtype: float32 from ``init_batch_norm_state(C)``,
        float64 from ``init_batch_norm_state(C, jnp.float64)`` (with x64 enabled).
      scale, bias: optional (C,) affine parameters.
      train: required; never inferred.
      momentum: weight on the OLD running value (PyTorch 0.1 == 0.9 here).
      eps: added to the variance inside the rsqrt.
      axis: channel axis (default -1, channels-last).
      axis_name, axis_index_groups: SyncBN over a pmap/shard_map/vmap axis
        (optionally within device groups); exact union statistics, one collective.
      mask: optional boolean, broadcastable to ``x`` (e.g. (N, 1, 1, 1) for padded
        examples); masked values do not enter the statistics (train only; in eval
        every value is normalized with the running statistics).
      ghost_batch_size: g; in train mode each run of g consecutive examples along
        axis 0 is normalized with its own statistics (Hoffer et al., 2017). N must
        be divisible by g. The running statistics are updated ONCE per call with the
        ghost moments combined as described in :func:`batch_statistics` (whole-batch
        mean, pooled within-ghost variance). Ignored in eval.
      unbiased_running_var: store ``n / (n - 1) * var`` (PyTorch) in the running
        variance, with n the cross-device, masked count.
      zero_debias: Adam-style bias-corrected running statistics; works from any
        initial state (see :func:`update_running_stats`).
      on_stale: "warn" | "error" | "ignore": what eval does when the running
        statistics were never updated (``state.count == 0``).
      return_batch_stats: also return the :class:`BatchMoments` of this call
        (``None`` in eval), e.g. to re-estimate population statistics with
        :func:`norms.recompute_batch_stats`.

    Returns:
      ``(y, new_state)``, or ``(y, new_state, batch_moments)`` with
      ``return_batch_stats=True``.

    Running statistics are not updated when the batch statistics are not finite
    (NaN/Inf inputs) or nothing was unmasked; see :func:`update_running_stats`.
    Raises ValueError at trace time for a wrong parameter/state shape, an unbound
    ``axis_name``, a ghost batch size that does not divide N, or a training
    reduction over one value per channel.
    """
    who = "batch_norm"
    x, ax, scale, bias = prepare(
        x, state, scale, bias, axis=axis, momentum=momentum, eps=eps, on_stale=on_stale, who=who
    )
    if not train:
        y = normalize_with_running_stats(
            x, state, scale, bias, eps=eps, axis=ax, on_stale=on_stale, who=who
        )
        return (y, state, None) if return_batch_stats else (y, state)
    y, stats = _normalize_train(
        x,
        scale,
        bias,
        eps=eps,
        axis=ax,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        mask=mask,
        ghost_batch_size=ghost_batch_size,
        who=who,
    )
    new_state = update_running_stats(
        state,
        stats.run_mean,
        stats.run_var,
        stats.run_count,
        momentum=momentum,
        unbiased=unbiased_running_var,
        zero_debias=zero_debias,
    )
    if return_batch_stats:
        return y, new_state, stats.moments()
    return y, new_state


__all__ = [
    "BatchStats",
    "batch_norm",
    "batch_statistics",
    "normalize",
    "normalize_with_running_stats",
]
