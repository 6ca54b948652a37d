"""Activations and their variance-preserving gammas for normalizer-free networks.

For an activation ``g`` and ``z ~ N(0, 1)`` the gamma is ``1 / std(g(z))``
(Brock et al., 2021a, "Characterizing signal propagation to close the performance
gap in unnormalized ResNets"); ``gamma * g(z)`` then has unit variance, so a
unit-variance pre-activation stays unit-variance through a scaled-WS conv.

Two sources of gammas live here:

* :func:`activation_gamma` computes the definition in float64 numpy by Gauss
  quadrature (exact to ~1e-14).
* :data:`PUBLISHED_GAMMAS` are the constants of DeepMind's reference code
  (numerical estimates, e.g. by sampling as in the paper's appendix). The models use
  these, so that parameters trained with, or ported from, the reference give
  identical activations. Every published value is 0.03-0.09 % above the exact one,
  e.g. ReLU: exact ``sqrt(2 / (1 - 1/pi)) = 1.712859`` vs published
  ``1.7139588594`` (0.06 % larger). At initialisation the difference is immaterial for signal
  propagation; after training a model with one constant, switching it would shift
  every activation's scale, hence the choice.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Activation = Callable[[jax.Array], jax.Array]


def _identity(x: jax.Array) -> jax.Array:
    return x


# GELU is the tanh approximation (jax.nn.gelu's default), as in the reference code.
ACTIVATIONS: dict[str, Activation] = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "elu": jax.nn.elu,
    "softplus": jax.nn.softplus,
    "identity": _identity,
}

# DeepMind nfnets/base.py `nonlinearities` (numerical estimates of 1 / std(g(z))).
PUBLISHED_GAMMAS: dict[str, float] = {
    "relu": 1.7139588594436646,
    "gelu": 1.7015043497085571,
    "silu": 1.7881293296813965,
    "tanh": 1.5939117670059204,
    "sigmoid": 4.803835391998291,
    "elu": 1.2716004848480225,
    "softplus": 1.9203323125839233,
    "identity": 1.0,
}


def _np_gelu_tanh(z: np.ndarray) -> np.ndarray:
    return 0.5 * z * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z**3)))


# Float64 numpy definitions used by the quadrature (independent of the jax versions).
_NUMPY_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "relu": lambda z: np.maximum(z, 0.0),
    "gelu": _np_gelu_tanh,
    "silu": lambda z: z / (1.0 + np.exp(-z)),
    "tanh": np.tanh,
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "elu": lambda z: np.where(z > 0, z, np.expm1(np.minimum(z, 0.0))),
    "softplus": lambda z: np.logaddexp(0.0, z),
    "identity": lambda z: z,
}


def _check_name(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid names: {sorted(ACTIVATIONS)}")


@functools.cache
def _gaussian_rule(num_points: int, half_width: float) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights for ``E[f(z)], z ~ N(0,1)``: Gauss-Legendre on [-L, 0] and [0, L].

    The split at 0 matters: ReLU and ELU have a kink there, and a single
    Gauss-Hermite rule converges only algebraically across a kink (200 Hermite
    nodes still miss ReLU's gamma by 1.6e-3); on each smooth half the Legendre rule
    converges exponentially. Mass beyond ``L = 12`` is below 1e-32.
    """
    x, w = np.polynomial.legendre.leggauss(num_points)
    half = half_width / 2.0
    nodes = np.concatenate([(x - 1.0) * half, (x + 1.0) * half])
    weights = np.concatenate([w, w]) * half * np.exp(-0.5 * nodes**2) / np.sqrt(2.0 * np.pi)
    return nodes, weights


def activation_gamma(name: str, *, num_points: int = 64, half_width: float = 12.0) -> float:
    """Exact ``gamma = 1 / std(g(z))`` for ``z ~ N(0, 1)``, by quadrature in float64.

    ``E[g]`` and ``E[g^2]`` are integrated against the standard normal density with
    a Gauss rule split at zero (see ``_gaussian_rule``), ``num_points`` nodes per
    half-line. ReLU gives ``sqrt(2 / (1 - 1/pi)) = 1.7128585...``; identity gives 1.
    The models use :data:`PUBLISHED_GAMMAS` instead (see the module docstring).
    """
    _check_name(name)
    z, w = _gaussian_rule(num_points, half_width)
    g = _NUMPY_ACTIVATIONS[name](z)
    mean = np.sum(w * g)
    var = np.sum(w * (g - mean) ** 2)
    return float(1.0 / np.sqrt(var))


def scaled_activation(name: str, *, gamma: str | float = "published") -> Activation:
    """Returns ``x -> gamma * g(x)`` for activation ``name``.

    Args:
      name: a key of :data:`ACTIVATIONS`.
      gamma: ``"published"`` (the reference constants, used by the models),
        ``"exact"`` (:func:`activation_gamma`), or a number.

    The gamma multiplies in the input's dtype, so bf16 activations stay bf16.
    """
    _check_name(name)
    if gamma == "published":
        value = PUBLISHED_GAMMAS[name]
    elif gamma == "exact":
        value = activation_gamma(name)
    elif isinstance(gamma, int | float):
        value = float(gamma)
    else:
        raise ValueError(f"gamma must be 'published', 'exact' or a number, got {gamma!r}")
    fn = ACTIVATIONS[name]
    if value == 1.0:
        return fn

    def scaled(x: jax.Array) -> jax.Array:
        return fn(x) * jnp.asarray(value, dtype=x.dtype)

    return scaled
