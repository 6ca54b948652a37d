"""Group normalization (Wu & He, 2018) and its two limits, layer and instance norm.

All three are batch-independent: every statistic is computed per example, so the
output for one example never depends on the others (train and eval are the same).
Channels-last by default; ``axis`` names the channel axis and is moved last
internally. Axis 0 is the batch axis; the axes between batch and channel are
"spatial" (any number, including none).

Statistics: :func:`norms.moments` gives the per-(example, channel) moments over
the spatial axes (channels stay the minor, vectorized axis), and Chan's merge
(:func:`norms.merge_moments`) combines them exactly over each group's channels;
float32 (or wider), biased variance. The output is the per-(example, channel)
affine map ``y = x * a + b`` with ``a = scale * rsqrt(var + eps)`` and
``b = bias - mean * a``, which equals ``(x - mean) * rsqrt(var + eps) * scale + bias``.
Derivatives come from the closed-form JVP of :mod:`norms.standardize` (shared with
batch norm; forward and reverse mode, any order), whose transpose is the textbook
backward pass: two reductions and one elementwise pass over ``x`` (about 0.5x the
time of flax's GroupNorm fwd+bwd with its two-pass variance, and 0.85-1.05x our
batch norm's, on CPU; benchmarks/norms_bench.py, docs/benchmarks.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from norms.checks import channel_params, float_input, require_spatial
from norms.moments import broadcast_mask, merge_moments, moments, normalize_axes, stats_dtype
from norms.standardize import Population, standardize


def channels_last(x: jax.Array, axis: int, who: str) -> tuple[jax.Array, int]:
    """Moves the channel ``axis`` of ``x`` last; returns the moved array and ``axis`` >= 0.

    Axis 0 is the batch axis, so the channel axis may not be 0. Integer inputs
    become float32 (:func:`norms.checks.float_input`).
    """
    x = float_input(x, who)
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


def instance_moments(
    x: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-(example, channel) ``(count, mean, M2)`` of channels-last ``x`` ``(N, ..., C)``.

    One call to :func:`norms.moments` over the spatial axes (all but the first and
    last); each result has shape ``(N, C)``. ``mask`` must already have ``x``'s shape.
    With no spatial axis every statistic covers one value.
    """
    mean, var, count = moments(x, tuple(range(1, x.ndim - 1)), mask=mask)
    return count, mean, var * count


def grouped_moments(
    x: jax.Array, num_groups: int, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-(example, group) mean, biased variance and count of channels-last ``x``.

    The statistics of each group of ``C / G`` contiguous channels over the spatial
    axes: the per-(example, channel) moments from :func:`instance_moments` merged
    over the group's channels with Chan's formula (:func:`norms.merge_moments`),
    which is exact (count-weighted under a mask). Reducing over the spatial axes
    with the channels kept minor is one vectorized pass over ``x`` per moment, and
    the merge touches only ``(N, C)`` numbers, so this is faster than reducing a
    reshaped ``(N, *spatial, G, C/G)`` view directly. Returns ``(mean, var, count)``
    of shape ``(N, G)``.
    """
    n, c = x.shape[0], x.shape[-1]
    count, mean, m2 = (t.reshape(n, num_groups, c // num_groups) for t in instance_moments(x, mask))
    count, mean, m2 = merge_moments(count, mean, m2, axis=-1)
    return mean, m2 / jnp.maximum(count, 1.0), count


def per_channel(t: jax.Array, channels: int) -> jax.Array:
    """Repeats per-group ``(N, G)`` values over each group's ``C / G`` channels: ``(N, C)``."""
    return jnp.repeat(t, channels // t.shape[-1], axis=-1)


def normalize_grouped(
    x: jax.Array,
    num_groups: int,
    scale: jax.Array | None,
    bias: jax.Array | None,
    eps: float,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Group-normalizes channels-last ``x``; returns the result in the statistics dtype.

    ``(x - mean) * rsqrt(var + eps) * scale + bias`` with per-(example, group)
    statistics over the spatial axes and the group's channels, through
    :func:`norms.standardize.standardize` (per-(example, channel) moments merged
    over each group with Chan's formula; closed-form derivatives in forward and
    reverse mode). ``scale``/``bias`` are ``(C,)`` in the statistics dtype or
    ``None``; ``mask`` is boolean with ``x``'s shape or ``None``.
    """
    dt = stats_dtype(x.dtype)
    groups = None if num_groups == x.shape[-1] else num_groups
    pop = Population.of(tuple(range(1, x.ndim - 1)), num_groups=groups, centered=False)
    return standardize(x.astype(dt), pop, scale, bias, eps=eps, mask=mask)[0]


def _normalize_channels_last(who, num_groups, x, scale, bias, eps, axis, mask, spatial=False):
    """Shared body: checks, channels last, ``num_groups(C)`` groups, back to ``axis``."""
    shape = jnp.shape(x)
    xl, axis = channels_last(x, axis, who)
    if spatial:
        require_spatial(xl.ndim, shape, who, "each statistic would cover one value")
    c = xl.shape[-1]
    g = num_groups(c)
    scale, bias = channel_params(who, shape, axis, stats_dtype(xl.dtype), scale=scale, bias=bias)
    m = mask_channels_last(mask, shape, axis, who)
    y = normalize_grouped(xl, g, scale, bias, eps, m)
    return jnp.moveaxis(y.astype(xl.dtype), -1, axis)


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
    groups = functools.partial(resolve_num_groups, num_groups=num_groups, group_size=group_size)
    return _normalize_channels_last("group_norm", groups, x, scale, bias, eps, axis, mask)


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
    return _normalize_channels_last("layer_norm", lambda c: 1, x, scale, bias, eps, axis, mask)


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
    return _normalize_channels_last(
        "instance_norm", lambda c: c, x, scale, bias, eps, axis, mask, spatial=True
    )
