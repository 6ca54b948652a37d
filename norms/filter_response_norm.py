"""Filter response normalization with the thresholded linear unit (Singh & Krishnan, 2020).

Batch-independent: the statistic is per example and channel. There is no mean
subtraction; FRN divides by the root mean square over the spatial axes, and TLU
is a learned per-channel ReLU threshold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from norms.checks import channel_params
from norms.group_norm import channels_last, mask_channels_last
from norms.moments import inv_std, moments, stats_dtype


def filter_response_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    tau: jax.Array | None = None,
    *,
    eps: float = 1e-6,
    learned_eps: jax.Array | None = None,
    axis: int = -1,
    mask: jax.Array | None = None,
) -> jax.Array:
    """FRN (+ TLU when ``tau`` is given) of ``x`` of shape ``(N, ..., C)``.

    ::

        nu2 = mean_{spatial}(x^2)                       # per example and channel
        y   = scale * x * rsqrt(nu2 + eps_eff) + bias
        z   = max(y, tau)                                # TLU, only when tau is given

    with ``eps_eff = |eps|`` or, with a learned epsilon, ``|eps| + |learned_eps|``
    (the paper's ``1e-6 + |eps_l|``, ``eps_l`` initialised to 1e-4, meant for
    inputs with 1x1 spatial extent). There is one epsilon, inside the square root.
    ``nu2`` is obtained from :func:`norms.moments` as ``var + mean^2`` (a sum of two
    non-negative float32 terms, no cancellation).

    Args:
      x: input, batch axis 0, channel axis ``axis``; the remaining axes are spatial
        (none is allowed: then ``nu2 = x^2``).
      scale, bias, tau: optional per-channel ``(C,)`` arrays (``tau`` starts at 0;
        a per-tensor ``tau`` is rejected, it must be per channel).
      eps: fixed epsilon (its absolute value is used).
      learned_eps: optional learned epsilon, shape ``()`` or ``(C,)``.
      axis: the channel axis.
      mask: optional boolean broadcastable to ``x``: only True values enter ``nu2``
        (the mean of ``x^2`` over them, e.g. without padded positions); every value
        is normalized with it, as in :func:`norms.group_norm`. ``nu2`` is per
        example, so masking whole examples (shape ``(N, 1, 1, 1)``) leaves the
        others' outputs unchanged; a statistic with no True value gets ``nu2 = 0``
        (finite outputs, ``x * rsqrt(eps_eff)``).

    Returns ``z`` (or ``y`` without ``tau``) in ``x``'s dtype; statistics in float32.
    """
    who = "filter_response_norm"
    xl, axis = channels_last(x, axis, who)
    c = xl.shape[-1]
    dt = stats_dtype(xl.dtype)
    scale, bias, tau = channel_params(who, jnp.shape(x), axis, dt, scale=scale, bias=bias, tau=tau)
    eps_eff = jnp.abs(jnp.asarray(eps, dt))
    if learned_eps is not None:
        learned_eps = jnp.asarray(learned_eps)
        if learned_eps.shape not in ((), (c,)):
            raise ValueError(
                f"{who}: learned_eps has shape {learned_eps.shape}; expected () or ({c},) "
                f"for an input with {c} channels"
            )
        eps_eff = eps_eff + jnp.abs(learned_eps.astype(dt))
    m = mask_channels_last(mask, jnp.shape(x), axis, who)
    mean, var, _ = moments(xl, tuple(range(1, xl.ndim - 1)), mask=m, keepdims=True)
    nu2 = var + jnp.square(mean)
    a = inv_std(nu2, eps_eff)
    if scale is not None:
        a = a * scale
    y = xl.astype(dt) * a
    if bias is not None:
        y = y + bias
    if tau is not None:
        y = jnp.maximum(y, tau)
    return jnp.moveaxis(y.astype(xl.dtype), -1, axis)
