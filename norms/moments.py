"""The one statistics helper every norm uses: masked, stable, exact across devices.

Per device the statistics are computed in two passes (mean first, then the sum of
squared deviations M2), never as ``E[x^2] - E[x]^2``, and always in at least
float32. Across devices each one contributes its ``(count, mean, M2)``; a single
``all_gather`` brings them together and Chan's parallel formula merges them::

    n = sum_i n_i
    mean = sum_i n_i * mean_i / n
    M2 = sum_i M2_i + sum_i n_i * (mean_i - mean)^2

so uneven or masked per-device batches give exactly the statistics of one big
batch, with one collective per call.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

Axes = int | Sequence[int]


def normalize_axes(axes: Axes, ndim: int) -> tuple[int, ...]:
    """Turns ``axes`` (int or sequence, negatives allowed) into sorted non-negative ints."""
    if isinstance(axes, int):
        axes = (axes,)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for an input with {ndim} dimensions")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axes {tuple(axes)} name the same dimension twice")
    return tuple(sorted(out))


def stats_dtype(dtype) -> jnp.dtype:
    """Dtype statistics are accumulated in: float32, or wider when the input is wider."""
    return jnp.promote_types(dtype, jnp.float32)


def check_axis_name(axis_name, who: str = "moments") -> None:
    """Raises a readable error when ``axis_name`` is not bound by pmap/shard_map/vmap."""
    if axis_name is None:
        return
    names = axis_name if isinstance(axis_name, tuple | list) else (axis_name,)
    for name in names:
        try:
            jax.lax.axis_index(name)
        except NameError as err:
            raise ValueError(
                f"{who}: axis_name={name!r} is not bound here. Call it inside "
                f"jax.pmap(..., axis_name={name!r}) or shard_map over a mesh axis "
                f"{name!r}, or pass axis_name=None (under jit with a sharded batch XLA "
                "already computes global statistics)."
            ) from err


def broadcast_mask(mask: jax.Array | None, shape: tuple[int, ...], who: str = "moments"):
    """Broadcasts a boolean ``mask`` to ``shape``; errors name both shapes."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    try:
        jnp.broadcast_shapes(mask.shape, shape)
    except ValueError as err:
        raise ValueError(
            f"{who}: mask of shape {mask.shape} does not broadcast to the input's shape "
            f"{shape}; give it the input's shape or size-1 axes, e.g. (N, 1, 1, 1) to "
            "mask whole examples."
        ) from err
    if jnp.broadcast_shapes(mask.shape, shape) != tuple(shape):
        raise ValueError(
            f"{who}: mask of shape {mask.shape} would enlarge the input's shape {shape}"
        )
    return jnp.broadcast_to(mask.astype(bool), shape)


def local_moments(
    x: jax.Array, axes: tuple[int, ...], mask: jax.Array | None, keepdims: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-device ``(count, mean, M2)`` over ``axes`` in the statistics dtype, two-pass."""
    x = x.astype(stats_dtype(x.dtype))
    if mask is None:
        count = 1
        for a in axes:
            count *= x.shape[a]
        mean = jnp.mean(x, axis=axes, keepdims=True)
        m2 = jnp.sum(jnp.square(x - mean), axis=axes, keepdims=True)
        count = jnp.full(mean.shape, count, x.dtype)
    else:
        w = mask.astype(x.dtype)
        count = jnp.sum(w, axis=axes, keepdims=True)
        safe = jnp.maximum(count, 1.0)
        mean = jnp.sum(x * w, axis=axes, keepdims=True) / safe
        m2 = jnp.sum(jnp.square(x - mean) * w, axis=axes, keepdims=True)
    if not keepdims:
        count, mean, m2 = (jnp.squeeze(t, axis=axes) for t in (count, mean, m2))
    return count, mean, m2


def merge_moments(
    count: jax.Array, mean: jax.Array, m2: jax.Array, axis: int = 0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Chan's parallel merge of stacked per-part ``(count, mean, M2)`` along ``axis``.

    Exact for any counts, including parts with count 0 (they contribute nothing).
    """
    total = jnp.sum(count, axis=axis)
    safe = jnp.maximum(total, 1.0)
    merged_mean = jnp.sum(count * mean, axis=axis) / safe
    delta = mean - jnp.expand_dims(merged_mean, axis)
    merged_m2 = jnp.sum(m2, axis=axis) + jnp.sum(count * jnp.square(delta), axis=axis)
    return total, merged_mean, merged_m2


def merge_across_devices(
    count: jax.Array,
    mean: jax.Array,
    m2: jax.Array,
    axis_name: str | tuple[str, ...] | None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-device ``(count, mean, M2)`` (same shapes) -> their union over ``axis_name``.

    One ``all_gather`` of the stacked triple, then Chan's merge. Identity when
    ``axis_name`` is None. Used by :func:`moments` and by norms that derive their
    per-device moments from other moments (e.g. switchable norm's BN branch).
    """
    if axis_name is None:
        return count, mean, m2
    stacked = jnp.stack(jnp.broadcast_arrays(count, mean, m2))
    gathered = jax.lax.all_gather(stacked, axis_name, axis_index_groups=axis_index_groups)
    return merge_moments(gathered[:, 0], gathered[:, 1], gathered[:, 2])


def moments(
    x: jax.Array,
    axes: Axes,
    *,
    axis_name: str | tuple[str, ...] | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: jax.Array | None = None,
    keepdims: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, biased variance and count of ``x`` over ``axes`` (and over devices).

    Args:
      x: any shape, any float dtype. Statistics are computed in float32 (or wider
        when ``x`` is wider), whatever the input dtype.
      axes: axes of ``x`` to reduce over, e.g. ``(0, 1, 2)`` for per-channel batch
        statistics of an NHWC tensor.
      axis_name: a pmap/shard_map axis name (or tuple of names); statistics are then
        over the union of all devices' values, weighted by their counts.
      axis_index_groups: optional groups of device indices on ``axis_name``; each
        group gets its own statistics (e.g. ``[[0, 1, 2, 3], [4, 5, 6, 7]]``).
      mask: optional boolean array broadcastable to ``x``; True marks the values
        that count. Masked-out values never touch the statistics.
      keepdims: keep the reduced axes with size 1 (handy for broadcasting back).

    Returns:
      ``(mean, var, count)``: ``var = sum (x - mean)^2 / count`` (biased), in the
      statistics dtype; ``count`` is the number of values that entered each
      statistic, summed over devices. With ``count == 0`` mean and var are 0.

    One ``all_gather`` per call moves the per-device ``(count, mean, M2)``; they are
    merged with Chan's formula, so the result equals one device holding every
    value, exactly (up to float rounding) for uneven or masked batches.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    axes = normalize_axes(axes, x.ndim)
    mask = broadcast_mask(mask, x.shape)
    check_axis_name(axis_name)
    count, mean, m2 = local_moments(x, axes, mask, keepdims)
    count, mean, m2 = merge_across_devices(count, mean, m2, axis_name, axis_index_groups)
    var = m2 / jnp.maximum(count, 1.0)
    return mean, var, count
