"""Argument checks shared by the norms; every error names the bad value and the fix."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def float_input(x, who: str) -> jax.Array:
    """``x`` as an array of a real floating dtype; integer and bool inputs become float32.

    The norms compute in float32 (as flax's norms do) and return a float: returned
    in an integer dtype the normalized values would be truncated to a few integers.
    Complex inputs are rejected.
    """
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise ValueError(
            f"{who}: complex input ({x.dtype}) is not supported; normalize the real and "
            "imaginary parts separately (jnp.real / jnp.imag)"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return x


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


# Checks every stateful norm runs on its state and hyper-parameters.

ON_STALE = ("warn", "error", "ignore")


def channel_axis(x: jax.Array, axis: int, who: str) -> int:
    """The channel axis of ``x`` as a non-negative int; errors name the shape."""
    if not isinstance(axis, int):
        raise ValueError(f"{who}: axis must be one int (the channel axis), got {axis!r}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{who}: axis={axis} is out of range for an input of shape {x.shape}")
    return axis % x.ndim


def check_state(state, num_channels: int, x_shape, axis: int, who: str) -> None:
    """Checks that running mean/var have shape (C,)."""
    for name in ("mean", "var"):
        shape = jnp.shape(getattr(state, name))
        if shape != (num_channels,):
            raise ValueError(
                f"{who}: state.{name} has shape {shape} but the input of shape "
                f"{tuple(x_shape)} has {num_channels} channels on axis {axis}; create the "
                f"state with init_batch_norm_state({num_channels})."
            )


def check_momentum(momentum, who: str) -> None:
    """Checks ``0 <= momentum <= 1`` when momentum is a Python number."""
    if isinstance(momentum, int | float) and not 0.0 <= momentum <= 1.0:
        raise ValueError(
            f"{who}: momentum={momentum} must be in [0, 1]; it is the weight on the OLD "
            "running value (PyTorch momentum 0.1 == 0.9 here)."
        )


def check_eps(eps, who: str) -> None:
    """Checks ``eps > 0`` when eps is a Python number."""
    if isinstance(eps, int | float) and not eps > 0:
        raise ValueError(f"{who}: eps={eps} must be > 0 (it keeps rsqrt(var + eps) finite)")


def check_on_stale(on_stale: str, who: str) -> None:
    if on_stale not in ON_STALE:
        raise ValueError(f"{who}: on_stale={on_stale!r}; choose one of {ON_STALE}")


def check_running_args(state, x_shape, axis: int, momentum, eps, on_stale: str, who: str):
    """The checks every stateful norm runs on its state and hyper-parameters.

    ``axis`` is the (non-negative) channel axis of an input of shape ``x_shape``.
    """
    check_state(state, x_shape[axis], x_shape, axis, who)
    check_momentum(momentum, who)
    check_eps(eps, who)
    check_on_stale(on_stale, who)


def prepare(x, state, scale, bias, *, axis, momentum, eps, on_stale, who):
    """Entry checks shared by the stateful norms; returns ``(x, channel_axis, scale, bias)``."""
    x = float_input(x, who)
    ax = channel_axis(x, axis, who)
    scale, bias = channel_params(who, x.shape, ax, scale=scale, bias=bias)
    check_running_args(state, x.shape, ax, momentum, eps, on_stale, who)
    return x, ax, scale, bias


__all__ = [
    "ON_STALE",
    "channel_axis",
    "channel_params",
    "check_eps",
    "check_momentum",
    "check_on_stale",
    "check_running_args",
    "check_state",
    "float_input",
    "prepare",
    "require_spatial",
]
