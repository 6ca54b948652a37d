"""Weight standardization (Qiao et al., 2019) and its scaled form for NF nets (Brock et al., 2021).

Kernels are HWIO (``(kh, kw, in_per_group, out)``) as in ``flax.linen.Conv``;
statistics are per output channel over the fan-in axes, in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from norms.moments import moments, normalize_axes


def _fan_in_axes(w: jax.Array, axes: Sequence[int] | None, who: str) -> tuple[int, ...]:
    if w.ndim < 2:
        raise ValueError(f"{who}: expected a kernel with an output axis last, got shape {w.shape}")
    axes = tuple(range(w.ndim - 1)) if axes is None else normalize_axes(axes, w.ndim)
    if w.ndim - 1 in axes:
        raise ValueError(f"{who}: axes {axes} include the output-channel axis {w.ndim - 1}")
    return axes


def weight_standardize(
    w: jax.Array, *, eps: float = 1e-5, axes: Sequence[int] | None = (0, 1, 2)
) -> jax.Array:
    """Weight standardization: ``(w - mean) * rsqrt(var + eps)`` per output channel.

    Args:
      w: kernel whose last axis is the output channel, e.g. HWIO ``(kh, kw, I, O)``.
      eps: added to the biased variance inside the square root.
      axes: fan-in axes the statistics run over; ``(0, 1, 2)`` for HWIO, ``None``
        for every axis but the last (e.g. ``(0,)`` for an IO dense kernel).

    Returns the standardized kernel in ``w``'s dtype; statistics are in float32.
    Used with group norm ("GN+WS").
    """
    axes = _fan_in_axes(w, axes, "weight_standardize")
    mean, var, _ = moments(w, axes, keepdims=True)
    out = (w.astype(mean.dtype) - mean) * jax.lax.rsqrt(var + eps)
    return out.astype(w.dtype)


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

    Args:
      w: kernel, output channel last.
      gain: optional per-output-channel gain of shape ``(O,)`` (initialised to 1).
      eps: lower bound on ``var * fan_in``.
      axes: fan-in axes; ``None`` means all but the last.
    """
    axes = _fan_in_axes(w, axes, "scaled_weight_standardize")
    fan_in = 1
    for a in axes:
        fan_in *= w.shape[a]
    mean, var, _ = moments(w, axes, keepdims=True)
    scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, eps))
    if gain is not None:
        gain = jnp.asarray(gain)
        if gain.shape not in ((w.shape[-1],), ()):
            raise ValueError(
                f"scaled_weight_standardize: gain shape {gain.shape} does not match the "
                f"kernel's {w.shape[-1]} output channels; expected ({w.shape[-1]},)"
            )
        scale = scale * gain.astype(scale.dtype)
    out = (w.astype(mean.dtype) - mean) * scale
    return out.astype(w.dtype)
