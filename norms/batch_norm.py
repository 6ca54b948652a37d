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
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from norms.checks import channel_params
from norms.moments import broadcast_mask, check_axis_name, merge_moments, moments, stats_dtype
from norms.standardize import Population, standardize

ON_STALE = ("warn", "error", "ignore")


class StaleStatisticsWarning(UserWarning):
    """Eval ran on running statistics that were never updated (count == 0)."""


class StaleStatisticsError(RuntimeError):
    """Eval ran on running statistics that were never updated (count == 0)."""


class BatchNormState(NamedTuple):
    """Running statistics of a batch norm layer.

    Attributes:
      mean: (C,) float32 running mean.
      var: (C,) float32 running variance (biased unless ``unbiased_running_var``).
      count: () int32 number of running updates applied so far (skipped
        non-finite batches do not count).
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array


def init_batch_norm_state(num_features: int) -> BatchNormState:
    """Fresh running statistics: mean 0, var 1 (float32, shape (C,)), count 0 (int32)."""
    if not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    return BatchNormState(
        mean=jnp.zeros((num_features,), jnp.float32),
        var=jnp.ones((num_features,), jnp.float32),
        count=jnp.zeros((), jnp.int32),
    )


# ---------------------------------------------------------------------------
# Argument checks shared by every stateful norm.
# ---------------------------------------------------------------------------


def channel_axis(x: jax.Array, axis: int, who: str) -> int:
    """The channel axis of ``x`` as a non-negative int; errors name the shape."""
    if not isinstance(axis, int):
        raise ValueError(f"{who}: axis must be one int (the channel axis), got {axis!r}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{who}: axis={axis} is out of range for an input of shape {x.shape}")
    return axis % x.ndim


def check_state(state, num_channels: int, x_shape, axis: int, who: str) -> None:
    """Checks that running mean/var have shape (C,)."""
    for name in ("mean", "var"):
        shape = jnp.shape(getattr(state, name))
        if shape != (num_channels,):
            raise ValueError(
                f"{who}: state.{name} has shape {shape} but the input of shape "
                f"{tuple(x_shape)} has {num_channels} channels on axis {axis}; create the "
                f"state with init_batch_norm_state({num_channels})."
            )


def check_momentum(momentum, who: str) -> None:
    """Checks ``0 <= momentum <= 1`` when momentum is a Python number."""
    if isinstance(momentum, int | float) and not 0.0 <= momentum <= 1.0:
        raise ValueError(
            f"{who}: momentum={momentum} must be in [0, 1]; it is the weight on the OLD "
            "running value (PyTorch momentum 0.1 == 0.9 here)."
        )


def check_eps(eps, who: str) -> None:
    """Checks ``eps > 0`` when eps is a Python number."""
    if isinstance(eps, int | float) and not eps > 0:
        raise ValueError(f"{who}: eps={eps} must be > 0 (it keeps rsqrt(var + eps) finite)")


def check_on_stale(on_stale: str, who: str) -> None:
    if on_stale not in ON_STALE:
        raise ValueError(f"{who}: on_stale={on_stale!r}; choose one of {ON_STALE}")


def check_running_args(state, x_shape, axis: int, momentum, eps, on_stale: str, who: str):
    """The checks every stateful norm runs on its state and hyper-parameters.

    ``axis`` is the (non-negative) channel axis of an input of shape ``x_shape``.
    """
    check_state(state, x_shape[axis], x_shape, axis, who)
    check_momentum(momentum, who)
    check_eps(eps, who)
    check_on_stale(on_stale, who)


def _channel_shape(ndim: int, axis: int, num_channels: int) -> tuple[int, ...]:
    shape = [1] * ndim
    shape[axis] = num_channels
    return tuple(shape)


# ---------------------------------------------------------------------------
# Shared pieces: batch statistics, normalization, running update, staleness.
# ---------------------------------------------------------------------------


class BatchMoments(NamedTuple):
    """(C,) batch moments of one training call, as used for the running update.

    ``count`` is the total number of values behind each statistic (over devices,
    masks applied, summed over ghost batches), the weight for merging calls
    (:func:`norms.recompute_batch_stats`).
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array


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
    mul = jax.lax.rsqrt(var + eps)
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


def prepare(x, state, scale, bias, *, axis, momentum, eps, on_stale, who):
    """Entry checks shared by the stateful norms; returns ``(x, channel_axis, scale, bias)``."""
    x = jnp.asarray(x)
    ax = channel_axis(x, axis, who)
    scale, bias = channel_params(who, x.shape, ax, scale=scale, bias=bias)
    check_running_args(state, x.shape, ax, momentum, eps, on_stale, who)
    return x, ax, scale, bias


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


# ---------------------------------------------------------------------------
# The function.
# ---------------------------------------------------------------------------


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
      x: input, any float dtype. Statistics and the running state are float32
        (wider for float64 inputs); ``y`` has ``x``'s dtype.
      state: :class:`BatchNormState` with (C,) mean/var.
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


# ---------------------------------------------------------------------------
# Cross-device agreement of running statistics.
# ---------------------------------------------------------------------------


def is_stats_node(node: Any) -> bool:
    """True for a NamedTuple or mapping with ``mean``, ``var`` and ``count`` entries."""
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return all(f in node._fields for f in ("mean", "var", "count"))
    if isinstance(node, Mapping):
        return all(k in node for k in ("mean", "var", "count"))
    return False


def _sync_one(node, axis_name, axis_index_groups):
    get = (lambda k: node[k]) if isinstance(node, Mapping) else (lambda k: getattr(node, k))
    mean, var, count = get("mean"), get("var"), get("count")
    sdt = jnp.promote_types(jnp.asarray(mean).dtype, jnp.float32)
    w = jnp.broadcast_to(jnp.asarray(count).astype(sdt), jnp.shape(mean))
    stacked = jnp.stack([w, mean.astype(sdt), var.astype(sdt)])
    g = jax.lax.all_gather(stacked, axis_name, axis_index_groups=axis_index_groups)
    gw, gm, gv = g[:, 0], g[:, 1], g[:, 2]
    # Devices that never updated carry no information; if none did, weigh equally.
    gw = jnp.where(jnp.sum(gw, axis=0) > 0, gw, jnp.ones_like(gw))
    total, new_mean, m2 = merge_moments(gw, gm, gv * gw, axis=0)
    new_var = m2 / jnp.maximum(total, jnp.finfo(sdt).tiny)
    gc = jax.lax.all_gather(jnp.asarray(count), axis_name, axis_index_groups=axis_index_groups)
    new_count = jnp.max(gc, axis=0).astype(jnp.asarray(count).dtype)
    new = {
        "mean": new_mean.astype(jnp.asarray(mean).dtype),
        "var": new_var.astype(jnp.asarray(var).dtype),
        "count": new_count,
    }
    if isinstance(node, Mapping):
        return {**node, **new}
    return node._replace(**new)


def sync_batch_stats(
    state: Any,
    axis_name: str | tuple[str, ...],
    *,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
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

    i.e. Chan's merge of the devices' running moments. Unlike a plain average of
    variances this includes the spread of the per-device means, so running stats
    that were accumulated from per-device batches (no ``axis_name`` in training)
    describe the whole population. Running stats that were already computed with
    ``axis_name`` are equal on every device and come back unchanged. Other leaves
    (e.g. a renorm ``step``) are returned as they are. Use it before eval and
    before checkpointing a data-parallel model.
    """
    check_axis_name(axis_name, "sync_batch_stats")
    return jax.tree_util.tree_map(
        lambda n: _sync_one(n, axis_name, axis_index_groups) if is_stats_node(n) else n,
        state,
        is_leaf=is_stats_node,
    )


__all__ = [
    "BatchMoments",
    "BatchNormState",
    "BatchStats",
    "StaleStatisticsError",
    "StaleStatisticsWarning",
    "batch_norm",
    "batch_statistics",
    "init_batch_norm_state",
    "is_stats_node",
    "normalize",
    "sync_batch_stats",
    "update_running_stats",
]
