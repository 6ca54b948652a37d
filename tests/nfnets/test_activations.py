"""Activation gammas against their definition 1 / std(g(z)), z ~ N(0, 1)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import activations

# Float64 reference definitions written from the formulas (not the module's).
REFERENCE = {
    "relu": lambda z: np.where(z > 0, z, 0.0),
    "gelu": lambda z: 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))),
    "silu": lambda z: z * (1 / (1 + np.exp(-z))),
    "tanh": lambda z: (np.exp(z) - np.exp(-z)) / (np.exp(z) + np.exp(-z)),
    "sigmoid": lambda z: 1 / (1 + np.exp(-z)),
    "elu": lambda z: np.where(z > 0, z, np.exp(np.minimum(z, 0)) - 1),
    "softplus": lambda z: np.log1p(np.exp(z)),
    "identity": lambda z: z,
}


def test_published_table_covers_every_activation():
    assert set(activations.PUBLISHED_GAMMAS) == set(activations.ACTIVATIONS) == set(REFERENCE)


def test_relu_gamma_matches_closed_form():
    # Var(relu(z)) = 1/2 - 1/(2 pi)  =>  gamma = sqrt(2 / (1 - 1/pi)).
    np.testing.assert_allclose(
        activations.activation_gamma("relu"), math.sqrt(2 / (1 - 1 / math.pi)), rtol=1e-12
    )
    np.testing.assert_allclose(activations.activation_gamma("identity"), 1.0, rtol=1e-12)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_gamma_matches_monte_carlo(name):
    z = np.random.default_rng(0).standard_normal(2_000_000)
    mc = 1.0 / np.std(REFERENCE[name](z))
    # Standard error of a sample std with 2e6 draws is < 0.1 %.
    np.testing.assert_allclose(activations.activation_gamma(name), mc, rtol=2e-3)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_quadrature_is_converged(name):
    np.testing.assert_allclose(
        activations.activation_gamma(name),
        activations.activation_gamma(name, num_points=256, half_width=16.0),
        rtol=1e-10,
    )


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_published_constants_close_to_exact(name):
    # The reference code estimated them by sampling: within 0.1 % of the exact value.
    np.testing.assert_allclose(
        activations.PUBLISHED_GAMMAS[name], activations.activation_gamma(name), rtol=1e-3
    )


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_jax_activation_matches_reference(name):
    z = np.linspace(-6, 6, 101)
    got = np.asarray(activations.ACTIVATIONS[name](jnp.asarray(z, jnp.float32)))
    np.testing.assert_allclose(got, REFERENCE[name](z), rtol=1e-5, atol=1e-6)


def test_scaled_activation_constants_and_unit_variance():
    x = jnp.asarray(np.random.default_rng(1).standard_normal(400_000), jnp.float32)
    published = activations.scaled_activation("relu")
    np.testing.assert_allclose(
        np.asarray(published(x)), np.maximum(np.asarray(x), 0) * 1.7139588594436646, rtol=1e-6
    )
    exact = activations.scaled_activation("gelu", gamma="exact")
    assert abs(float(jnp.var(exact(x))) - 1.0) < 1e-2
    fixed = activations.scaled_activation("tanh", gamma=2.0)
    np.testing.assert_allclose(np.asarray(fixed(x)), 2 * np.tanh(np.asarray(x)), rtol=1e-5)
    assert published(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_unknown_activation_lists_names():
    with pytest.raises(ValueError, match="valid names.*relu"):
        activations.activation_gamma("swish2")
    with pytest.raises(ValueError, match="gamma must be"):
        activations.scaled_activation("relu", gamma="bogus")
