"""weight_standardize / scaled_weight_standardize against float64 numpy (Qiao 2019, Brock 2021)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from norms import scaled_weight_standardize, weight_standardize
from tests.norms.numpy_refs import assert_grads_match


def ref_ws(w, eps=1e-5, axes=(0, 1, 2)):
    w = np.asarray(w, np.float64)
    mean = w.mean(axis=axes, keepdims=True)
    var = w.var(axis=axes, keepdims=True)
    return (w - mean) / np.sqrt(var + eps)


def ref_scaled_ws(w, gain=None, eps=1e-4):
    w = np.asarray(w, np.float64)
    axes = tuple(range(w.ndim - 1))
    fan_in = np.prod(w.shape[:-1])
    mean = w.mean(axis=axes, keepdims=True)
    var = w.var(axis=axes, keepdims=True)
    out = (w - mean) / np.sqrt(np.maximum(var * fan_in, eps))
    return out if gain is None else out * np.asarray(gain, np.float64)


def kernel(shape=(3, 3, 4, 5), seed=0, loc=0.3):
    rng = np.random.default_rng(seed)
    return rng.normal(loc, 0.7, shape).astype(np.float32)


def test_weight_standardize_per_output_channel_mean_0_var_1():
    w = kernel()
    out = np.asarray(weight_standardize(w), np.float64)
    np.testing.assert_allclose(out, ref_ws(w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0.0, atol=1e-6)
    np.testing.assert_allclose(out.var(axis=(0, 1, 2)), 1.0, rtol=1e-4)
    dense = kernel((7, 3))
    np.testing.assert_allclose(
        weight_standardize(dense, axes=None), ref_ws(dense, axes=(0,)), atol=1e-5
    )


def test_scaled_weight_standardize_var_is_one_over_fan_in_and_gain_scales():
    w = kernel()
    fan_in = 3 * 3 * 4
    out = np.asarray(scaled_weight_standardize(w), np.float64)
    np.testing.assert_allclose(out, ref_scaled_ws(w), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0.0, atol=1e-6)
    np.testing.assert_allclose(out.var(axis=(0, 1, 2)), 1.0 / fan_in, rtol=1e-4)
    gain = np.linspace(0.5, 2.0, 5).astype(np.float32)
    out_g = np.asarray(scaled_weight_standardize(w, gain), np.float64)
    np.testing.assert_allclose(out_g, ref_scaled_ws(w, gain), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out_g.std(axis=(0, 1, 2)), gain / np.sqrt(fan_in), rtol=1e-4)


def test_scaled_ws_keeps_unit_variance_through_a_conv():
    # The point of scaled WS: a unit-variance input gives a unit-variance output.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 8, 8, 16)).astype(np.float32)
    w = scaled_weight_standardize(kernel((3, 3, 16, 32), loc=0.0))
    y = jax.lax.conv_general_dilated(
        x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    assert 0.9 < float(jnp.var(y)) < 1.1


def test_gradients_match_finite_differences():
    w = kernel((2, 2, 2, 3))
    gain = np.array([0.5, 1.0, 2.0], np.float32)
    assert_grads_match(lambda w, g: scaled_weight_standardize(w, g), ref_scaled_ws, (w, gain))
    assert_grads_match(weight_standardize, ref_ws, (w,))


def test_constant_kernel_gives_finite_output_and_gradient():
    w = jnp.full((3, 3, 4, 5), 0.25)
    for fn in (weight_standardize, lambda w: scaled_weight_standardize(w, jnp.ones(5))):
        np.testing.assert_allclose(fn(w), 0.0, atol=1e-6)
        g = jax.jit(jax.grad(lambda w, fn=fn: jnp.sum(fn(w) * jnp.arange(5.0))))(w)
        assert np.isfinite(np.asarray(g)).all()


def test_bfloat16_kernel_uses_float32_statistics():
    w = jnp.asarray(kernel(loc=5.0), jnp.bfloat16)
    out = scaled_weight_standardize(w)
    assert out.dtype == jnp.bfloat16
    ref = ref_scaled_ws(np.asarray(w.astype(jnp.float32)))
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), ref, rtol=2e-2, atol=2e-3)


def test_errors_name_shapes():
    w = kernel()
    with pytest.raises(ValueError, match=r"gain shape \(4,\).*5 output channels"):
        scaled_weight_standardize(w, jnp.ones(4))
    with pytest.raises(ValueError, match="output-channel axis"):
        weight_standardize(w, axes=(0, 1, 3))
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        weight_standardize(jnp.ones(5))
