"""RMSNorm (Zhang & Sennrich, 2019, arXiv 1910.07467) with flax's formula and epsilon.

Root mean square layer normalization rescales each channel vector by its root mean
square and does not centre it. Batch-independent: the statistic is one number per
example and position, over the channel axis only (as flax's ``nn.RMSNorm`` and
``nnx.RMSNorm`` with their default ``reduction_axes=-1``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from norms.checks import channel_params, check_eps
from norms.group_norm import channels_last, mask_channels_last
from norms.moments import inv_std, moments, stats_dtype


def rms_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    *,
    axis: int = -1,
    eps: float = 1e-6,
    mask: jax.Array | None = None,
) -> jax.Array:
    """RMSNorm of ``x`` of shape ``(N, ..., C)`` over its channel axis.

    ::

        ms = mean_C(x^2)                     # per example and position, float32
        y  = x * rsqrt(ms + eps) * scale

    This is flax's formula (``flax.linen.RMSNorm`` / ``flax.nnx.RMSNorm``): one
    epsilon, ``1e-6`` by default, added to the mean square inside the reciprocal
    square root (not to the root), and a per-channel ``scale`` (flax's only
    parameter: no bias, no mean subtraction). ``ms`` comes from
    :func:`norms.moments` as ``var + mean^2``, a sum of two non-negative float32
    terms (no cancellation), as in :func:`norms.filter_response_norm`.

    Args:
      x: input, batch axis 0, channel axis ``axis``; any number of axes between
        them (e.g. ``(N, C)`` tokens or ``(N, H, W, C)`` images). Integer inputs are
        computed in float32 and give float32.
      scale: optional ``(C,)`` (init 1).
      axis: the channel axis, which is also the reduced axis (not 0, the batch
        axis: that would be a batch statistic).
      eps: inside the square root, > 0.
      mask: optional boolean broadcastable to ``x``: only True values enter ``ms``
        (e.g. padded channels left out); every value is rescaled. A vector with no
        True value gets ``ms = 0`` and a finite ``x * rsqrt(eps) * scale`` (flax's
        masked mean gives NaN there).

    Returns ``y`` in ``x``'s dtype (flax's ``dtype=None`` instead promotes a bf16
    input with float32 ``scale`` to a float32 output); computed in float32, or
    wider for wider inputs.
    """
    who = "rms_norm"
    check_eps(eps, who)
    xl, axis = channels_last(x, axis, who)
    dt = stats_dtype(xl.dtype)
    (scale,) = channel_params(who, jnp.shape(x), axis, dt, scale=scale)
    m = mask_channels_last(mask, jnp.shape(x), axis, who)
    mean, var, _ = moments(xl, -1, mask=m, keepdims=True)
    a = inv_std(var + jnp.square(mean), jnp.asarray(eps, dt))
    y = xl.astype(dt) * a
    if scale is not None:
        y = y * scale
    return jnp.moveaxis(y.astype(xl.dtype), -1, axis)
