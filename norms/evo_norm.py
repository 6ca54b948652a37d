"""EvoNorm-B0 and EvoNorm-S0 (Liu et al., 2020): normalization fused with the activation.

Both replace a norm + ReLU pair. ``v``, ``scale`` are per channel and start at 1,
``bias`` at 0; ``eps = 1e-5``; statistics in float32 via :func:`norms.moments`.

- B0 (batch-dependent): ``y = x / max(sqrt(var_B + eps), v * x + sqrt(var_I + eps))
  * scale + bias`` with ``var_B`` the variance over ``(N, *spatial)`` (and devices)
  and ``var_I`` the per-example variance over the spatial axes. Eval uses a
  running ``var_B`` kept like batch norm's.
- S0 (batch-independent): ``y = x * sigmoid(v * x) / sqrt(var_G + eps) * scale +
  bias`` with ``var_G`` the group-norm variance over ``(*spatial, C / G)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from norms.checks import channel_params, check_running_args, require_spatial
from norms.group_norm import channels_last, grouped_moments, mask_channels_last, per_channel
from norms.moments import inv_std, moments, nan_if_overflowed, stats_dtype
from norms.running_stats import BatchMoments, BatchNormState, check_stale, update_running_stats


def evonorm_b0(
    x: jax.Array,
    state: BatchNormState,
    scale: jax.Array | None,
    bias: jax.Array | None,
    v: jax.Array,
    *,
    train: bool,
    momentum=0.9,
    eps: float = 1e-5,
    axis: int = -1,
    axis_name: str | tuple[str, ...] | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: jax.Array | None = None,
    unbiased_running_var: bool = False,
    on_stale: str = "warn",
    return_batch_stats: bool = False,
) -> tuple[jax.Array, BatchNormState]:
    """EvoNorm-B0 of ``x`` of shape ``(N, *spatial, C)``.

    ``y = x / max(sqrt(var_B + eps), v * x + sqrt(var_I + eps)) * scale + bias``.

    Args:
      x: input, batch axis 0, channel axis ``axis``, at least one spatial axis.
      state: :class:`norms.running_stats.BatchNormState`; ``state.var`` is the running
        ``var_B`` used in eval. ``state.mean`` is updated too (same rule) but unused.
      scale, bias: per-channel ``(C,)`` arrays or ``None``.
      v: per-channel ``(C,)`` (init 1).
      train: required. True: ``var_B`` from the batch (biased, over the batch,
        spatial axes and devices on ``axis_name``; one collective), running stats
        updated with ``new = momentum * old + (1 - momentum) * batch``. False:
        ``var_B = state.var``, state unchanged.
      eps: inside both square roots.
      axis: channel axis.
      axis_name, axis_index_groups: cross-device batch variance.
      mask: optional boolean broadcastable to ``x``: values that enter the batch and
        instance variances.
      unbiased_running_var: store ``n / (n - 1) * var_B`` (n the cross-device,
        masked count) in the running variance, as timm's ``EvoNorm2dB0`` and
        PyTorch's batch norm do; the normalization always uses the biased
        ``var_B``, and eval uses the stored value.
      on_stale: "warn" | "error" | "ignore" for eval with never-updated statistics.
      return_batch_stats: also return the batch :class:`~norms.running_stats.BatchMoments`
        (``(C,)`` mean, biased var, count; ``None`` in eval), e.g. for
        :func:`norms.recompute_batch_stats`.

    Returns ``(y, new_state)`` (plus the batch moments with ``return_batch_stats``);
    ``y`` in ``x``'s dtype.
    """
    who = "evonorm_b0"
    shape = jnp.shape(x)
    xl, axis = channels_last(x, axis, who)
    require_spatial(xl.ndim, shape, who, "the instance variance needs one")
    c = xl.shape[-1]
    dt = stats_dtype(xl.dtype)
    scale, bias, v = channel_params(who, shape, axis, dt, scale=scale, bias=bias, v=v)
    check_running_args(state, shape, axis, momentum, eps, on_stale, who)
    m = mask_channels_last(mask, shape, axis, who)
    if train:
        if xl.size // c == 1 and axis_name is None:
            raise ValueError(
                f"{who}: training would reduce the batch variance over one value per "
                f"channel (input shape {shape}); use a bigger batch or pass axis_name"
            )
        mean_b, var_b, cnt_b = moments(
            xl,
            tuple(range(xl.ndim - 1)),
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            mask=m,
        )
        batch_moments = BatchMoments(*(jax.lax.stop_gradient(t) for t in (mean_b, var_b, cnt_b)))
        new_state = update_running_stats(
            state, *batch_moments, momentum=momentum, unbiased=unbiased_running_var
        )
    else:
        check_stale(state.count, on_stale, who)
        var_b = state.var.astype(dt)
        new_state = state
        batch_moments = None
    _, var_i, _ = moments(xl, tuple(range(1, xl.ndim - 1)), mask=m, keepdims=True)
    xf = xl.astype(dt)
    den = jnp.maximum(jnp.sqrt(var_b + eps), v * xf + jnp.sqrt(var_i + eps))
    y = nan_if_overflowed(xf / den, var_b, var_i)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    y = jnp.moveaxis(y.astype(xl.dtype), -1, axis)
    return (y, new_state, batch_moments) if return_batch_stats else (y, new_state)


def evonorm_s0_groups(channels: int, num_groups: int = 32) -> int:
    """Groups EvoNorm-S0 uses: the largest divisor of ``channels`` that is <= ``num_groups``.

    ``num_groups`` when it divides ``channels`` (the paper's 32 for the usual widths);
    e.g. 24 channels -> 24 groups, 48 -> 24, 100 -> 25.
    """
    if num_groups < 1:
        raise ValueError(f"evonorm_s0: num_groups={num_groups} must be >= 1")
    return max(g for g in range(1, min(num_groups, channels) + 1) if channels % g == 0)


def evonorm_s0(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    v: jax.Array,
    *,
    num_groups: int = 32,
    eps: float = 1e-5,
    axis: int = -1,
    mask: jax.Array | None = None,
) -> jax.Array:
    """EvoNorm-S0 of ``x`` of shape ``(N, *spatial, C)``; batch-independent.

    ``y = x * sigmoid(v * x) / sqrt(var_G + eps) * scale + bias`` with ``var_G``
    the biased variance per example and group over ``(*spatial, C / G)``.

    Args:
      x: input, batch axis 0, channel axis ``axis``, at least one spatial axis.
      scale, bias: per-channel ``(C,)`` arrays or ``None``.
      v: per-channel ``(C,)`` (init 1).
      num_groups: the paper's G = 32. When it does not divide ``C`` the largest
        divisor of ``C`` below it is used (:func:`evonorm_s0_groups`), so any
        width works (e.g. C = 24 -> G = 24).
      eps: inside the square root.
      axis: channel axis.
      mask: optional boolean broadcastable to ``x``: only True values enter
        ``var_G`` (e.g. padded positions); every value is normalized with it, as in
        :func:`norms.group_norm`. The statistics are per example, so masking whole
        examples (shape ``(N, 1, 1, 1)``) leaves the others' outputs unchanged; a
        group with no True value gets ``var_G = 0`` (finite outputs).
    """
    who = "evonorm_s0"
    shape = jnp.shape(x)
    xl, axis = channels_last(x, axis, who)
    require_spatial(xl.ndim, shape, who, "the group variance needs one")
    c = xl.shape[-1]
    g = evonorm_s0_groups(c, num_groups)
    dt = stats_dtype(xl.dtype)
    scale, bias, v = channel_params(who, shape, axis, dt, scale=scale, bias=bias, v=v)
    _, var_g, _ = grouped_moments(xl, g, mask_channels_last(mask, shape, axis, who))
    inv = per_channel(inv_std(var_g, eps), c)
    xf = xl.astype(dt)
    y = xf * jax.nn.sigmoid(v * xf) * inv.reshape((xl.shape[0],) + (1,) * (xl.ndim - 2) + (c,))
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return jnp.moveaxis(y.astype(xl.dtype), -1, axis)
