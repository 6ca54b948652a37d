"""Switchable normalization (Luo et al., 2019): a learned mix of IN, LN and BN statistics.

::

    mean = sum_k w_k  mu_k,      w  = softmax(mean_logits)     k in (IN, LN, BN)
    var  = sum_k w'_k var_k,     w' = softmax(var_logits)
    y    = (x - mean) * rsqrt(var + eps) * scale + bias

One pass over ``x``: the instance moments (per example and channel, over the
spatial axes) come from :func:`norms.moments`; the layer and batch moments are
derived from them exactly with Chan's merge (law of total variance), e.g. for
layer norm ``mu_LN = mean_c mu_IN`` and
``var_LN = mean_c (var_IN + (mu_IN - mu_LN)^2)`` (count-weighted when masked).
The BN branch merges over the batch and then across devices on ``axis_name``
with one collective, and keeps running statistics exactly like
:func:`norms.batch_norm` (eval uses them; IN and LN always use the current input).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from norms.checks import channel_params, check_running_args, require_spatial
from norms.group_norm import channels_last, mask_channels_last
from norms.moments import (
    check_axis_name,
    inv_std,
    merge_across_devices,
    merge_moments,
    moments,
)
from norms.running_stats import BatchMoments, BatchNormState, check_stale, update_running_stats


def _check_logits(logits, name: str, dtype) -> jax.Array:
    logits = jnp.asarray(logits)
    if logits.shape != (3,):
        raise ValueError(
            f"switchable_norm: {name} has shape {logits.shape}; expected (3,) logits for "
            "the (IN, LN, BN) statistics (initialise them to zeros for equal weights)"
        )
    return logits.astype(dtype)


def _layer_branch(count_in, mean_in, m2_in):
    """LN-branch ``(mean, var)``: the instance moments merged over the channels."""
    cnt_ln, mean_ln, m2_ln = merge_moments(count_in, mean_in, m2_in, axis=-1)
    return mean_ln[..., None], m2_ln[..., None] / jnp.maximum(cnt_ln[..., None], 1.0)


def _batch_branch(count_in, mean_in, m2_in, axis_name, axis_index_groups):
    """BN-branch ``(mean, var, BatchMoments)`` from the instance moments.

    Merges over the batch, then over devices (one collective); the moments are
    stop-gradient (they only feed the running update).
    """
    cnt_bn, mean_bn, m2_bn = merge_moments(count_in, mean_in, m2_in, axis=0)
    cnt_bn, mean_bn, m2_bn = merge_across_devices(
        cnt_bn, mean_bn, m2_bn, axis_name, axis_index_groups
    )
    var_bn = m2_bn / jnp.maximum(cnt_bn, 1.0)
    moments = BatchMoments(
        *(jax.lax.stop_gradient(t.reshape(-1)) for t in (mean_bn, var_bn, cnt_bn))
    )
    return mean_bn, var_bn, moments


def _affine_from_stats(mean, var, scale, bias, eps):
    """``(a, b)`` with ``y = x * a + b = (x - mean) * rsqrt(var + eps) * scale + bias``."""
    a = inv_std(var, eps)
    if scale is not None:
        a = a * scale
    b = -mean * a
    if bias is not None:
        b = b + bias
    return a, b


def switchable_norm(
    x: jax.Array,
    state: BatchNormState,
    scale: jax.Array | None,
    bias: jax.Array | None,
    mean_logits: jax.Array,
    var_logits: jax.Array,
    *,
    train: bool,
    momentum=0.9,
    eps: float = 1e-5,
    axis: int = -1,
    axis_name: str | tuple[str, ...] | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: jax.Array | None = None,
    on_stale: str = "warn",
    return_batch_stats: bool = False,
) -> tuple[jax.Array, BatchNormState]:
    """Switchable norm of ``x`` of shape ``(N, *spatial, C)`` (at least one spatial axis).

    Args:
      x: input, batch axis 0, channel axis ``axis``.
      state: :class:`norms.running_stats.BatchNormState` of the BN branch (``(C,)``).
      scale, bias: per-channel ``(C,)`` arrays or ``None``.
      mean_logits, var_logits: ``(3,)`` logits over (IN, LN, BN) for the means and
        the variances; their softmaxes weigh the statistics.
      train: required. True: the BN branch uses the batch statistics (over the batch,
        spatial axes and devices on ``axis_name``) and the running statistics are
        updated (``new = momentum * old + (1 - momentum) * batch``, biased
        variance, see :func:`norms.running_stats.update_running_stats`). False: the BN
        branch uses ``state.mean``/``state.var`` and the state is returned unchanged.
      eps: added to the mixed variance inside the rsqrt.
      axis: the channel axis.
      axis_name, axis_index_groups: SyncBN for the BN branch (one all_gather).
      mask: optional boolean, broadcastable to ``x``; masked values enter no
        statistic (all three are count-weighted).
      on_stale: "warn" | "error" | "ignore" for eval with never-updated statistics.
      return_batch_stats: also return the BN branch's
        :class:`~norms.running_stats.BatchMoments` (``(C,)`` mean, biased var, count;
        ``None`` in eval), e.g. for :func:`norms.recompute_batch_stats`.

    Returns ``(y, new_state)`` (plus the batch moments with ``return_batch_stats``),
    ``y`` in ``x``'s dtype, statistics in float32.
    """
    who = "switchable_norm"
    shape = jnp.shape(x)
    xl, axis = channels_last(x, axis, who)
    require_spatial(xl.ndim, shape, who, "the IN branch needs one")
    c = xl.shape[-1]
    m = mask_channels_last(mask, shape, axis, who)
    mean_in, var_in, count_in = moments(xl, tuple(range(1, xl.ndim - 1)), mask=m, keepdims=True)
    dt = mean_in.dtype
    scale, bias = channel_params(who, shape, axis, dt, scale=scale, bias=bias)
    w = jax.nn.softmax(_check_logits(mean_logits, "mean_logits", dt))
    wv = jax.nn.softmax(_check_logits(var_logits, "var_logits", dt))
    check_running_args(state, shape, axis, momentum, eps, on_stale, who)

    m2_in = var_in * count_in
    mean_ln, var_ln = _layer_branch(count_in, mean_in, m2_in)

    if train:
        check_axis_name(axis_name, who)  # eval never uses it (init outside pmap works)
        if xl.size // c == 1 and axis_name is None:
            raise ValueError(
                f"{who}: training would reduce the BN branch over one value per channel "
                f"(input shape {shape}); use a bigger batch or pass axis_name"
            )
        mean_bn, var_bn, batch_moments = _batch_branch(
            count_in, mean_in, m2_in, axis_name, axis_index_groups
        )
        new_state = update_running_stats(state, *batch_moments, momentum=momentum)
    else:
        check_stale(state.count, on_stale, who)
        mean_bn = state.mean.astype(dt)
        var_bn = state.var.astype(dt)
        new_state = state
        batch_moments = None

    # sum_k w_k mu_k written around mu_IN (the weights sum to 1): exact for constant
    # inputs and free of the weights' rounding times a large mean.
    mean = mean_in + w[1] * (mean_ln - mean_in) + w[2] * (mean_bn - mean_in)
    var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
    a, b = _affine_from_stats(mean, var, scale, bias, eps)
    y = xl.astype(dt) * a + b
    y = jnp.moveaxis(y.astype(xl.dtype), -1, axis)
    return (y, new_state, batch_moments) if return_batch_stats else (y, new_state)
