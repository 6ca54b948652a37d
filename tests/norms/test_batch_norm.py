"""batch_norm against a float64 numpy batch norm written from the formula, and flax's BatchNorm."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from norms import batch_norm, init_batch_norm_state
from norms.running_stats import BatchNormState, StaleStatisticsError, StaleStatisticsWarning
from tests.norms.numpy_refs import assert_grads_match

# ---------------------------------------------------------------------------
# float64 references (channels-last), written from the formula.
# ---------------------------------------------------------------------------


def ref_group_stats(x, mask=None):
    """(mean, biased var, count) per channel of (n, ..., C) over every other axis."""
    x = np.asarray(x, np.float64)
    m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
    axes = tuple(range(x.ndim - 1))
    count = m.sum(axis=axes).astype(np.float64)
    mean = np.where(m, x, 0.0).sum(axis=axes) / count
    var = np.where(m, (x - mean) ** 2, 0.0).sum(axis=axes) / count
    return mean, var, count


def ref_bn_train(x, scale=None, bias=None, eps=1e-5, mask=None, ghost=None):
    """Train-mode output and the per-ghost-batch (mean, var, count) list."""
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    g = n if ghost is None else ghost
    m = None if mask is None else np.broadcast_to(mask, x.shape)
    ys, stats = [], []
    for j in range(n // g):
        xs = x[j * g : (j + 1) * g]
        mean, var, count = ref_group_stats(xs, None if m is None else m[j * g : (j + 1) * g])
        y = (xs - mean) / np.sqrt(var + eps)
        if scale is not None:
            y = y * np.asarray(scale, np.float64)
        if bias is not None:
            y = y + np.asarray(bias, np.float64)
        ys.append(y)
        stats.append((mean, var, count))
    return np.concatenate(ys), stats


def ref_running(old_mean, old_var, stats, momentum, unbiased=False):
    """new = momentum * old + (1 - momentum) * batch; ghost batches pooled within-variance."""
    counts = np.stack([s[2] for s in stats])
    means = np.stack([s[0] for s in stats])
    m2s = np.stack([s[1] * s[2] for s in stats])
    mean = (counts * means).sum(0) / counts.sum(0)
    denom = (counts - 1).sum(0) if unbiased else counts.sum(0)
    var = m2s.sum(0) / denom
    return momentum * old_mean + (1 - momentum) * mean, momentum * old_var + (1 - momentum) * var


def rand(shape, seed=0, loc=0.0, std=1.0):
    return np.random.default_rng(seed).normal(loc, std, shape).astype(np.float32)


def state_of(mean, var, count):
    return BatchNormState(
        jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32), jnp.asarray(count, jnp.int32)
    )


# ---------------------------------------------------------------------------
# Outputs and running statistics.
# ---------------------------------------------------------------------------


def test_train_output_and_two_running_updates_match_float64():
    x1, x2 = rand((6, 3, 2, 4), 0, 2.0, 3.0), rand((6, 3, 2, 4), 1, -1.0, 0.5)
    scale, bias = rand((4,), 2), rand((4,), 3)
    state = init_batch_norm_state(4)
    rm, rv = np.zeros(4), np.ones(4)
    for x in (x1, x2):
        y, state = batch_norm(x, state, scale, bias, train=True, momentum=0.8, eps=1e-3)
        ry, stats = ref_bn_train(x, scale, bias, eps=1e-3)
        rm, rv = ref_running(rm, rv, stats, 0.8)
        np.testing.assert_allclose(y, ry, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state.mean, rm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.var, rv, rtol=1e-5)
    assert int(state.count) == 2 and state.count.dtype == jnp.int32
    assert state.mean.dtype == jnp.float32 and state.var.dtype == jnp.float32


def test_eval_uses_running_stats_and_returns_state_unchanged():
    x = rand((5, 3), 4)
    state = state_of(rand((3,), 5), np.abs(rand((3,), 6)) + 0.5, 3)
    scale, bias = rand((3,), 7), rand((3,), 8)
    y, new = batch_norm(x, state, scale, bias, train=False, eps=1e-5)
    ref = (x - np.float64(state.mean)) / np.sqrt(np.float64(state.var) + 1e-5) * scale + bias
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    assert new is state


def test_channel_axis_1_equals_channels_last():
    x = rand((4, 3, 2, 5), 9)
    s = init_batch_norm_state(3)
    y1, st1 = batch_norm(x, s, train=True, axis=1)
    y2, st2 = batch_norm(np.moveaxis(x, 1, -1), s, train=True)
    np.testing.assert_allclose(np.moveaxis(np.asarray(y1), 1, -1), y2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st1.var, st2.var, rtol=1e-6)


def test_unbiased_running_var_uses_masked_count():
    x = rand((7, 2, 3), 10, 1.0, 2.0)
    mask = np.array([1, 1, 0, 1, 0, 1, 1], bool)[:, None, None]
    _, st = batch_norm(
        x, init_batch_norm_state(3), train=True, momentum=0.5, mask=mask, unbiased_running_var=True
    )
    _, stats = ref_bn_train(x, mask=mask)
    n = stats[0][2]
    assert (n == 10).all()
    np.testing.assert_allclose(st.var, 0.5 + 0.5 * stats[0][1] * n / (n - 1), rtol=1e-5)


def test_zero_debias_equals_bias_corrected_zero_init_ema():
    xs = [rand((8, 3), 20 + i, 3.0, 2.0) for i in range(3)]
    m = 0.7
    state = init_batch_norm_state(3)
    ema_mean, ema_var = np.zeros(3), np.zeros(3)
    for t, x in enumerate(xs, start=1):
        _, state = batch_norm(x, state, train=True, momentum=m, zero_debias=True)
        _, stats = ref_bn_train(x)
        ema_mean = m * ema_mean + (1 - m) * stats[0][0]
        ema_var = m * ema_var + (1 - m) * stats[0][1]
        np.testing.assert_allclose(state.mean, ema_mean / (1 - m**t), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state.var, ema_var / (1 - m**t), rtol=1e-5)


def test_ghost_batches_normalize_each_run_and_update_once():
    x = rand((8, 2, 3), 30, 1.0, 2.0)
    x[4:] += 5.0  # the two ghost batches differ, so whole-batch stats would be wrong
    mask = np.ones((8, 1, 1), bool)
    mask[1] = mask[6] = False
    scale, bias = rand((3,), 31), rand((3,), 32)
    for unbiased in (False, True):
        y, st = batch_norm(
            x,
            init_batch_norm_state(3),
            scale,
            bias,
            train=True,
            momentum=0.6,
            ghost_batch_size=4,
            mask=mask,
            unbiased_running_var=unbiased,
        )
        ry, stats = ref_bn_train(x, scale, bias, mask=mask, ghost=4)
        rm, rv = ref_running(np.zeros(3), np.ones(3), stats, 0.6, unbiased=unbiased)
        np.testing.assert_allclose(y, ry, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(st.mean, rm, rtol=1e-5)
        np.testing.assert_allclose(st.var, rv, rtol=1e-5)
        assert int(st.count) == 1


def test_masked_values_do_not_touch_statistics():
    x = rand((6, 4, 3), 40)
    mask = np.random.default_rng(41).random((6, 4, 1)) < 0.6
    poisoned = np.where(mask, x, 1e6).astype(np.float32)
    y, st = batch_norm(poisoned, init_batch_norm_state(3), train=True, mask=mask)
    ry, stats = ref_bn_train(x, mask=mask)
    rm, rv = ref_running(np.zeros(3), np.ones(3), stats, 0.9)
    np.testing.assert_allclose(
        np.asarray(y)[np.broadcast_to(mask, x.shape)],
        ry[np.broadcast_to(mask, x.shape)],
        rtol=1e-4,
        atol=1e-5,
    )
    np.testing.assert_allclose(st.mean, rm, rtol=1e-5)
    np.testing.assert_allclose(st.var, rv, rtol=1e-5)


# ---------------------------------------------------------------------------
# Gradients (train and frozen) against finite differences of the float64 reference.
# ---------------------------------------------------------------------------


def test_train_gradients_match_finite_differences():
    state = init_batch_norm_state(3)
    assert_grads_match(
        jax.jit(lambda x, s, b: batch_norm(x, state, s, b, train=True, eps=1e-3)[0]),
        lambda x, s, b: ref_bn_train(x, s, b, eps=1e-3)[0],
        [rand((4, 2, 3), 50), rand((3,), 51), rand((3,), 52)],
    )


def test_ghost_batch_gradients_match_finite_differences():
    state = init_batch_norm_state(2)
    assert_grads_match(
        jax.jit(
            lambda x, s: batch_norm(x, state, s, None, train=True, eps=1e-3, ghost_batch_size=3)[0]
        ),
        lambda x, s: ref_bn_train(x, s, None, eps=1e-3, ghost=3)[0],
        [rand((6, 2), 53), rand((2,), 54)],
    )


def test_frozen_gradients_flow_to_input_and_affine():
    state = state_of([0.5, -1.0, 2.0], [2.0, 0.5, 1.5], 4)
    mean, var = np.float64(state.mean), np.float64(state.var)
    assert_grads_match(
        jax.jit(lambda x, s, b: batch_norm(x, state, s, b, train=False)[0]),
        lambda x, s, b: (x - mean) / np.sqrt(var + 1e-5) * s + b,
        [rand((3, 2, 3), 55), rand((3,), 56), rand((3,), 57)],
    )


# ---------------------------------------------------------------------------
# Parity with flax.linen.BatchNorm (same momentum convention, biased running var).
# ---------------------------------------------------------------------------


def test_matches_flax_batch_norm_over_steps_and_in_eval():
    bn = nn.BatchNorm(momentum=0.9, epsilon=1e-5, use_fast_variance=False)
    xs = [rand((8, 3, 3, 5), 60 + i, 2.0, 3.0) for i in range(3)]
    variables = bn.init(jax.random.key(0), xs[0], use_running_average=True)
    params = {"scale": rand((5,), 64), "bias": rand((5,), 65)}
    bstats = variables["batch_stats"]
    state = init_batch_norm_state(5)
    for x in xs:
        fy, upd = bn.apply(
            {"params": params, "batch_stats": bstats},
            x,
            use_running_average=False,
            mutable=["batch_stats"],
        )
        bstats = upd["batch_stats"]
        y, state = batch_norm(x, state, params["scale"], params["bias"], train=True)
        np.testing.assert_allclose(y, fy, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state.mean, bstats["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.var, bstats["var"], rtol=1e-5)
    fy = bn.apply({"params": params, "batch_stats": bstats}, xs[0], use_running_average=True)
    y, _ = batch_norm(xs[0], state, params["scale"], params["bias"], train=False)
    np.testing.assert_allclose(y, fy, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# Numerics.
# ---------------------------------------------------------------------------


def test_large_mean_small_std_within_tolerance_of_float64():
    x = rand((16, 4, 4, 8), 70, 1e3, 1e-2)
    y, _ = jax.jit(lambda x: batch_norm(x, init_batch_norm_state(8), train=True))(x)
    ry, _ = ref_bn_train(x)
    np.testing.assert_allclose(y, ry, atol=5e-2)


def test_bf16_input_keeps_float32_stats_and_bf16_output():
    x = jnp.asarray(rand((8, 2, 2, 4), 71, 1.0, 2.0), jnp.bfloat16)
    y, st = batch_norm(x, init_batch_norm_state(4), train=True)
    assert y.dtype == jnp.bfloat16 and st.mean.dtype == jnp.float32
    xf = np.asarray(x.astype(jnp.float32))
    _, stats = ref_bn_train(xf)
    rm, rv = ref_running(np.zeros(4), np.ones(4), stats, 0.9)
    np.testing.assert_allclose(st.mean, rm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st.var, rv, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), ref_bn_train(xf)[0], atol=3e-2)


def test_constant_input_gives_finite_output_and_gradient():
    x = jnp.full((4, 3, 2), 7.0)
    state = init_batch_norm_state(2)
    y, _ = batch_norm(x, state, train=True)
    g = jax.jit(jax.grad(lambda x: jnp.sum(batch_norm(x, state, train=True)[0] ** 2 + x)))(x)
    assert np.isfinite(np.asarray(y)).all() and np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(y, 0.0, atol=1e-6)


def test_non_finite_batch_does_not_poison_running_stats():
    state = state_of([1.0, 2.0], [3.0, 4.0], 5)
    x = rand((4, 2), 72)
    x[1, 0] = np.nan
    _, new = jax.jit(lambda x, s: batch_norm(x, s, train=True))(x, state)
    np.testing.assert_array_equal(new.mean, state.mean)
    np.testing.assert_array_equal(new.var, state.var)
    assert int(new.count) == 5
    x[1, 0] = np.inf
    _, new = batch_norm(x, state, train=True)
    np.testing.assert_array_equal(new.var, state.var)


# ---------------------------------------------------------------------------
# Transformations.
# ---------------------------------------------------------------------------


def test_checkpoint_updates_running_stats_once_and_keeps_gradients():
    x, scale = rand((6, 3), 80), np.ones(3, np.float32)
    state = init_batch_norm_state(3)

    def loss(scale, x, state):
        y, new = batch_norm(x, state, scale, train=True)
        return jnp.sum(y**3), new

    (l1, s1), g1 = jax.value_and_grad(loss, has_aux=True)(scale, x, state)
    (l2, s2), g2 = jax.jit(jax.value_and_grad(jax.checkpoint(loss), has_aux=True))(scale, x, state)
    assert int(s2.count) == 1
    np.testing.assert_allclose(s2.mean, s1.mean, rtol=1e-6)
    np.testing.assert_allclose(g2, g1, rtol=1e-5, atol=1e-6)


def test_eval_shape_gives_shapes_and_dtypes():
    out = jax.eval_shape(
        lambda x, s: batch_norm(x, s, train=True),
        jax.ShapeDtypeStruct((4, 5, 6), jnp.bfloat16),
        init_batch_norm_state(6),
    )
    y, st = out
    assert y.shape == (4, 5, 6) and y.dtype == jnp.bfloat16
    assert st.mean.shape == (6,) and st.mean.dtype == jnp.float32
    assert st.count.shape == () and st.count.dtype == jnp.int32


def test_vmap_over_independent_layers():
    xs = rand((3, 4, 2), 81)
    states = jax.tree.map(lambda t: jnp.stack([t] * 3), init_batch_norm_state(2))
    ys, new = jax.jit(jax.vmap(lambda x, s: batch_norm(x, s, train=True)))(xs, states)
    for i in range(3):
        np.testing.assert_allclose(ys[i], ref_bn_train(xs[i])[0], rtol=1e-4, atol=1e-5)
    assert new.count.tolist() == [1, 1, 1]


# ---------------------------------------------------------------------------
# Errors and stale statistics.
# ---------------------------------------------------------------------------


def test_one_value_per_channel_in_training_is_a_trace_time_error():
    with pytest.raises(ValueError, match="one value per channel.*axis_name.*group_norm"):
        jax.jit(lambda x: batch_norm(x, init_batch_norm_state(3), train=True))(jnp.ones((1, 3)))
    batch_norm(jnp.ones((1, 3)), state_of(np.zeros(3), np.ones(3), 1), train=False)


def test_unbound_axis_name_error_names_the_axis():
    with pytest.raises(ValueError, match="axis_name='batch'.*pmap"):
        batch_norm(jnp.ones((4, 3)), init_batch_norm_state(3), train=True, axis_name="batch")


def test_bad_parameter_and_state_shapes_name_the_shapes():
    x, st = jnp.ones((4, 3)), init_batch_norm_state(3)
    with pytest.raises(ValueError, match=r"scale has shape \(4,\).*\(4, 3\).*3 channels"):
        batch_norm(x, st, jnp.ones(4), train=True)
    with pytest.raises(ValueError, match=r"bias has shape \(1, 3\)"):
        batch_norm(x, st, None, jnp.ones((1, 3)), train=True)
    with pytest.raises(ValueError, match=r"state.mean has shape \(5,\)"):
        batch_norm(x, init_batch_norm_state(5), train=True)


def test_bad_ghost_batch_size_names_both_numbers():
    with pytest.raises(ValueError, match="batch size 6.*ghost_batch_size=4"):
        batch_norm(jnp.ones((6, 3)), init_batch_norm_state(3), train=True, ghost_batch_size=4)


def test_bad_momentum_and_on_stale_values():
    with pytest.raises(ValueError, match="momentum=1.5"):
        batch_norm(jnp.ones((4, 3)), init_batch_norm_state(3), train=True, momentum=1.5)
    with pytest.raises(ValueError, match="on_stale='loud'"):
        batch_norm(jnp.ones((4, 3)), init_batch_norm_state(3), train=False, on_stale="loud")


def test_eval_on_never_updated_stats_warns_or_raises():
    x, st = jnp.ones((4, 3)), init_batch_norm_state(3)
    with pytest.warns(StaleStatisticsWarning, match="never updated"):
        batch_norm(x, st, train=False)
    with pytest.raises(StaleStatisticsError, match="never updated"):
        batch_norm(x, st, train=False, on_stale="error")
    with pytest.raises(Exception, match="never updated"):
        jax.block_until_ready(
            jax.jit(lambda x, s: batch_norm(x, s, train=False, on_stale="error")[0])(x, st)
        )
    with pytest.warns(StaleStatisticsWarning):
        jax.block_until_ready(jax.jit(lambda x, s: batch_norm(x, s, train=False)[0])(x, st))
    _, st1 = batch_norm(x + jnp.arange(4.0)[:, None], st, train=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch_norm(x, st1, train=False, on_stale="error")
        jax.block_until_ready(jax.jit(lambda x, s: batch_norm(x, s, train=False)[0])(x, st1))
        batch_norm(x, st, train=False, on_stale="ignore")
