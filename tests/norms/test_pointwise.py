"""dynamic_tanh (DyT, arXiv 2503.10622) and derf (arXiv 2512.10938) against float64 numpy.

The references are written from each paper's formula; erf comes from scipy, so no
value or gradient here is computed by JAX on both sides.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import norms
from norms.pointwise import DERF_ALPHA_INIT, DERF_SHIFT_INIT, DYT_ALPHA_INIT
from tests.norms.numpy_refs import assert_grads_match


def ref_dyt(x, alpha, scale=None, bias=None):
    """DyT(x) = gamma * tanh(alpha * x) + beta, channels last, float64."""
    y = np.tanh(np.asarray(alpha, np.float64) * np.asarray(x, np.float64))
    if scale is not None:
        y = y * np.asarray(scale, np.float64)
    return y if bias is None else y + np.asarray(bias, np.float64)


def ref_derf(x, alpha, shift, scale=None, bias=None):
    """Derf(x) = gamma * erf(alpha * x + s) + beta, channels last, float64."""
    z = np.asarray(alpha, np.float64) * np.asarray(x, np.float64) + np.asarray(shift, np.float64)
    y = scipy.special.erf(z)
    if scale is not None:
        y = y * np.asarray(scale, np.float64)
    return y if bias is None else y + np.asarray(bias, np.float64)


C = 6


def data(shape=(3, 4, 5, C), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0.3, 2.0, shape).astype(np.float32)
    scale = rng.normal(1.0, 0.3, shape[-1]).astype(np.float32)
    bias = rng.normal(0.0, 0.3, shape[-1]).astype(np.float32)
    alpha_c = rng.uniform(0.2, 1.5, shape[-1]).astype(np.float32)
    shift_c = rng.normal(0.0, 0.5, shape[-1]).astype(np.float32)
    return x, scale, bias, alpha_c, shift_c


# name -> (ours(x, alpha, shift, scale, bias, axis), ref(x, alpha, shift, scale, bias))
LAYERS = {
    "dynamic_tanh": (
        lambda x, a, s, g, b, axis=-1: norms.dynamic_tanh(x, a, g, b, axis=axis),
        lambda x, a, s, g, b: ref_dyt(x, a, g, b),
    ),
    "derf": (
        lambda x, a, s, g, b, axis=-1: norms.derf(x, a, s, g, b, axis=axis),
        lambda x, a, s, g, b: ref_derf(x, a, s, g, b),
    ),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_matches_paper_formula_scalar_and_per_channel(name):
    fn, ref = LAYERS[name]
    x, g, b, ac, sc = data()
    for a, s in ((0.5, 0.0), (np.float32(1.3), np.float32(-0.4)), (ac, sc), (ac, 0.2)):
        np.testing.assert_allclose(fn(x, a, s, g, b), ref(x, a, s, g, b), rtol=1e-6, atol=1e-6)
    # without the affine: the bare bounded function
    np.testing.assert_allclose(
        fn(x, 0.7, 0.1, None, None), ref(x, 0.7, 0.1, None, None), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_channel_axis_keyword(name):
    fn, ref = LAYERS[name]
    x, g, b, ac, sc = data()
    y = fn(np.moveaxis(x, -1, 1), ac, sc, g, b, axis=1)
    np.testing.assert_allclose(np.moveaxis(np.asarray(y), 1, -1), ref(x, ac, sc, g, b), atol=1e-6)


def test_gradients_wrt_x_and_every_parameter_match_finite_differences():
    x, g, b, ac, sc = data((2, 3, 2, 3))
    a = np.float32(0.8)
    assert_grads_match(
        lambda x, a, g, b: norms.dynamic_tanh(x, a, g, b),
        lambda x, a, g, b: ref_dyt(x, a, g, b),
        (x, a, g, b),
    )
    assert_grads_match(
        lambda x, a, s, g, b: norms.derf(x, a, s, g, b),
        lambda x, a, s, g, b: ref_derf(x, a, s, g, b),
        (x, a, np.float32(0.3), g, b),
    )
    # per-channel alpha and shift
    assert_grads_match(
        lambda x, a, s: norms.derf(x, a, s, g, b),
        lambda x, a, s: ref_derf(x, a, s, g, b),
        (x, ac, sc),
    )
    assert_grads_match(
        lambda x, a: norms.dynamic_tanh(x, a, g, b), lambda x, a: ref_dyt(x, a, g, b), (x, ac)
    )


def test_paper_initial_values():
    assert DYT_ALPHA_INIT == 0.5
    assert (DERF_ALPHA_INIT, DERF_SHIFT_INIT) == (0.5, 0.0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_low_precision_input_computes_in_float32(name, dtype):
    fn, ref = LAYERS[name]
    x, g, b, ac, sc = data()
    xl = jnp.asarray(x, dtype)
    y = fn(xl, ac, sc, g, b)
    assert y.dtype == dtype
    # equal to the float32 result of the same (rounded) input, rounded once at the end
    f32 = fn(jnp.asarray(xl, jnp.float32), ac, sc, g, b)
    np.testing.assert_array_equal(
        np.asarray(y, np.float32), np.asarray(f32.astype(dtype), np.float32)
    )
    ulp = 2**-8 if dtype == jnp.bfloat16 else 2**-11
    expected = ref(np.asarray(xl, np.float64), ac, sc, g, b)
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=ulp, atol=ulp)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_one_example_does_not_depend_on_the_others_or_on_other_positions(name):
    fn, _ = LAYERS[name]
    x, g, b, ac, sc = data()
    other = x.copy()
    other[1:] = other[1:] * -7.0 + 3.0  # other examples change
    np.testing.assert_array_equal(fn(x, ac, sc, g, b)[0], fn(other, ac, sc, g, b)[0])
    other = x.copy()
    other[0, 1:] = 100.0  # other positions of the same example change
    np.testing.assert_array_equal(fn(x, ac, sc, g, b)[0, 0], fn(other, ac, sc, g, b)[0, 0])


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_integer_input_gives_float32(name):
    fn, ref = LAYERS[name]
    x = np.random.default_rng(1).integers(-3, 4, (2, 3, C)).astype(np.int32)
    y = fn(x, 0.5, 0.1, None, None)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, ref(x, 0.5, 0.1, None, None), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_jit_vmap_and_shard_map_agree_with_the_plain_call(name):
    fn, _ = LAYERS[name]
    x, g, b, ac, sc = data((8, 2, 3, C))
    y = np.asarray(fn(x, ac, sc, g, b))
    # (XLA may fuse alpha * x + shift into one FMA under jit: equal up to rounding)
    np.testing.assert_allclose(jax.jit(fn)(x, ac, sc, g, b), y, rtol=1e-6, atol=1e-7)
    per_example = jax.vmap(lambda e: fn(e[None], ac, sc, g, b)[0])(x)
    np.testing.assert_allclose(per_example, y, rtol=1e-6, atol=1e-7)
    mesh = jax.make_mesh((8,), ("d",))
    f = jax.shard_map(lambda x: fn(x, ac, sc, g, b), mesh=mesh, in_specs=P("d"), out_specs=P("d"))
    sharded = jax.device_put(x, NamedSharding(mesh, P("d")))
    np.testing.assert_allclose(jax.jit(f)(sharded), y, rtol=1e-6, atol=1e-7)


def test_errors_name_the_bad_value():
    x, g, b, ac, _ = data()
    with pytest.raises(ValueError, match=r"dynamic_tanh: alpha has shape \(2,\).*\(6,\).*axis 3"):
        norms.dynamic_tanh(x, np.ones(2))
    with pytest.raises(ValueError, match=r"dynamic_tanh: alpha is required"):
        norms.dynamic_tanh(x, None)
    with pytest.raises(ValueError, match=r"derf: shift has shape \(1, 6\)"):
        norms.derf(x, 0.5, np.zeros((1, 6)))
    with pytest.raises(ValueError, match=r"derf: scale has shape \(4,\).*6 channels on axis 3"):
        norms.derf(x, 0.5, 0.0, np.ones(4))
    with pytest.raises(ValueError, match=r"dynamic_tanh: bias has shape \(\)"):
        norms.dynamic_tanh(x, 0.5, g, np.float32(0.0))
    with pytest.raises(ValueError, match=r"derf: axis=0 is the batch axis"):
        norms.derf(x, 0.5, 0.0, axis=0)
    with pytest.raises(ValueError, match=r"dynamic_tanh: complex input"):
        norms.dynamic_tanh(x.astype(np.complex64), 0.5)
