"""batch_renorm against a float64 numpy batch renorm written from the paper, and batch_norm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from norms.batch_norm import batch_norm
from norms.batch_renorm import (
    BatchRenormState,
    batch_renorm,
    init_batch_renorm_state,
    paper_d_max,
    paper_r_max,
)
from norms.running_stats import BatchNormState
from tests.norms.numpy_refs import assert_grads_match
from tests.norms.test_batch_norm import rand, ref_group_stats, ref_running

C = 4


def renorm_state(mean, var, count=3, step=0):
    return BatchRenormState(
        jnp.asarray(mean, jnp.float32),
        jnp.asarray(var, jnp.float32),
        jnp.asarray(count, jnp.int32),
        jnp.asarray(step, jnp.int32),
    )


def ref_r_d(x, run_mean, run_var, r_max, d_max, eps):
    """r and d of the paper (float64), treated as constants by the gradient."""
    mu, var, _ = ref_group_stats(x)
    sigma_b = np.sqrt(var + eps)
    sigma = np.sqrt(np.asarray(run_var, np.float64) + eps)
    r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
    d = np.clip((mu - np.asarray(run_mean, np.float64)) / sigma, -d_max, d_max)
    return r, d


def ref_renorm(x, scale, bias, r, d, eps):
    mu, var, _ = ref_group_stats(x)
    return ((x - mu) / np.sqrt(var + eps) * r + d) * scale + bias


def test_equals_batch_norm_exactly_with_r_max_1_and_d_max_0():
    x, scale, bias = rand((6, 3, C), 0, 2.0, 3.0), rand((C,), 1), rand((C,), 2)
    rs = renorm_state(rand((C,), 3), np.abs(rand((C,), 4)) + 0.1, step=7)
    bs = BatchNormState(rs.mean, rs.var, rs.count)

    def renorm_loss(x, s, b):
        y, st = batch_renorm(x, rs, s, b, train=True, r_max=1.0, d_max=0.0, momentum=0.9)
        return jnp.sum(y**3), (y, st)

    def bn_loss(x, s, b):
        y, st = batch_norm(x, bs, s, b, train=True, momentum=0.9)
        return jnp.sum(y**3), (y, st)

    # eager: bit-for-bit; under jit XLA may fuse the two programs differently (1 ulp)
    y1, st1 = renorm_loss(x, scale, bias)[1]
    y2, st2 = bn_loss(x, scale, bias)[1]
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(st1.mean, st2.mean)
    np.testing.assert_array_equal(st1.var, st2.var)
    g1 = jax.jit(jax.grad(lambda *a: renorm_loss(*a)[0], (0, 1, 2)))(x, scale, bias)
    g2 = jax.jit(jax.grad(lambda *a: bn_loss(*a)[0], (0, 1, 2)))(x, scale, bias)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(st1.count) == 4 and int(st1.step) == 8


def test_clipped_r_and_d_match_float64_outputs_running_stats_and_gradients():
    x, scale, bias = rand((8, 2, C), 5, 0.0, 1.0), rand((C,), 6), rand((C,), 7)
    x = x * np.array([0.2, 1.0, 5.0, 1.0], np.float32) + np.array([0, 3, 0, -0.1], np.float32)
    run_mean, run_var = np.zeros(C, np.float32), np.ones(C, np.float32)
    state = renorm_state(run_mean, run_var)
    r, d = ref_r_d(x, run_mean, run_var, 2.0, 1.0, 1e-3)
    # the data exercise both clip ends of r and d and the unclipped middle
    assert r.min() == 0.5 and r.max() == 2.0 and d.max() == 1.0 and 0 < abs(d[3]) < 1
    y, st = batch_renorm(x, state, scale, bias, train=True, r_max=2.0, d_max=1.0, eps=1e-3)
    np.testing.assert_allclose(y, ref_renorm(x, scale, bias, r, d, 1e-3), rtol=1e-4, atol=1e-5)
    rm, rv = ref_running(run_mean, run_var, [ref_group_stats(x)], 0.99)
    np.testing.assert_allclose(st.mean, rm, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(st.var, rv, rtol=1e-5)
    assert_grads_match(
        jax.jit(
            lambda x, s, b: batch_renorm(
                x, state, s, b, train=True, r_max=2.0, d_max=1.0, eps=1e-3
            )[0]
        ),
        lambda x, s, b: ref_renorm(x, s, b, r, d, 1e-3),
        [x, scale, bias],
    )


def test_paper_schedules_follow_the_published_ramps():
    steps = np.array([0, 5000, 12500, 22500, 25000, 40000, 90000])
    np.testing.assert_allclose(
        paper_r_max(steps), [1, 1, 1 + 2 * 7500 / 35000, 2, 1 + 2 * 20 / 35, 3, 3], rtol=1e-6
    )
    np.testing.assert_allclose(
        paper_d_max(steps), [0, 0, 5 * 7500 / 20000, 4.375, 5, 5, 5], rtol=1e-6
    )


def test_schedules_read_the_step_in_the_state():
    x = rand((6, C), 8, 1.0, 2.0)
    run_mean, run_var = rand((C,), 9), np.full(C, 4.0, np.float32)
    f = jax.jit(lambda x, s: batch_renorm(x, s, train=True, r_max=paper_r_max, d_max=paper_d_max))
    y0, st0 = f(x, renorm_state(run_mean, run_var, step=0))
    yb, _ = batch_renorm(x, renorm_state(run_mean, run_var), train=True, r_max=1.0, d_max=0.0)
    np.testing.assert_allclose(y0, yb, rtol=1e-6, atol=1e-6)
    assert int(st0.step) == 1
    y_late, _ = f(x, renorm_state(run_mean, run_var, step=50_000))
    r, d = ref_r_d(x, run_mean, run_var, 3.0, 5.0, 1e-5)
    np.testing.assert_allclose(y_late, ref_renorm(x, 1.0, 0.0, r, d, 1e-5), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", ["nan", "inf", "all_masked"])
def test_skipped_non_finite_batch_advances_neither_count_nor_step(bad):
    x = rand((6, C), 12, 1.0, 2.0)
    mask = np.ones((6, 1), bool)
    if bad == "nan":
        x[2, 1] = np.nan
    elif bad == "inf":
        x[0, 0] = np.inf
    else:
        mask[:] = False
    state = renorm_state(rand((C,), 13), np.full(C, 2.0, np.float32), count=3, step=5)
    f = jax.jit(lambda x, s, m: batch_renorm(x, s, train=True, r_max=paper_r_max, mask=m))
    _, new = f(x, state, mask)
    for k in ("mean", "var", "count", "step"):
        np.testing.assert_array_equal(getattr(new, k), getattr(state, k), err_msg=k)
    _, good = f(rand((6, C), 14), state, np.ones((6, 1), bool))
    assert int(good.count) == 4 and int(good.step) == 6


def test_eval_uses_running_stats_and_keeps_state():
    x = rand((3, C), 10)
    state = renorm_state(rand((C,), 11), np.full(C, 2.0, np.float32), count=2, step=5)
    y, new = batch_renorm(x, state, train=False)
    np.testing.assert_allclose(y, (x - np.float64(state.mean)) / np.sqrt(2.0 + 1e-5), rtol=1e-5)
    assert new is state


def test_init_state_and_errors():
    st = init_batch_renorm_state(C)
    assert st.var.dtype == jnp.float32 and st.step.dtype == jnp.int32 and int(st.step) == 0
    with pytest.raises(ValueError, match="r_max=0.5"):
        batch_renorm(jnp.ones((4, C)), st, train=True, r_max=0.5)
    with pytest.raises(ValueError, match="d_max=-1"):
        batch_renorm(jnp.ones((4, C)), st, train=True, d_max=-1.0)
    with pytest.raises(ValueError, match=r"batch_renorm: scale has shape \(3,\)"):
        batch_renorm(jnp.ones((4, C)), st, jnp.ones(3), train=True)
    with pytest.raises(ValueError, match="one value per channel"):
        batch_renorm(jnp.ones((1, C)), st, train=True)
