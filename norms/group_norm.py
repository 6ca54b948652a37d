"""Group normalization (Wu & He, 2018) and its two limits, layer and instance norm.

All three are batch-independent: every statistic is computed per example, so the
output for one example never depends on the others (train and eval are the same).
Channels-last by default; ``axis`` names the channel axis and is moved last
internally. Axis 0 is the batch axis; the axes between batch and channel are
"spatial" (any number, including none).

Statistics run through :func:`norms.moments` on a reshaped ``(N, *spatial, G, C/G)``
view of ``x`` in one fused reduction, in float32 (or wider), with the biased
variance. The result is applied as one per-(example, channel) affine map
``y = x * a + b`` with ``a = scale * rsqrt(var + eps)`` and
``b = bias - mean * a``, which equals ``(x - mean) * rsqrt(var + eps) * scale + bias``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from norms.moments import broadcast_mask, moments, normalize_axes, stats_dtype


def channels_last(x: jax.Array, axis: int, who: str) -> tuple[jax.Array, int]:
    """Moves the channel ``axis`` of ``x`` last; returns the moved array and ``axis`` >= 0.

    Axis 0 is the batch axis, so the channel axis may not be 0.
    """
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(
            f"{who}: expected an input of shape (N, ..., C) with at least 2 dimensions, "
            f"got shape {x.shape}"
        )
    (axis,) = normalize_axes(axis, x.ndim)
    if axis == 0:
        raise ValueError(
            f"{who}: axis=0 is the batch axis; pass the channel axis, e.g. axis=-1 for "
            "NHWC or axis=1 for NCHW"
        )
    return jnp.moveaxis(x, axis, -1), axis


def check_param(p: jax.Array | None, channels: int, name: str, who: str, dtype) -> jax.Array | None:
    """Checks that a per-channel parameter has shape ``(C,)`` and casts it to ``dtype``."""
    if p is None:
        return None
    p = jnp.asarray(p)
    if p.shape != (channels,):
        raise ValueError(
            f"{who}: {name} has shape {p.shape} but the input has {channels} channels on "
            f"its channel axis; expected shape ({channels},) (check `axis` and that the "
            "parameter is per channel)"
        )
    return p.astype(dtype)


def mask_channels_last(mask, shape: tuple[int, ...], axis: int, who: str):
    """Broadcasts ``mask`` to the input's original ``shape`` and moves ``axis`` last."""
    if mask is None:
        return None
    return jnp.moveaxis(broadcast_mask(mask, shape, who), axis, -1)


def resolve_num_groups(channels: int, num_groups: int | None, group_size: int | None) -> int:
    """Number of groups from exactly one of ``num_groups`` / ``group_size`` (default 32)."""
    if num_groups is not None and group_size is not None:
        raise ValueError(
            f"group_norm: got num_groups={num_groups} and group_size={group_size}; "
            "pass exactly one of them"
        )
    if group_size is not None:
        if group_size < 1 or channels % group_size:
            raise ValueError(
                f"group_norm: group_size={group_size} does not divide the {channels} "
                f"channels; choose a divisor of {channels}"
            )
        return channels // group_size
    num_groups = 32 if num_groups is None else num_groups
    if num_groups < 1 or channels % num_groups:
        raise ValueError(
            f"group_norm: num_groups={num_groups} does not divide the {channels} channels; "
            f"choose a divisor of {channels} (or pass group_size=)"
        )
    return num_groups


def grouped_moments(
    x: jax.Array, num_groups: int, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, tuple[int, ...]]:
    """Per-(example, group) mean and variance of channels-last ``x`` of shape ``(N, ..., C)``.

    The statistics run over ``(*spatial, C / G)`` of the view ``(N, *spatial, G, C/G)``
    in one call to :func:`norms.moments`; ``mask`` (already broadcast to ``x.shape``)
    selects the values that count. Returns ``(mean, var, view_shape)`` with ``mean``
    and ``var`` shaped to broadcast against the view.
    """
    c = x.shape[-1]
    view = x.shape[:-1] + (num_groups, c // num_groups)
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    m = None if mask is None else mask.reshape(view)
    mean, var, _ = moments(x.reshape(view), axes, mask=m, keepdims=True)
    return mean, var, view


def affine_normalize(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    eps: float,
) -> jax.Array:
    """``(x - mean) * rsqrt(var + eps) * scale + bias`` as one affine map, in the stats dtype.

    ``x`` has channels last; ``mean``/``var`` broadcast against it; ``scale``/``bias``
    are ``(C,)`` or ``None``. Returns the result in the statistics dtype.
    """
    a = jax.lax.rsqrt(var + eps)
    if scale is not None:
        a = a * scale
    b = -mean * a
    if bias is not None:
        b = b + bias
    return x.astype(a.dtype) * a + b


def group_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    num_groups: int | None = None,
    group_size: int | None = None,
    eps: float = 1e-5,
    axis: int = -1,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Group normalization (Wu & He, 2018) of ``x`` of shape ``(N, ..., C)``.

    The ``C`` channels are split into ``G`` contiguous groups; each example and group
    is normalized with the mean and biased variance over its spatial axes and its
    ``C / G`` channels: ``y = (x - mean) * rsqrt(var + eps) * scale + bias``.

    Args:
      x: input, batch axis 0, channel axis ``axis`` (any number of spatial axes).
      scale, bias: optional per-channel ``(C,)`` arrays (``None``: no affine).
      num_groups: number of groups ``G``. Exactly one of ``num_groups`` /
        ``group_size``; with neither, ``G = 32``. It must divide ``C``.
      group_size: channels per group ``C / G`` instead of ``num_groups``.
      eps: added to the variance inside the square root.
      axis: the channel axis.
      mask: optional boolean array broadcastable to ``x``; only True values enter
        the statistics (every value is still normalized with them).

    ``G = 1`` is layer norm over ``(H, W, C)``; ``G = C`` is instance norm.
    Statistics in float32 (or wider); output in ``x``'s dtype.
    """
    who = "group_norm"
    shape = jnp.shape(x)
    xl, axis = channels_last(x, axis, who)
    c = xl.shape[-1]
    g = resolve_num_groups(c, num_groups, group_size)
    dt = stats_dtype(xl.dtype)
    scale = check_param(scale, c, "scale", who, dt)
    bias = check_param(bias, c, "bias", who, dt)
    m = mask_channels_last(mask, shape, axis, who)
    mean, var, view = grouped_moments(xl, g, m)
    if scale is not None:
        scale = scale.reshape(view[-2:])
    if bias is not None:
        bias = bias.reshape(view[-2:])
    y = affine_normalize(xl.reshape(view), mean, var, scale, bias, eps)
    return jnp.moveaxis(y.reshape(xl.shape).astype(xl.dtype), -1, axis)


def layer_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    eps: float = 1e-5,
    axis: int = -1,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Layer normalization (Ba et al., 2016) over all non-batch axes of ``x`` ``(N, ..., C)``.

    Per example: mean and biased variance over every axis but the batch axis 0
    (``(H, W, C)`` for images), ``y = (x - mean) * rsqrt(var + eps) * scale + bias``
    with per-channel ``(C,)`` ``scale`` and ``bias`` on the channel ``axis``. Equal
    to ``group_norm`` with one group, and to ``flax.linen.LayerNorm`` with
    ``reduction_axes`` = the non-batch axes and ``feature_axes=-1``.
    ``mask`` as in :func:`group_norm`.
    """
    who = "layer_norm"
    shape = jnp.shape(x)
    xl, axis = channels_last(x, axis, who)
    c = xl.shape[-1]
    dt = stats_dtype(xl.dtype)
    scale = check_param(scale, c, "scale", who, dt)
    bias = check_param(bias, c, "bias", who, dt)
    m = mask_channels_last(mask, shape, axis, who)
    mean, var, _ = moments(xl, tuple(range(1, xl.ndim)), mask=m, keepdims=True)
    y = affine_normalize(xl, mean, var, scale, bias, eps)
    return jnp.moveaxis(y.astype(xl.dtype), -1, axis)


def instance_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    eps: float = 1e-5,
    axis: int = -1,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Instance normalization (Ulyanov et al., 2016) of ``x`` of shape ``(N, ..., C)``.

    Per example and channel: mean and biased variance over the spatial axes (all
    axes but batch and channel), ``y = (x - mean) * rsqrt(var + eps) * scale + bias``.
    Equal to ``group_norm`` with ``C`` groups. ``x`` needs at least one spatial axis
    (with none every statistic would cover a single value). ``mask`` as in
    :func:`group_norm`.
    """
    who = "instance_norm"
    shape = jnp.shape(x)
    xl, axis = channels_last(x, axis, who)
    if xl.ndim < 3:
        raise ValueError(
            f"instance_norm: input of shape {shape} has no spatial axis, so each "
            "statistic would cover one value; use an (N, ..., C) input with spatial axes "
            "or layer_norm"
        )
    c = xl.shape[-1]
    dt = stats_dtype(xl.dtype)
    scale = check_param(scale, c, "scale", who, dt)
    bias = check_param(bias, c, "bias", who, dt)
    m = mask_channels_last(mask, shape, axis, who)
    mean, var, _ = moments(xl, tuple(range(1, xl.ndim - 1)), mask=m, keepdims=True)
    y = affine_normalize(xl, mean, var, scale, bias, eps)
    return jnp.moveaxis(y.astype(xl.dtype), -1, axis)
