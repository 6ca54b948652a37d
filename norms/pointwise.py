"""Pointwise replacements for a norm: Dynamic Tanh (DyT) and Dynamic erf (Derf).

Neither computes a statistic. Each output value depends only on the input value at
the same position and on learned parameters, so there is no batch dependence, no
example dependence across positions, no train/eval difference and no running
state: one read of ``x`` and one write of ``y`` forward.

- **DyT** (Zhu, Chen, He, LeCun, Liu, "Transformers without Normalization", CVPR
  2025, arXiv 2503.10622): ``y = scale * tanh(alpha * x) + bias``, a learnable
  scalar ``alpha`` (init 0.5, the paper's default outside its LLMs, which tune
  it), per-channel ``scale`` (init 1) and ``bias`` (init 0). It replaces
  LayerNorm/RMSNorm in Transformers; its limitations section reports that it does
  not directly replace batch norm in classic ConvNets such as ResNet-50 and VGG19.
- **Derf** (Chen, Lu, Zhu, Sun, Liu, "Stronger Normalization-Free Transformers",
  arXiv 2512.10938): ``y = scale * erf(alpha * x + shift) + bias``, with ``alpha``
  and ``shift`` learnable scalars (init 0.5 and 0 in the reference code,
  github.com/zlab-princeton/Derf, ``Dynamic_erf``), ``scale`` and ``bias`` per
  channel (init 1 and 0).

Both accept ``alpha`` (and Derf's ``shift``) as a scalar, the papers' choice, or
per channel ``(C,)``. Computed in float32 (or wider for wider inputs), output in
the input's dtype; integer inputs give float32.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from norms.checks import channel_params
from norms.group_norm import channels_last
from norms.moments import stats_dtype

# The papers' initial values (DyT's default for non-LLM models; Derf's code default).
DYT_ALPHA_INIT = 0.5
DERF_ALPHA_INIT = 0.5
DERF_SHIFT_INIT = 0.0


def scalar_or_channel(who: str, name: str, p, x_shape, axis: int, dtype) -> jax.Array:
    """``p`` as an array of shape ``()`` or ``(C,)`` in ``dtype``; errors name the shapes."""
    c = x_shape[axis]
    if p is None:
        raise ValueError(f"{who}: {name} is required (a scalar, or shape ({c},) per channel)")
    p = jnp.asarray(p)
    if p.shape not in ((), (c,)):
        raise ValueError(
            f"{who}: {name} has shape {p.shape} but must be a scalar (shape (), as in the "
            f"paper) or one value per channel (shape ({c},)) for the input of shape "
            f"{tuple(x_shape)} with {c} channels on axis {axis}"
        )
    return p.astype(dtype)


def _pointwise(
    who: str,
    f: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    axis: int,
    **pre: jax.Array,
) -> jax.Array:
    """``scale * f(alpha * x [+ shift]) + bias`` with the pre-activation params ``pre``."""
    xl, axis = channels_last(x, axis, who)
    dt = stats_dtype(xl.dtype)
    shape = jnp.shape(x)
    scale, bias = channel_params(who, shape, axis, dt, scale=scale, bias=bias)
    pre = {k: scalar_or_channel(who, k, v, shape, axis, dt) for k, v in pre.items()}
    z = pre["alpha"] * xl.astype(dt)
    if "shift" in pre:
        z = z + pre["shift"]
    y = f(z)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return jnp.moveaxis(y.astype(xl.dtype), -1, axis)


def dynamic_tanh(
    x: jax.Array,
    alpha: jax.Array | float,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    axis: int = -1,
) -> jax.Array:
    """Dynamic Tanh (DyT, Zhu et al. 2025) of ``x`` of shape ``(N, ..., C)``.

    ::

        y = scale * tanh(alpha * x) + bias

    elementwise: no statistic, so one example's output never depends on the other
    examples or positions (and train and eval are the same).

    Args:
      x: input, batch axis 0, channel axis ``axis``; any axes in between.
      alpha: shape ``()`` (the paper's learnable scalar, init
        :data:`DYT_ALPHA_INIT` = 0.5) or ``(C,)`` per channel.
      scale, bias: optional per-channel ``(C,)`` (init 1 and 0).
      axis: the channel axis (not 0, the batch axis).

    Returns ``y`` in ``x``'s dtype, computed in float32 (or wider).
    """
    return _pointwise("dynamic_tanh", jnp.tanh, x, scale, bias, axis, alpha=alpha)


def derf(
    x: jax.Array,
    alpha: jax.Array | float,
    shift: jax.Array | float,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    axis: int = -1,
) -> jax.Array:
    """Dynamic erf (Derf, arXiv 2512.10938) of ``x`` of shape ``(N, ..., C)``.

    ::

        y = scale * erf(alpha * x + shift) + bias

    elementwise: no statistic, so one example's output never depends on the other
    examples or positions (and train and eval are the same).

    Args:
      x: input, batch axis 0, channel axis ``axis``; any axes in between.
      alpha: shape ``()`` (the paper's learnable scalar, init
        :data:`DERF_ALPHA_INIT` = 0.5) or ``(C,)`` per channel.
      shift: shape ``()`` (the paper's learnable scalar ``s``, init
        :data:`DERF_SHIFT_INIT` = 0) or ``(C,)`` per channel.
      scale, bias: optional per-channel ``(C,)`` (init 1 and 0).
      axis: the channel axis (not 0, the batch axis).

    Returns ``y`` in ``x``'s dtype, computed in float32 (or wider).
    """
    return _pointwise("derf", jax.lax.erf, x, scale, bias, axis, alpha=alpha, shift=shift)
