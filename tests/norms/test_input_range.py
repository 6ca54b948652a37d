"""Every norm on integer inputs and on inputs whose squares overflow float32.

The float64 references are the ones written from each paper's formula next to
the norm's own tests.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import norms
from norms.running_stats import BatchNormState
from tests.norms.test_batch_norm import ref_bn_train
from tests.norms.test_batch_renorm import ref_r_d, ref_renorm
from tests.norms.test_evo_norm import ref_b0, ref_s0
from tests.norms.test_filter_response_norm import ref_frn
from tests.norms.test_group_norm import ref_group_norm
from tests.norms.test_pointwise import ref_derf, ref_dyt
from tests.norms.test_rms_norm import ref_rms_norm
from tests.norms.test_switchable_norm import ref_switchable
from tests.norms.test_weight_standardization import ref_scaled_ws, ref_ws

C = 6
RNG = np.random.default_rng(0)
S, B, V, TAU = (RNG.normal(m, 0.3, C).astype(np.float32) for m in (1.0, 0.0, 1.0, -5.0))
LOGITS_M = np.array([0.3, -0.2, 0.5], np.float32)
LOGITS_V = np.array([-0.4, 0.1, 0.2], np.float32)
RUN_MEAN = RNG.normal(0.0, 1.0, C).astype(np.float32)
RUN_VAR = (RNG.random(C) + 0.5).astype(np.float32)


def _state():
    return norms.init_batch_norm_state(C)


def _run_state():
    return BatchNormState(jnp.asarray(RUN_MEAN), jnp.asarray(RUN_VAR), jnp.ones((), jnp.int32))


def _bn_eval_ref(x):
    return (x - RUN_MEAN) / np.sqrt(RUN_VAR.astype(np.float64) + 1e-5) * S + B


def _renorm_ref(x):
    r, d = ref_r_d(x, 0.0, 1.0, 3.0, 5.0, 1e-5)
    return ref_renorm(x, S, B, r, d, 1e-5)


# name -> (our function of x, float64 reference of x). Every norm of the package.
NORMS = {
    "batch_norm": (
        lambda x: norms.batch_norm(x, _state(), S, B, train=True)[0],
        lambda x: ref_bn_train(x, S, B)[0],
    ),
    "batch_norm_eval": (
        lambda x: norms.batch_norm(x, _run_state(), S, B, train=False)[0],
        _bn_eval_ref,
    ),
    "batch_renorm": (
        lambda x: norms.batch_renorm(x, norms.init_batch_renorm_state(C), S, B, train=True)[0],
        _renorm_ref,
    ),
    "group_norm": (
        lambda x: norms.group_norm(x, S, B, num_groups=2),
        lambda x: ref_group_norm(x, S, B, 2),
    ),
    "layer_norm": (lambda x: norms.layer_norm(x, S, B), lambda x: ref_group_norm(x, S, B, 1)),
    "instance_norm": (
        lambda x: norms.instance_norm(x, S, B),
        lambda x: ref_group_norm(x, S, B, C),
    ),
    "filter_response_norm": (
        lambda x: norms.filter_response_norm(x, S, B, TAU),
        lambda x: ref_frn(x, S, B, TAU),
    ),
    "rms_norm": (lambda x: norms.rms_norm(x, S), lambda x: ref_rms_norm(x, S)),
    "dynamic_tanh": (
        lambda x: norms.dynamic_tanh(x, 0.5, S, B),
        lambda x: ref_dyt(x, 0.5, S, B),
    ),
    "derf": (
        lambda x: norms.derf(x, 0.5, 0.1, S, B),
        lambda x: ref_derf(x, 0.5, 0.1, S, B),
    ),
    "switchable_norm": (
        lambda x: norms.switchable_norm(x, _state(), S, B, LOGITS_M, LOGITS_V, train=True)[0],
        lambda x: ref_switchable(x, S, B, LOGITS_M, LOGITS_V)[0],
    ),
    "evonorm_b0": (
        lambda x: norms.evonorm_b0(x, _state(), S, B, V, train=True)[0],
        lambda x: ref_b0(x, S, B, V)[0],
    ),
    "evonorm_s0": (
        lambda x: norms.evonorm_s0(x, S, B, V, num_groups=3),
        lambda x: ref_s0(x, S, B, V, 3),
    ),
    # Kernels (kh, kw, I, O) with O = C: the last axis is the output channel.
    "weight_standardize": (norms.weight_standardize, ref_ws),
    "scaled_weight_standardize": (
        lambda w: norms.scaled_weight_standardize(w, S),
        lambda w: ref_scaled_ws(w, S),
    ),
}
SHAPE = (4, 3, 5, C)
# No statistics to overflow: a huge input saturates tanh / erf to a finite, correct value.
POINTWISE = {"dynamic_tanh", "derf"}


@pytest.mark.parametrize("dtype", [np.int32, np.uint8])
@pytest.mark.parametrize("name", sorted(NORMS))
def test_integer_input_is_normalized_in_float32(name, dtype):
    low = 0 if dtype == np.uint8 else -60
    x = np.random.default_rng(1).integers(low, 200, SHAPE).astype(dtype)
    fn, ref = NORMS[name]
    y = fn(x)
    assert y.dtype == jnp.float32, f"{name} returned {y.dtype} for {np.dtype(dtype)} input"
    expected = ref(x.astype(np.float64))
    np.testing.assert_allclose(np.asarray(y), expected, rtol=2e-5, atol=2e-5)


def test_integer_input_through_the_modules_and_moments():
    from flax import nnx as flax_nnx

    from norms import linen, nnx

    x = np.random.default_rng(2).integers(0, 255, SHAPE).astype(np.uint8)
    mod = linen.make("group_norm", num_groups=2)
    y = mod.apply(mod.init(jax.random.key(0), x), x)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, ref_group_norm(x, 1.0, 0.0, 2), rtol=2e-5, atol=2e-5)
    bn = nnx.make("batch_norm", C, rngs=flax_nnx.Rngs(0))
    y = bn(x)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, ref_bn_train(x)[0], rtol=2e-5, atol=2e-5)
    mean, var, _ = norms.moments(x, (0, 1, 2))
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean((0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(var, x64.var((0, 1, 2)), rtol=1e-5)


def test_complex_input_is_rejected_with_a_clear_error():
    x = jnp.ones(SHAPE, jnp.complex64)
    with pytest.raises(ValueError, match="complex"):
        norms.group_norm(x, num_groups=2)
    with pytest.raises(ValueError, match="complex"):
        norms.batch_norm(x, _state(), train=True)


# Norms whose output is scale-invariant (up to eps): not eval with running
# statistics, nor renorm's correction towards them, nor S0's sigmoid(v * x).
SCALE_FREE = sorted(set(NORMS) - {"batch_norm_eval", "batch_renorm", "evonorm_s0"} - POINTWISE)


@pytest.mark.parametrize("name", sorted(set(NORMS) - {"batch_norm_eval"}))
def test_large_inputs_whose_squares_fit_float32_match_the_reference(name):
    """|x| ~ 1e15: squares ~ 1e30, summed well below float32's 3.4e38."""
    x = np.random.default_rng(3).normal(0.5, 2.0, SHAPE).astype(np.float32) * np.float32(1e15)
    fn, ref = NORMS[name]
    y = np.asarray(fn(x))
    with np.errstate(over="ignore"):  # exp(-v x) of S0's reference overflows to inf: fine
        expected = ref(x.astype(np.float64))
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scale", [1e19, 1e30])
@pytest.mark.parametrize("name", sorted(set(NORMS) - {"batch_norm_eval", "rms_norm"} - POINTWISE))
def test_inputs_whose_squares_overflow_give_non_finite_outputs_not_zeros(name, scale):
    """Float32 statistics of ~1e19+ values overflow; the output must say so (NaN).

    The float64 reference of the same input is finite (and, for the scale-free
    norms, equal to the reference of the unscaled input): a float32 zero here would
    be a plausible-looking wrong answer.
    """
    x = np.random.default_rng(4).normal(0.5, 2.0, SHAPE).astype(np.float32)
    big = x * np.float32(scale)
    assert np.all(np.isfinite(big))
    fn, ref = NORMS[name]
    with np.errstate(over="ignore"):
        expected = ref(big.astype(np.float64))
    assert np.all(np.isfinite(expected))
    if name in SCALE_FREE:
        np.testing.assert_allclose(expected, ref(x.astype(np.float64)), rtol=1e-4, atol=1e-4)
    y = np.asarray(fn(big))
    assert not np.any(np.isfinite(y)), f"{name}: finite outputs from overflowed statistics"


@pytest.mark.parametrize("name", ["batch_norm", "group_norm", "layer_norm", "rms_norm"])
def test_overflowed_statistics_give_non_finite_gradients(name):
    fn, _ = NORMS[name]
    big = np.random.default_rng(5).normal(0.5, 2.0, SHAPE).astype(np.float32) * np.float32(1e30)
    g = jax.grad(lambda x: jnp.sum(fn(x) * jnp.arange(x.size).reshape(x.shape)))(big)
    assert not np.any(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("scale", [1e19, 1e30])
def test_rms_norm_is_nan_exactly_where_its_mean_square_overflows(scale):
    """One statistic per 6-channel vector: some overflow at 1e19, all at 1e30."""
    big = np.random.default_rng(4).normal(0.5, 2.0, SHAPE).astype(np.float32) * np.float32(scale)
    fn, ref = NORMS["rms_norm"]
    y = np.asarray(fn(big))
    with np.errstate(over="ignore"):
        overflowed = ~np.isfinite(np.sum(np.square(big), axis=-1, keepdims=True))
    assert overflowed.any()
    np.testing.assert_array_equal(np.isnan(y), np.broadcast_to(overflowed, y.shape))
    ok = ~np.broadcast_to(overflowed, y.shape)
    np.testing.assert_allclose(y[ok], ref(big.astype(np.float64))[ok], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(POINTWISE))
@pytest.mark.parametrize("scale", [1e19, 1e30])
def test_pointwise_layers_saturate_finitely_on_huge_inputs(name, scale):
    x = np.random.default_rng(4).normal(0.5, 2.0, SHAPE).astype(np.float32) * np.float32(scale)
    fn, ref = NORMS[name]
    np.testing.assert_allclose(np.asarray(fn(x)), ref(x.astype(np.float64)), rtol=1e-6)


def test_overflowed_batch_leaves_the_running_statistics_alone():
    big = np.random.default_rng(6).normal(0.5, 2.0, SHAPE).astype(np.float32) * np.float32(1e30)
    st = _run_state()
    for fn in (
        lambda: norms.batch_norm(big, st, S, B, train=True)[1],
        lambda: norms.evonorm_b0(big, st, S, B, V, train=True)[1],
        lambda: norms.switchable_norm(big, st, S, B, LOGITS_M, LOGITS_V, train=True)[1],
    ):
        new = fn()
        np.testing.assert_array_equal(new.mean, RUN_MEAN)
        np.testing.assert_array_equal(new.var, RUN_VAR)
        assert int(new.count) == 1
