"""Normalizing with the input's own statistics, differentiated in closed form.

Batch norm (train mode), group norm, layer norm and instance norm all compute::

    y = (x - mean) * rsqrt(var + eps) * scale + bias

with ``mean``/``var`` the statistics of ``x`` itself over some population of
values (a :class:`Population`): per channel over the batch and spatial axes (and
devices) for batch norm, per example and channel group for group norm.
:func:`standardize` does that once for all of them, with a closed-form JVP
(forward and reverse mode, any order) instead of differentiating the two-pass
statistics. Writing ``E`` for the average over a statistic's (unmasked)
population and ``xhat = (x - mean) * r``, ``r = rsqrt(var + eps)``::

    d mean = E[dx]
    d var  = 2 E[(x - mean) dx]
    d y    = scale * r * (dx - d mean - xhat * E[xhat dx]) + xhat * d scale + d bias

Every full-size term of the linear map is ``dx`` or ``x - mean`` (or raw ``x``,
see ``Population.centered``) times a small per-statistic array, so its transpose
(the backward pass) is two reductions (``sum(ct)`` and ``sum((x - mean) * ct)``,
then one collective for both under ``axis_name``) and one elementwise pass.
Batch norm centres on the mean (``x - mean`` is the very array the forward pass
formed for ``M2``, and large-mean inputs keep full precision); group norm works
from raw ``x``, which is faster there.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from norms.moments import (
    inv_std,
    local_moments,
    merge_across_devices,
    merge_moments,
    resolve_sync_strategy,
)


@dataclasses.dataclass(frozen=True)
class Population:
    """Which values of ``x`` each statistic covers.

    Three stages, from ``x`` to the statistics:

    1. ``axes``: reduced locally with ``keepdims`` -> the *partial* layout
       (``x``'s shape with those axes set to 1), e.g. ``(1, 1, 1, C)`` for batch
       norm on NHWC, ``(N, 1, 1, C)`` for group norm.
    2. ``num_groups``: if set, the LAST axis (channels) is merged in that many
       contiguous groups -> last axis ``G`` (group norm); otherwise unchanged.
    3. ``axis_name``/``axis_index_groups``: merged across devices (one ``all_gather``
       or two constant-size ``psum``s in the forward pass, by ``sync_strategy``;
       one ``psum`` in the backward pass).

    The result is the *statistics* layout, broadcastable against ``x`` after
    :meth:`expand`. Hashable (a static argument of :func:`standardize`).

    ``centered`` chooses how the output and the derivative sums are formed:
    around the mean (``(x - mean) * a``, ``sum((x - mean) * ct)``: best precision
    for inputs whose mean is large against their spread, and cheap when ``x -
    mean`` is the array the forward pass formed for ``M2``, as in batch norm), or
    from raw ``x`` (``x * a + b``, ``sum(x * ct) - mean * sum(ct)``: no centred
    copy of ``x`` at all; faster where the statistic's mean is not the forward's
    per-partial mean, as in group norm). Both are exact in exact arithmetic.
    """

    axes: tuple[int, ...]
    num_groups: int | None = None
    axis_name: str | tuple[str, ...] | None = None
    axis_index_groups: tuple[tuple[int, ...], ...] | None = None
    centered: bool = True
    sync_strategy: str | None = None

    @staticmethod
    def of(
        axes,
        num_groups=None,
        axis_name=None,
        axis_index_groups=None,
        centered=True,
        sync_strategy=None,
    ) -> Population:
        """Builds a population, turning list arguments into (hashable) tuples.

        With ``axis_name`` (bound: call it under the axis) the merge strategy is
        resolved here to ``"gather"`` or ``"psum"`` (None: ``norms.moments``'s
        ``SYNC_STRATEGY``), so it is part of the static argument: JAX's trace
        caches then never reuse a merge traced under another strategy.
        """
        if isinstance(axis_name, list):
            axis_name = tuple(axis_name)
        if axis_index_groups is not None:
            axis_index_groups = tuple(tuple(int(i) for i in g) for g in axis_index_groups)
        if axis_name is not None:
            sync_strategy = resolve_sync_strategy(sync_strategy, axis_name, axis_index_groups)
        return Population(
            tuple(axes), num_groups, axis_name, axis_index_groups, centered, sync_strategy
        )

    def _grouped(self, t: jax.Array) -> jax.Array:
        c = t.shape[-1]
        return t.reshape(t.shape[:-1] + (self.num_groups, c // self.num_groups))

    def merge(self, count, mean, m2):
        """Partial-layout ``(count, mean, M2)`` -> statistics layout (Chan's merge)."""
        if self.num_groups is not None:
            count, mean, m2 = merge_moments(
                *(self._grouped(t) for t in jnp.broadcast_arrays(count, mean, m2)), axis=-1
            )
        return merge_across_devices(
            count, mean, m2, self.axis_name, self.axis_index_groups, self.sync_strategy
        )

    def total(self, sums: jax.Array) -> jax.Array:
        """Partial-layout sums (any leading stack axes) -> sums over whole populations."""
        if self.num_groups is not None:
            sums = jnp.sum(self._grouped(sums), axis=-1)
        if self.axis_name is not None:
            sums = jax.lax.psum(sums, self.axis_name, axis_index_groups=self.axis_index_groups)
        return sums

    def expand(self, t: jax.Array, channels: int) -> jax.Array:
        """Statistics layout -> partial layout (repeats each group's value over its channels)."""
        if self.num_groups is None:
            return t
        return jnp.repeat(t, channels // self.num_groups, axis=-1)


def is_zero_tangent(t) -> bool:
    """True for a tangent that ``jax.custom_jvp(..., symbolic_zeros=True)`` marks as zero."""
    return t is None or isinstance(t, SymbolicZero)


def _forward(pop: Population, eps: float, x, scale, bias, mask):
    """Primal outputs ``(y, mean, var, count)`` plus what the JVP reuses."""
    c = x.shape[-1] if pop.num_groups is not None else None
    count, mean, m2 = pop.merge(*local_moments(x, pop.axes, mask, keepdims=True))
    var = m2 / jnp.maximum(count, 1.0)
    r = inv_std(var, eps)
    r_p = pop.expand(r, c)
    mean_p = pop.expand(mean, c)
    a = r_p if scale is None else r_p * scale
    xc, shift = _centre(pop, x, mean_p)
    b = bias
    if shift is not None:
        b = shift * a if b is None else b + shift * a
    y = xc * a if b is None else xc * a + b
    return (y, mean, var, count), (mean_p, r, r_p, a)


def _centre(pop: Population, x, mean_p):
    """``(xc, shift)`` with ``x - mean = xc + shift`` (``shift`` None when 0)."""
    return (x - mean_p, None) if pop.centered else (x, -mean_p)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _standardize(pop, eps, x, scale, bias, mask):
    return _forward(pop, eps, x, scale, bias, mask)[0]


@functools.partial(_standardize.defjvp, symbolic_zeros=True)
def _standardize_jvp(pop, eps, primals, tangents):
    """Closed-form JVP; see the module docstring for the formulas."""
    x, scale, bias, mask = primals
    dx, dscale, dbias, _ = tangents
    out, (mean_p, r, r_p, a) = _forward(pop, eps, x, scale, bias, mask)
    y, mean, var, count = out
    c = x.shape[-1] if pop.num_groups is not None else None
    xc, shift = _centre(pop, x, mean_p)
    # dy = a * dx + alpha + xc * beta, alpha and beta in the partial layout.
    alpha = beta = None
    dmean = dvar = jnp.zeros_like(mean)
    if not is_zero_tangent(dx):
        wdx = dx if mask is None else jnp.where(mask, dx, 0.0)
        s1 = jnp.sum(wdx, axis=pop.axes, keepdims=True)
        s2 = jnp.sum(xc * wdx, axis=pop.axes, keepdims=True)
        if shift is not None:
            s2 = s2 + shift * s1
        s1, s2 = pop.total(jnp.stack(jnp.broadcast_arrays(s1, s2)))
        inv = 1.0 / jnp.maximum(count, 1.0)
        dmean = s1 * inv
        dvar = 2.0 * s2 * inv
        beta = -a * pop.expand(r * r * s2 * inv, c)
        alpha = -a * pop.expand(dmean, c)
    if scale is not None and not is_zero_tangent(dscale):
        t = r_p * dscale
        beta = t if beta is None else beta + t
    if beta is not None and shift is not None:
        alpha = shift * beta if alpha is None else alpha + shift * beta
    if bias is not None and not is_zero_tangent(dbias):
        alpha = dbias if alpha is None else alpha + dbias
    dy = None if is_zero_tangent(dx) else a * dx
    for term in (alpha, None if beta is None else xc * beta):
        if term is not None:
            dy = term if dy is None else dy + term
    dy = jnp.zeros_like(y) if dy is None else jnp.broadcast_to(dy, y.shape)
    return out, (dy, dmean, dvar, jnp.zeros_like(count))


def standardize(
    x: jax.Array,
    pop: Population,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    eps: float,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(x - mean) * rsqrt(var + eps) * scale + bias`` with ``x``'s own statistics.

    Args:
      x: input in the statistics dtype (float32 or wider; the caller casts).
      pop: which values each statistic covers (:class:`Population`).
      scale, bias: ``None`` or arrays broadcastable against the partial layout
        (e.g. ``(C,)`` on a last channel axis, or a channel-shaped
        ``(1, C, 1, 1)``), in ``x``'s dtype.
      eps: added to the variance inside the rsqrt.
      mask: ``None`` or a boolean array of ``x``'s shape; only True values enter
        the statistics (every value is normalized with them).

    Returns:
      ``(y, mean, var, count)``: ``y`` like ``x``; ``mean``, biased ``var`` and
      ``count`` (values behind each statistic, over devices) in the statistics
      layout. All four are differentiable (``count`` has zero derivative);
      callers that only record the statistics should ``stop_gradient`` them.
    """
    return _standardize(pop, float(eps), x, scale, bias, mask)


__all__ = ["Population", "standardize"]
