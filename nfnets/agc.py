"""Adaptive gradient clipping (Brock et al., 2021) and the parameter masks of the NF recipe.

AGC is part of the normalizer-free method: it replaces the implicit gradient
scaling that batch norm provides. ``adaptive_grad_clip`` is an optax
transformation; ``agc_mask`` says where it applies (everywhere but the final
classifier, which the NFNet paper never clips) and ``weight_decay_mask`` where
weight decay applies (conv and dense kernels only). Both masks match parameters
by their "/"-joined key path (``jax.tree_util.keystr``), so fnmatch patterns can
name one path component or a run of them.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def check_nonneg(name: str, value: Any) -> None:
    """Errors unless ``value`` is None or a finite number >= 0 (the message names ``name``)."""
    if value is None:
        return
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
    """Key path of a pytree leaf as strings (dict keys, attribute names, indices)."""
    return tuple(jax.tree_util.keystr((entry,), simple=True) for entry in path)


def path_matches(names: Sequence[str], patterns: Sequence[str]) -> bool:
    """True if an fnmatch pattern matches a contiguous run of path components.

    The run is "/"-joined, so a pattern can name one component or several. For the leaf
    `params/head/kernel`: "head", "head/*", "params/head/kernel" and "*/kernel" match;
    "hea" does not. For `params/stage0/block0/se/kernel`: "stage*/block0/se/*" matches.
    """
    runs = ["/".join(names[i:j]) for i in range(len(names)) for j in range(i + 1, len(names) + 1)]
    return any(fnmatch.fnmatchcase(run, pat) for pat in patterns for run in runs)


def agc_mask(params: PyTree, exclude: Sequence[str] = ("head",)) -> PyTree:
    """Boolean pytree like `params`: True where AGC applies.

    A parameter is excluded (False) when one of the fnmatch patterns in `exclude`
    matches one of its path components or a "/"-joined run of them (`path_matches`).
    The default excludes the classifier, which the model names "head" (Brock et al.,
    2021, Sec. 4: clipping the final linear layer hurts). Gains, biases and SkipInit
    scalars are clipped.
    """
    if isinstance(exclude, str):
        raise TypeError(
            f"exclude must be a sequence of patterns, got the string {exclude!r}; "
            f"write ({exclude!r},)"
        )
    exclude = tuple(exclude)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not path_matches(path_names(path), exclude), params
    )


def weight_decay_mask(params: PyTree, kernel_names: Sequence[str] = ("kernel",)) -> PyTree:
    """Boolean pytree like `params`: True only for conv and dense kernels.

    A leaf decays when its own name is in `kernel_names` (flax's Conv, Dense and our
    WSConv2D all call their weight "kernel") and it has at least 2 dimensions. Gains,
    biases, norm scales, SkipInit scalars and every other vector or scalar get no decay.
    """
    kernel_names = tuple(kernel_names)

    def is_kernel(path, x) -> bool:
        names = path_names(path)
        return bool(names) and names[-1] in kernel_names and jnp.ndim(x) >= 2

    return jax.tree_util.tree_map_with_path(is_kernel, params)


def agc_unit_axes(shape: Sequence[int]) -> tuple[int, ...] | None:
    """Axes the AGC unit norm reduces over for a parameter of `shape`.

    A unit is one output slice (the last axis; Brock et al., 2021, Sec. 4): dense IO
    kernels reduce over axis 0, HWIO conv kernels over (0, 1, 2), and in general every
    axis but the last (a 3D WIO conv1d kernel over (0, 1), DHWIO over (0, 1, 2, 3)).
    Vectors (gains, biases) and scalars (SkipInit gains) are one unit: returns None
    (the whole array).
    """
    ndim = len(shape)
    return None if ndim <= 1 else tuple(range(ndim - 1))


def adaptive_grad_clip(clipping: float, eps: float = 1e-3) -> optax.GradientTransformation:
    """Unit-wise adaptive gradient clipping (Brock et al., 2021) through optax.

    Per unit i: if `||G_i|| > clipping * max(||W_i||, eps)`, scale `G_i` by
    `clipping * max(||W_i||, eps) / max(||G_i||, 1e-6)`; unit axes from `agc_unit_axes`.

    The arithmetic is `optax.adaptive_grad_clip`; this wrapper only passes the unit axes
    per leaf, because optax's default infers them from the rank in two ways that differ
    from `agc_unit_axes`: (a) rank-3 kernels are treated as multi-head dense (norm over
    axis 0 only, not a conv1d's (0, 1)), and (b) size-1 axes are squeezed first, so a
    (1, O) dense kernel or a (1, 1, 1, O) conv kernel is clipped as ONE vector instead
    of O units. For rank-2 and rank-4 kernels without size-1 fan-in both agree (tested).
    """
    check_nonneg("agc_clip", clipping)
    check_nonneg("agc_eps", eps)

    def clip_leaf(g, p):
        inner = optax.adaptive_grad_clip(clipping, eps=eps, axis=agc_unit_axes(jnp.shape(p)))
        return inner.update(g, optax.EmptyState(), p)[0]

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "adaptive_grad_clip needs params: call tx.update(grads, state, params)"
            )
        return jax.tree.map(clip_leaf, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


__all__ = [
    "adaptive_grad_clip",
    "agc_mask",
    "agc_unit_axes",
    "check_nonneg",
    "path_matches",
    "path_names",
    "weight_decay_mask",
]
