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


def ref_scaled_ws(w, gain=None, eps=1e-4, axes=None):
    w = np.asarray(w, np.float64)
    axes = tuple(range(w.ndim - 1)) if axes is None else axes
    fan_in = np.prod([w.shape[a] for a in axes])
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
    assert_grads_match(weight_standardize, ref_ws, (kernel((1, 1, 5, 3)),))
    assert_grads_match(
        lambda w: weight_standardize(w, axes=(0, 2)), lambda w: ref_ws(w, axes=(0, 2)), (w,)
    )


def test_gradients_of_1x1_kernels_subset_axes_scalar_and_no_gain():
    # 1x1 kernels and the default axes take the (fan_in, O) matrix path; an explicit
    # subset of axes takes the general one; a scalar gain broadcasts;
    # no gain at all.
    w = kernel((1, 1, 6, 3), seed=2)
    gain = np.array([0.5, 1.0, 2.0], np.float32)
    assert_grads_match(lambda w, g: scaled_weight_standardize(w, g), ref_scaled_ws, (w, gain))
    w = kernel((2, 3, 2, 3), seed=3)
    assert_grads_match(
        lambda w, g: scaled_weight_standardize(w, g, axes=(0, 1)),
        lambda w, g: ref_scaled_ws(w, g, axes=(0, 1)),
        (w, gain),
    )
    assert_grads_match(
        lambda w, g: scaled_weight_standardize(w, g),
        ref_scaled_ws,
        (kernel((2, 2, 3, 4), seed=4), np.float32(1.5)),
    )
    assert_grads_match(scaled_weight_standardize, ref_scaled_ws, (kernel((2, 2, 2, 3), seed=5),))


def test_gradient_where_eps_clips_the_variance():
    # Channel 0 has var * fan_in < eps, so its scale is the constant eps**-0.5 and
    # only the mean subtraction carries gradient; channel 1 is unclipped.
    rng = np.random.default_rng(6)
    w = np.stack([1.0 + 1e-3 * rng.normal(size=(2, 2, 3)), rng.normal(size=(2, 2, 3))], -1)
    w = w.astype(np.float32)
    assert float(w[..., 0].var() * 12) < 1e-4 < float(w[..., 1].var() * 12)
    gain = np.array([0.7, 1.3], np.float32)
    assert_grads_match(lambda w, g: scaled_weight_standardize(w, g), ref_scaled_ws, (w, gain))


def test_forward_mode_and_second_order_derivatives():
    # scaled_weight_standardize has a closed-form JVP; forward mode must match the
    # float64 reference's directional derivative and grad-of-grad must work.
    rng = np.random.default_rng(7)
    w, gain = kernel((3, 3, 2, 4), seed=8), rng.uniform(0.5, 2.0, 4).astype(np.float32)
    dirs = (rng.normal(size=w.shape).astype(np.float32), rng.normal(size=4).astype(np.float32))
    cot = rng.normal(size=w.shape)
    f = lambda w, g: jnp.sum(scaled_weight_standardize(w, g) * cot)
    _, tangent = jax.jit(lambda p, t: jax.jvp(f, p, t))((w, gain), dirs)
    h = 1e-6

    def ref(t):
        return np.sum(
            ref_scaled_ws(np.float64(w) + t * dirs[0], np.float64(gain) + t * dirs[1]) * cot
        )

    np.testing.assert_allclose(tangent, (ref(h) - ref(-h)) / (2 * h), rtol=1e-3)
    grad_w = jax.jit(jax.grad(lambda w: f(w, gain) ** 2))
    hvp = jax.jit(lambda w, v: jax.jvp(grad_w, (w,), (v,))[1])(w, dirs[0])
    e = 1e-2
    fd = (grad_w(w + e * dirs[0]) - grad_w(w - e * dirs[0])) / (2 * e)
    np.testing.assert_allclose(hvp, fd, rtol=2e-2, atol=2e-2 * float(jnp.abs(fd).max()))


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
