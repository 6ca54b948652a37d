"""Argument checks shared by the norms; every error names the bad value and the fix."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def channel_params(
    who: str, x_shape: Sequence[int], axis: int, dtype=None, **params: jax.Array | None
) -> tuple[jax.Array | None, ...]:
    """Checks per-channel parameters against the input; returns them in the given order.

    Each keyword (e.g. ``scale=..., bias=...``) must be ``None`` or have shape
    ``(C,)`` with ``C = x_shape[axis]``; arrays are cast to ``dtype`` when given.
    The error names the parameter's shape, the input's shape, the channel count
    and the axis, e.g. ``scale=s, bias=b`` -> ``(s, b)``.
    """
    c = x_shape[axis]
    out = []
    for name, p in params.items():
        if p is not None:
            p = jnp.asarray(p)
            if p.shape != (c,):
                raise ValueError(
                    f"{who}: {name} has shape {p.shape} but the input of shape "
                    f"{tuple(x_shape)} has {c} channels on axis {axis}; give {name} shape "
                    f"({c},) (one value per channel; check `axis`)."
                )
            if dtype is not None:
                p = p.astype(dtype)
        out.append(p)
    return tuple(out)


def require_spatial(ndim: int, x_shape: Sequence[int], who: str, why: str) -> None:
    """Errors unless a channels-last input of rank ``ndim`` has a spatial axis.

    ``why`` says what needs it (e.g. "each statistic would cover one value").
    """
    if ndim < 3:
        raise ValueError(
            f"{who}: input of shape {tuple(x_shape)} has no spatial axis; {why}. "
            "Expected (N, *spatial, C) with at least one spatial axis."
        )


__all__ = ["channel_params", "require_spatial"]
