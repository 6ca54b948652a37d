"""Weight standardization (Qiao et al., 2019) and its scaled form for NF nets (Brock et al., 2021).

Kernels are HWIO (``(kh, kw, in_per_group, out)``) as in ``flax.linen.Conv``;
statistics are per output channel over the fan-in axes, in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from norms.checks import float_input
from norms.moments import inv_std, moments, nan_if_overflowed, normalize_axes
from norms.standardize import is_zero_tangent


def _fan_in_axes(w: jax.Array, axes: Sequence[int] | None, who: str) -> tuple[int, ...]:
    if w.ndim < 2:
        raise ValueError(f"{who}: expected a kernel with an output axis last, got shape {w.shape}")
    axes = tuple(range(w.ndim - 1)) if axes is None else normalize_axes(axes, w.ndim)
    if w.ndim - 1 in axes:
        raise ValueError(f"{who}: axes {axes} include the output-channel axis {w.ndim - 1}")
    return axes


def _is_leading(axes: tuple[int, ...], ndim: int) -> bool:
    """True when ``axes`` are all the leading axes of a kernel with more than 2 dims.

    The standardizations then run on the kernel reshaped (for free, row-major) to a
    ``(fan_in, O)`` matrix and reduce over its axis 0. This is a speed fix: XLA's CPU
    backend reduces a ``(1, 1, I, O)`` kernel over ``I`` (the size-1 axes dropped
    from the reduction but kept in the shape) about 20x slower than the same values
    as an ``(I, O)`` matrix, which hit every 1x1 convolution's forward and backward.
    """
    return ndim > 2 and axes == tuple(range(ndim - 1))


def weight_standardize(
    w: jax.Array, *, eps: float = 1e-5, axes: Sequence[int] | None = (0, 1, 2)
) -> jax.Array:
    """Weight standardization: ``(w - mean) * rsqrt(var + eps)`` per output channel.

    Args:
      w: kernel whose last axis is the output channel, e.g. HWIO ``(kh, kw, I, O)``.
      eps: added to the biased variance inside the square root.
      axes: fan-in axes the statistics run over; ``(0, 1, 2)`` for HWIO, ``None``
        for every axis but the last (e.g. ``(0,)`` for an IO dense kernel).

    Returns the standardized kernel in ``w``'s dtype (float32 for an integer
    kernel); statistics are in float32.
    Used with group norm ("GN+WS").
    """
    w = float_input(w, "weight_standardize")
    axes = _fan_in_axes(w, axes, "weight_standardize")
    if _is_leading(axes, w.ndim):
        # See _is_leading: same values as a (fan_in, O) matrix.
        return weight_standardize(w.reshape(-1, w.shape[-1]), eps=eps, axes=(0,)).reshape(w.shape)
    mean, var, _ = moments(w, axes, keepdims=True)
    out = (w.astype(mean.dtype) - mean) * inv_std(var, eps)
    return out.astype(w.dtype)


def _scaled_ws_forward(axes: tuple[int, ...], eps: float, w: jax.Array, gain: jax.Array | None):
    """Primal ``w_hat`` plus the float32 pieces the JVP reuses."""
    fan_in = 1
    for a in axes:
        fan_in *= w.shape[a]
    mean, var, _ = moments(w, axes, keepdims=True)
    z = var * fan_in
    s = nan_if_overflowed(jax.lax.rsqrt(jnp.maximum(z, eps)), z)
    a = s if gain is None else s * gain.astype(s.dtype)
    xc = w.astype(mean.dtype) - mean
    return (xc * a).astype(w.dtype), (xc, z, s, a)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _scaled_ws(axes, eps, w, gain):
    return _scaled_ws_forward(axes, eps, w, gain)[0]


@functools.partial(_scaled_ws.defjvp, symbolic_zeros=True)
def _scaled_ws_jvp(axes, eps, primals, tangents):
    """Closed-form JVP of scaled WS (see :func:`scaled_weight_standardize`)."""
    w, gain = primals
    dw, dgain = tangents
    y, (xc, z, s, a) = _scaled_ws_forward(axes, eps, w, gain)
    dy = beta = None
    if not is_zero_tangent(dw):
        dw = dw.astype(xc.dtype)
        dmean = jnp.mean(dw, axis=axes, keepdims=True)
        # ds = -s^3 / 2 * slope * dz with dz = 2 * sum(xc * dw); slope is d max(z, eps) / dz:
        # 1 above eps, 0 below, 1/2 at a tie (jnp.maximum's convention).
        slope = jnp.where(z > eps, 1.0, jnp.where(z == eps, 0.5, 0.0)).astype(s.dtype)
        ds = -(s * s * s) * slope * jnp.sum(xc * dw, axis=axes, keepdims=True)
        # a * dw - a * dmean, not a * (dw - dmean): transposed, the backward then sums
        # the cotangent itself instead of first forming a * cotangent.
        dy = a * dw - a * dmean
        beta = ds if gain is None else ds * gain.astype(ds.dtype)
    if gain is not None and not is_zero_tangent(dgain):
        t = s * dgain.astype(s.dtype)
        beta = t if beta is None else beta + t
    if beta is not None:
        t = xc * beta
        dy = t if dy is None else dy + t
    dy = jnp.zeros(y.shape, y.dtype) if dy is None else dy.astype(y.dtype)
    return y, dy


def scaled_weight_standardize(
    w: jax.Array,
    gain: jax.Array | None = None,
    *,
    eps: float = 1e-4,
    axes: Sequence[int] | None = None,
) -> jax.Array:
    """Scaled weight standardization (NF-ResNets, NFNets).

    ``w_hat = gain * (w - mean) * rsqrt(max(var * fan_in, eps))`` per output
    channel, where mean and biased var run over the fan-in ``axes`` (default: all
    but the last, i.e. ``(0, 1, 2)`` for HWIO) and ``fan_in`` is the product of
    those axes' sizes. For grouped convolutions the HWIO kernel's ``I`` is already
    the per-group input count, so ``fan_in`` is per group as the paper requires.

    Each output channel of ``w_hat / gain`` has mean 0 and variance ``1 / fan_in``,
    so a unit-variance input gives a unit-variance output (up to the
    nonlinearity's gamma). ``eps`` sits inside ``max``, never added to a square
    root, so constant kernels give finite outputs and gradients.

    Derivatives are in closed form (a ``custom_jvp``, so forward and reverse mode
    of any order work). With ``xc = w - mean``, ``s = rsqrt(max(var * fan_in,
    eps))`` and ``E`` the mean over the fan-in::

        d w_hat = gain * s * (dw - E[dw])
                  + xc * (s * d gain - gain * s^3 * [var * fan_in > eps] * sum(xc * dw))

    (the indicator is 1/2 at a tie, as for ``jnp.maximum``). Its transpose, the
    backward pass, is two per-channel sums over the fan-in (``sum(ct)`` and
    ``sum(xc * ct)``, which XLA computes in one pass over the kernel) and one
    elementwise pass, instead of differentiating through the two-pass statistics
    (several more passes over every kernel on every training step).

    Args:
      w: kernel, output channel last.
      gain: optional per-output-channel gain of shape ``(O,)`` (initialised to 1).
      eps: lower bound on ``var * fan_in``.
      axes: fan-in axes; ``None`` means all but the last.

    Returns ``w_hat`` in ``w``'s dtype (float32 for an integer kernel); statistics
    and derivatives are computed in float32 (or wider for wider kernels).
    """
    w = float_input(w, "scaled_weight_standardize")
    axes = _fan_in_axes(w, axes, "scaled_weight_standardize")
    if gain is not None:
        gain = jnp.asarray(gain)
        if gain.shape not in ((w.shape[-1],), ()):
            raise ValueError(
                f"scaled_weight_standardize: gain shape {gain.shape} does not match the "
                f"kernel's {w.shape[-1]} output channels; expected ({w.shape[-1]},)"
            )
    if _is_leading(axes, w.ndim):
        flat = _scaled_ws((0,), float(eps), w.reshape(-1, w.shape[-1]), gain)
        return flat.reshape(w.shape)
    return _scaled_ws(axes, float(eps), w, gain)
