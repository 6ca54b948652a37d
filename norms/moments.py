"""The one statistics helper every norm uses: masked, stable, exact across devices.

Per device the statistics are computed in two passes (mean first, then the sum of
squared deviations M2), never as ``E[x^2] - E[x]^2``, and always in at least
float32. Across devices each one contributes its ``(count, mean, M2)``, merged
with Chan's parallel formula::

    n = sum_i n_i
    mean = sum_i n_i * mean_i / n
    M2 = sum_i M2_i + sum_i n_i * (mean_i - mean)^2

so uneven or masked per-device batches give exactly the statistics of one big
batch. Two ways to evaluate it across a group of ``N`` devices (``sync_strategy``):

- ``"gather"``: one ``all_gather`` of every device's stacked ``(count, mean, M2)``,
  then the merge locally. One collective (latency-bound groups win), but each
  device receives ``3 x C x (N - 1)`` numbers: traffic grows with ``N``.
- ``"psum"``: ``psum`` of ``(n_i, n_i * mean_i)`` gives ``n`` and ``mean``; then a
  ``psum`` of each device's centred ``M2_i + n_i * (mean_i - mean)^2`` gives
  ``M2``. Two all-reduces of ``2 x C`` and ``C`` numbers whatever ``N`` is; the
  same formula, so exact and as stable as the gather (``M2`` is never formed
  from raw second moments).
- ``"auto"`` (the default): ``"gather"`` for groups of at most
  :data:`GATHER_MAX_GROUP` devices, ``"psum"`` above. The group is the
  ``axis_index_groups`` group when given, else the whole axis. The threshold is
  measured in ``benchmarks/collectives_bench.py`` (docs/benchmarks.md).

:data:`SYNC_STRATEGY` is the strategy used when a caller passes none (every norm
built on :func:`moments`); it is read at trace time, so set it (e.g. with
``with norms.default_sync_strategy("psum"):``) around tracing, not around calls
of an already compiled function. (``norms.moments`` is the function; this module
is ``sys.modules["norms.moments"]``.)
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp

from norms.checks import float_input

Axes = int | Sequence[int]

SYNC_STRATEGIES = ("auto", "gather", "psum")
# Strategy of every cross-device merge that is not given one explicitly.
SYNC_STRATEGY = "auto"
# Largest device group "auto" merges with one all_gather. Measured on virtual CPU
# devices (benchmarks/collectives_bench.py, docs/benchmarks.md): on 8 the gather
# takes 0.83-0.98x the psum merge's time for C <= 256 (one collective instead of
# two in a row) and 0.93-1.14x for C = 1024-2048; on 16 it is 1.6-2.0x slower for
# C = 2048 in every run. Its traffic, 3 x C x (N - 1) numbers per device against
# the psum merge's ~6 x C, grows with N (12 MiB per 2048-channel layer at N = 512),
# so above 8 devices the constant-size merge is used.
GATHER_MAX_GROUP = 8


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


def nan_if_overflowed(t: jax.Array, *stats: jax.Array) -> jax.Array:
    """``t`` with NaN wherever one of ``stats`` (broadcast against it) is infinite.

    Float32 statistics of values around 1e19 and above overflow: the squared
    deviations exceed float32's 3.4e38, so the variance becomes inf and
    ``rsqrt(inf) = 0`` would turn a norm's output into plausible-looking zeros (or
    the bias). NaN instead reaches the loss and the gradients, where a non-finite
    guard (the trainer's skipped steps) sees it. Checking the small statistics
    arrays costs nothing next to the pass over the input, unlike rescaling every
    input by its max-abs to avoid the overflow (docs/benchmarks.md).
    """
    bad = functools.reduce(jnp.logical_or, (jnp.isinf(s) for s in stats))
    return jnp.where(bad, jnp.asarray(jnp.nan, t.dtype), t)


def inv_std(var: jax.Array, eps) -> jax.Array:
    """``rsqrt(var + eps)``, NaN where ``var`` overflowed to inf (:func:`nan_if_overflowed`)."""
    return nan_if_overflowed(jax.lax.rsqrt(var + eps), var)


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


@contextlib.contextmanager
def default_sync_strategy(strategy: str) -> Iterator[None]:
    """Sets :data:`SYNC_STRATEGY` (``"auto"``, ``"gather"``, ``"psum"``) inside a ``with``.

    Affects functions traced inside the block, e.g. to force one strategy for every
    SyncBN layer of a model: ``with default_sync_strategy("psum"): step = jax.jit(...).lower(...)``.
    """
    global SYNC_STRATEGY
    old, SYNC_STRATEGY = SYNC_STRATEGY, check_sync_strategy(strategy)
    try:
        yield
    finally:
        SYNC_STRATEGY = old


def check_sync_strategy(strategy: str | None) -> str:
    """``strategy`` (None: :data:`SYNC_STRATEGY`) after checking it is a known one."""
    strategy = SYNC_STRATEGY if strategy is None else strategy
    if strategy not in SYNC_STRATEGIES:
        raise ValueError(
            f"sync_strategy={strategy!r} is not one of {SYNC_STRATEGIES}; use 'auto' "
            "(gather on small device groups, psum on large ones)"
        )
    return strategy


def sync_group_size(
    axis_name: str | tuple[str, ...], axis_index_groups: Sequence[Sequence[int]] | None = None
) -> int:
    """Number of devices whose values one statistic merges (must be traced under the axis)."""
    if axis_index_groups is not None:
        return len(axis_index_groups[0])
    names = axis_name if isinstance(axis_name, tuple | list) else (axis_name,)
    return math.prod(jax.lax.axis_size(name) for name in names)


def resolve_sync_strategy(
    strategy: str | None,
    axis_name: str | tuple[str, ...],
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> str:
    """``"gather"`` or ``"psum"`` for ``strategy`` (None: :data:`SYNC_STRATEGY`)."""
    strategy = check_sync_strategy(strategy)
    if strategy != "auto":
        return strategy
    small = sync_group_size(axis_name, axis_index_groups) <= GATHER_MAX_GROUP
    return "gather" if small else "psum"


def merge_across_devices(
    count: jax.Array,
    mean: jax.Array,
    m2: jax.Array,
    axis_name: str | tuple[str, ...] | None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    sync_strategy: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-device ``(count, mean, M2)`` (same shapes) -> their union over ``axis_name``.

    ``sync_strategy`` (``"auto"``, ``"gather"``, ``"psum"``; None means
    :data:`SYNC_STRATEGY`) picks one ``all_gather`` + Chan's merge or the two
    constant-size ``psum`` merge (module docstring). Identity when ``axis_name`` is
    None. Used by :func:`moments` and by norms that derive their per-device
    moments from other moments (e.g. switchable norm's BN branch).
    """
    if axis_name is None:
        return count, mean, m2
    count, mean, m2 = jnp.broadcast_arrays(count, mean, m2)
    groups = axis_index_groups
    if resolve_sync_strategy(sync_strategy, axis_name, groups) == "gather":
        gathered = jax.lax.all_gather(
            jnp.stack((count, mean, m2)), axis_name, axis_index_groups=groups
        )
        return merge_moments(gathered[:, 0], gathered[:, 1], gathered[:, 2])
    total, weighted = jax.lax.psum(
        jnp.stack((count, count * mean)), axis_name, axis_index_groups=groups
    )
    merged_mean = weighted / jnp.maximum(total, 1.0)
    centred = m2 + count * jnp.square(mean - merged_mean)
    return total, merged_mean, jax.lax.psum(centred, axis_name, axis_index_groups=groups)


def moments(
    x: jax.Array,
    axes: Axes,
    *,
    axis_name: str | tuple[str, ...] | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: jax.Array | None = None,
    keepdims: bool = False,
    sync_strategy: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, biased variance and count of ``x`` over ``axes`` (and over devices).

    Args:
      x: any shape, any real dtype. Statistics are computed in float32 (or wider
        when ``x`` is wider), whatever the input dtype (integers included).
      axes: axes of ``x`` to reduce over, e.g. ``(0, 1, 2)`` for per-channel batch
        statistics of an NHWC tensor.
      axis_name: a pmap/shard_map axis name (or tuple of names); statistics are then
        over the union of all devices' values, weighted by their counts.
      axis_index_groups: optional groups of device indices on ``axis_name``; each
        group gets its own statistics (e.g. ``[[0, 1, 2, 3], [4, 5, 6, 7]]``).
      mask: optional boolean array broadcastable to ``x``; True marks the values
        that count. Masked-out values never touch the statistics.
      keepdims: keep the reduced axes with size 1 (handy for broadcasting back).
      sync_strategy: how devices are merged under ``axis_name``: ``"gather"``
        (one ``all_gather``), ``"psum"`` (two constant-size all-reduces) or
        ``"auto"`` (gather up to :data:`GATHER_MAX_GROUP` devices per group);
        None means :data:`SYNC_STRATEGY` (default ``"auto"``).

    Returns:
      ``(mean, var, count)``: ``var = sum (x - mean)^2 / count`` (biased), in the
      statistics dtype; ``count`` is the number of values that entered each
      statistic, summed over devices. With ``count == 0`` mean and var are 0.

    Either strategy merges the per-device ``(count, mean, M2)`` with Chan's formula,
    so the result equals one device holding every value, exactly (up to float
    rounding) for uneven or masked batches.
    """
    x = float_input(x, "moments")
    axes = normalize_axes(axes, x.ndim)
    mask = broadcast_mask(mask, x.shape)
    check_axis_name(axis_name)
    check_sync_strategy(sync_strategy)
    count, mean, m2 = local_moments(x, axes, mask, keepdims)
    count, mean, m2 = merge_across_devices(
        count, mean, m2, axis_name, axis_index_groups, sync_strategy
    )
    var = m2 / jnp.maximum(count, 1.0)
    return mean, var, count
