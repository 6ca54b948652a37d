"""rms_norm against float64 numpy written from Zhang & Sennrich (2019), and flax's RMSNorm."""

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from norms import rms_norm
from tests.norms.numpy_refs import assert_grads_match


def ref_rms_norm(x, scale=None, eps=1e-6, mask=None):
    """y = x / sqrt(mean_C(x^2) + eps) * g over the last axis, float64.

    With ``mask`` the mean is over the True values only (0 when there are none).
    """
    x = np.asarray(x, np.float64)
    m = np.ones(x.shape) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
    ms = (m * x**2).sum(-1, keepdims=True) / np.maximum(m.sum(-1, keepdims=True), 1)
    y = x / np.sqrt(ms + eps)
    return y if scale is None else y * np.asarray(scale, np.float64)


def data(shape=(3, 4, 5, 6), loc=0.5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(loc, 2.0, shape).astype(np.float32)
    scale = rng.normal(1.0, 0.3, shape[-1]).astype(np.float32)
    return x, scale


def test_matches_paper_formula_with_and_without_scale_and_eps():
    x, s = data()
    np.testing.assert_allclose(rms_norm(x), ref_rms_norm(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rms_norm(x, s), ref_rms_norm(x, s), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        rms_norm(x * 1e-3, s, eps=1e-2), ref_rms_norm(x * 1e-3, s, eps=1e-2), rtol=1e-5
    )


def test_channel_axis_keyword_and_token_inputs():
    x, s = data()
    y = rms_norm(np.moveaxis(x, -1, 1), s, axis=1)
    np.testing.assert_allclose(np.moveaxis(np.asarray(y), 1, -1), ref_rms_norm(x, s), rtol=1e-5)
    tokens = x.reshape(-1, 6)  # (N, C): the transformer case
    np.testing.assert_allclose(rms_norm(tokens, s), ref_rms_norm(tokens, s), rtol=1e-5)


def test_gradients_match_finite_differences():
    x, s = data((2, 3, 2, 3))
    assert_grads_match(lambda x, s: rms_norm(x, s), lambda x, s: ref_rms_norm(x, s), (x, s))


def test_default_eps_is_flax_default_for_linen_and_nnx():
    ours = inspect.signature(rms_norm).parameters["eps"].default
    assert ours == nn.RMSNorm.epsilon == 1e-6
    assert inspect.signature(nnx.RMSNorm.__init__).parameters["epsilon"].default == ours


@pytest.mark.parametrize("axis", [-1, 1])
def test_equals_flax_linen_rms_norm(axis):
    x, s = data()
    x = np.moveaxis(x, -1, axis)
    theirs = nn.RMSNorm(reduction_axes=axis, feature_axes=axis)
    y_theirs = theirs.apply({"params": {"scale": s}}, x)
    np.testing.assert_allclose(rms_norm(x, s, axis=axis), y_theirs, rtol=1e-6, atol=1e-6)
    # and the gradients with respect to x and scale
    cot = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    g_ours = jax.grad(lambda x, s: jnp.sum(rms_norm(x, s, axis=axis) * cot), (0, 1))(x, s)
    g_theirs = jax.grad(
        lambda x, s: jnp.sum(theirs.apply({"params": {"scale": s}}, x) * cot), (0, 1)
    )(x, s)
    for a, b in zip(g_ours, g_theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_equals_flax_nnx_rms_norm_with_and_without_mask():
    x, s = data()
    theirs = nnx.RMSNorm(6, rngs=nnx.Rngs(0))
    theirs.scale[...] = s
    np.testing.assert_allclose(rms_norm(x, s), theirs(x), rtol=1e-6, atol=1e-6)
    mask = np.random.default_rng(2).random(x.shape) < 0.7
    mask[..., 0] = True  # every vector keeps a value (flax's masked mean is NaN without)
    np.testing.assert_allclose(rms_norm(x, s, mask=mask), theirs(x, mask=mask), rtol=1e-6)
    np.testing.assert_allclose(rms_norm(x, s, mask=mask), ref_rms_norm(x, s, mask=mask), rtol=1e-5)


def test_bf16_input_computes_in_float32():
    # 1024 channels: a bfloat16 sum of x^2 would be off by far more than one output ulp.
    x, s = data((2, 3, 1024), loc=1.0)
    xb = jnp.asarray(x, jnp.bfloat16)
    y = rms_norm(xb, s)
    assert y.dtype == jnp.bfloat16
    f32 = rms_norm(jnp.asarray(xb, jnp.float32), s)  # the float32 result of the same input
    np.testing.assert_allclose(np.asarray(y, np.float32), f32, rtol=2**-8, atol=1e-6)
    ref = ref_rms_norm(np.asarray(xb, np.float64), s)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2**-8)


def test_one_example_does_not_depend_on_the_others():
    x, s = data()
    other = x.copy()
    other[1:] = other[1:] * -7.0 + 3.0
    np.testing.assert_array_equal(rms_norm(x, s)[0], rms_norm(other, s)[0])


def test_large_mean_zero_input_and_overflow():
    x, s = data()
    x = (1e3 + (x - 0.5) * 5e-3).astype(np.float32)  # no cancellation: ms is not a variance
    np.testing.assert_allclose(rms_norm(x, s), ref_rms_norm(x, s), rtol=1e-5)
    z = jnp.zeros((2, 3, 6))
    np.testing.assert_array_equal(rms_norm(z, s), 0.0)
    g = jax.grad(lambda z, s: jnp.sum(rms_norm(z, s) * 1.5), (0, 1))(z, s)
    assert all(np.isfinite(np.asarray(t)).all() for t in g)
    big = x * np.float32(1e19)  # float32 mean square overflows: NaN, not zeros
    assert np.isnan(np.asarray(rms_norm(big, s))).all()


def test_fully_masked_vector_is_finite():
    x, s = data()
    mask = np.ones(x.shape, bool)
    mask[0, 0, 0] = False
    y = np.asarray(rms_norm(x, s, mask=mask))
    np.testing.assert_allclose(y[0, 0, 0], x[0, 0, 0] / np.sqrt(1e-6) * s, rtol=1e-5)
    np.testing.assert_allclose(y[1:], ref_rms_norm(x, s)[1:], rtol=1e-5)


def test_jit_vmap_and_shard_map_agree_with_the_plain_call():
    x, s = data((8, 2, 3, 6))
    y = np.asarray(rms_norm(x, s))
    np.testing.assert_allclose(jax.jit(rms_norm)(x, s), y, rtol=1e-6)
    per_example = jax.vmap(lambda e: rms_norm(e[None], s)[0])(x)
    np.testing.assert_allclose(per_example, y, rtol=1e-6)
    mesh = jax.make_mesh((8,), ("d",))
    f = jax.jit(
        jax.shard_map(lambda x: rms_norm(x, s), mesh=mesh, in_specs=P("d"), out_specs=P("d"))
    )
    np.testing.assert_allclose(f(jax.device_put(x, NamedSharding(mesh, P("d")))), y, rtol=1e-6)


def test_errors_name_the_bad_value():
    x, s = data()
    with pytest.raises(ValueError, match=r"rms_norm: scale has shape \(4,\).*6 channels on axis 3"):
        rms_norm(x, np.ones(4))
    with pytest.raises(ValueError, match=r"rms_norm: eps=0.0 must be > 0"):
        rms_norm(x, eps=0.0)
    with pytest.raises(ValueError, match=r"rms_norm: axis=0 is the batch axis"):
        rms_norm(x, axis=0)
    with pytest.raises(ValueError, match=r"rms_norm: complex input"):
        rms_norm(x.astype(np.complex64))
    with pytest.raises(ValueError, match=r"rms_norm: mask of shape \(2,\)"):
        rms_norm(x, mask=np.ones(2, bool))
