"""evonorm_b0 / evonorm_s0 against float64 numpy written from Liu et al. (2020)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import norms
from norms.evo_norm import evonorm_s0_groups
from tests.norms.numpy_refs import assert_grads_match


def ref_b0(x, scale, bias, v, run_var=None, eps=1e-5, mask=None):
    """x / max(sqrt(var_{N,H,W} + eps), v x + sqrt(var_{H,W} + eps)) * scale + bias."""
    x = np.asarray(x, np.float64)
    m = np.ones(x.shape) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)

    def var(axes):
        cnt = np.maximum(m.sum(axis=axes, keepdims=True), 1)
        mu = (x * m).sum(axis=axes, keepdims=True) / cnt
        return (((x - mu) ** 2) * m).sum(axis=axes, keepdims=True) / cnt

    var_b = var(tuple(range(x.ndim - 1))) if run_var is None else np.asarray(run_var, np.float64)
    var_i = var(tuple(range(1, x.ndim - 1)))
    den = np.maximum(np.sqrt(var_b + eps), np.asarray(v, np.float64) * x + np.sqrt(var_i + eps))
    y = x / den * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)
    return y, np.reshape(var_b, -1)


def ref_s0(x, scale, bias, v, groups, eps=1e-5, mask=None):
    """x * sigmoid(v x) / sqrt(var_{H,W,C/G} + eps) * scale + bias (var over True values)."""
    x = np.asarray(x, np.float64)
    n, *sp, c = x.shape
    xg = x.reshape(n, *sp, groups, c // groups)
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    m = np.ones(x.shape) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
    m = m.reshape(xg.shape)
    cnt = np.maximum(m.sum(axis=axes, keepdims=True), 1)
    mu = (m * xg).sum(axis=axes, keepdims=True) / cnt
    std = np.sqrt((m * (xg - mu) ** 2).sum(axis=axes, keepdims=True) / cnt + eps)
    v = np.asarray(v, np.float64)
    num = (x / (1 + np.exp(-v * x))).reshape(xg.shape)
    return (num / std).reshape(x.shape) * np.asarray(scale, np.float64) + np.asarray(bias)


def data(shape=(4, 3, 5, 6), loc=0.5, std=2.0, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = rng.normal(loc, std, shape).astype(np.float32)
    s = rng.normal(1.0, 0.3, c).astype(np.float32)
    b = rng.normal(0.0, 0.3, c).astype(np.float32)
    v = rng.normal(1.0, 0.5, c).astype(np.float32)
    return x, s, b, v


def test_b0_train_and_running_variance_match_paper_formula():
    x, s, b, v = data()
    st = norms.init_batch_norm_state(6)
    y, new = norms.evonorm_b0(x, st, s, b, v, train=True, momentum=0.7)
    ref, var_b = ref_b0(x, s, b, v)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.var, 0.7 + 0.3 * var_b, rtol=1e-5)
    assert int(new.count) == 1
    _, _, bm = norms.evonorm_b0(x, st, s, b, v, train=True, return_batch_stats=True)
    np.testing.assert_allclose(bm.var, var_b, rtol=1e-5)
    np.testing.assert_allclose(bm.mean, x.astype(np.float64).mean(axis=(0, 1, 2)), atol=1e-5)
    np.testing.assert_array_equal(bm.count, 4 * 3 * 5)
    # Both branches of the max are taken somewhere, so both are tested.
    x64 = np.asarray(x, np.float64)
    var_i = x64.var(axis=(1, 2), keepdims=True)
    right = v * x64 + np.sqrt(var_i + 1e-5)
    left = np.sqrt(var_b + 1e-5)
    assert (right > left).any() and (right < left).any()


def test_b0_eval_uses_running_variance():
    x, s, b, v = data()
    st = norms.BatchNormState(
        jnp.zeros(6), jnp.asarray(np.linspace(0.5, 3.0, 6), jnp.float32), jnp.asarray(3)
    )
    y, new = norms.evonorm_b0(x, st, s, b, v, train=False)
    ref, _ = ref_b0(x, s, b, v, run_var=st.var)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert new is st


def test_b0_gradients_match_finite_differences():
    x, s, b, v = data((3, 2, 2, 3))
    st = norms.init_batch_norm_state(3)
    assert_grads_match(
        lambda *a: norms.evonorm_b0(a[0], st, *a[1:], train=True)[0],
        lambda *a: ref_b0(*a)[0],
        (x, s, b, v),
    )


def test_b0_pmap_with_masks_equals_one_big_batch():
    rng = np.random.default_rng(4)
    x = rng.normal(0.5, 2.0, (8, 2, 3, 3, 4)).astype(np.float32)
    mask = rng.random((8, 2, 1, 1, 1)) < 0.6
    mask[:, 0] = True
    _, s, b, v = data((2, 3, 3, 4))
    st = norms.init_batch_norm_state(4)
    f = jax.pmap(
        lambda x, m: norms.evonorm_b0(x, st, s, b, v, train=True, axis_name="d", mask=m),
        axis_name="d",
    )
    y, new = f(x, mask)
    ref, var_b = ref_b0(x.reshape(16, 3, 3, 4), s, b, v, mask=mask.reshape(16, 1, 1, 1))
    keep = mask.reshape(16)
    np.testing.assert_allclose(np.asarray(y).reshape(16, 3, 3, 4)[keep], ref[keep], atol=1e-4)
    np.testing.assert_allclose(new.var[3], 0.9 + 0.1 * var_b, rtol=1e-5)


def test_s0_matches_paper_formula_and_group_rule():
    assert evonorm_s0_groups(64) == 32
    assert evonorm_s0_groups(24) == 24
    assert evonorm_s0_groups(48) == 24
    assert evonorm_s0_groups(100) == 25
    assert evonorm_s0_groups(12, 4) == 4
    x, s, b, v = data((2, 3, 4, 48))
    np.testing.assert_allclose(norms.evonorm_s0(x, s, b, v), ref_s0(x, s, b, v, 24), atol=1e-5)
    np.testing.assert_allclose(
        norms.evonorm_s0(x, s, b, v, num_groups=4), ref_s0(x, s, b, v, 4), atol=1e-5
    )
    y = norms.evonorm_s0(np.moveaxis(x, -1, 1), s, b, v, num_groups=4, axis=1)
    np.testing.assert_allclose(np.moveaxis(np.asarray(y), 1, -1), ref_s0(x, s, b, v, 4), atol=1e-5)


def test_s0_gradients_match_finite_differences():
    x, s, b, v = data((2, 3, 2, 4))
    assert_grads_match(
        lambda *a: norms.evonorm_s0(*a, num_groups=2),
        lambda *a: ref_s0(*a, 2),
        (x, s, b, v),
    )


def test_s0_batch_independence():
    x, s, b, v = data()
    other = x.copy()
    other[1:] = -other[1:] * 9.0
    f = lambda x: norms.evonorm_s0(x, s, b, v, num_groups=3)
    np.testing.assert_allclose(f(x)[0], f(other)[0], atol=1e-6)


def test_large_mean_small_std_and_constant_inputs():
    x, s, b, v = data(loc=1e3, std=1e-2)
    v = v * 1e-3  # keep sigmoid(v x) away from saturation at x ~ 1e3
    np.testing.assert_allclose(
        norms.evonorm_s0(x, s, b, v, num_groups=3), ref_s0(x, s, b, v, 3), rtol=5e-2, atol=5e-2
    )
    st = norms.init_batch_norm_state(6)
    y, _ = norms.evonorm_b0(x, st, s, b, v, train=True)
    np.testing.assert_allclose(y, ref_b0(x, s, b, v)[0], rtol=5e-2, atol=5e-2)
    c = jnp.full((2, 3, 3, 6), 2.0)
    grads = jax.jit(
        jax.grad(
            lambda c, s, v: (
                jnp.sum(norms.evonorm_b0(c, st, s, b, v, train=True)[0] ** 2)
                + jnp.sum(norms.evonorm_s0(c, s, b, v) ** 2)
            ),
            (0, 1, 2),
        )
    )(c, s, v)
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()


def test_errors():
    x, s, b, v = data()
    st = norms.init_batch_norm_state(6)
    with pytest.raises(ValueError, match=r"v has shape \(\).*\(6,\)"):
        norms.evonorm_b0(x, st, s, b, jnp.ones(()), train=True)
    with pytest.raises(ValueError, match=r"v has shape \(3,\).*\(6,\)"):
        norms.evonorm_s0(x, s, b, v[:3])
    with pytest.raises(ValueError, match="one value per channel"):
        norms.evonorm_b0(x[:1, :1, :1], st, s, b, v, train=True)
    with pytest.raises(ValueError, match="no spatial axis"):
        norms.evonorm_s0(x[:, 0, 0], s, b, v)


def test_b0_unbiased_running_var_stores_n_over_n_minus_1_times_var_b():
    x, s, b, v = data()
    mask = np.random.default_rng(6).random((4, 3, 5, 1)) < 0.7
    st = norms.BatchNormState(jnp.zeros(6), jnp.full(6, 2.0), jnp.asarray(1))
    y, new = norms.evonorm_b0(
        x, st, s, b, v, train=True, momentum=0.8, mask=mask, unbiased_running_var=True
    )
    ref, var_b = ref_b0(x, s, b, v, mask=mask)
    n = np.broadcast_to(mask, x.shape).sum(axis=(0, 1, 2)).astype(np.float64)
    np.testing.assert_allclose(new.var, 0.8 * 2.0 + 0.2 * var_b * n / (n - 1), rtol=1e-5)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)  # normalized with biased var_B
    _, biased = norms.evonorm_b0(x, st, s, b, v, train=True, momentum=0.8, mask=mask)
    np.testing.assert_allclose(biased.var, 0.8 * 2.0 + 0.2 * var_b, rtol=1e-5)


def test_s0_mask_excludes_values_and_whole_examples_pass_through():
    x, s, b, v = data((4, 3, 5, 8))
    mask = np.random.default_rng(7).random((4, 3, 5, 1)) < 0.6
    mask[:, 0, 0] = True
    y = norms.evonorm_s0(x, s, b, v, num_groups=4, mask=mask)
    np.testing.assert_allclose(y, ref_s0(x, s, b, v, 4, mask=mask), rtol=1e-5, atol=1e-5)
    rows = np.array([True, False, True, True])[:, None, None, None]
    y_rows = np.asarray(norms.evonorm_s0(x, s, b, v, num_groups=4, mask=rows))
    y_all = np.asarray(norms.evonorm_s0(x, s, b, v, num_groups=4))
    keep = rows[:, 0, 0, 0]  # equal up to the masked sum's rounding
    np.testing.assert_allclose(y_rows[keep], y_all[keep], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y_rows[1], ref_s0(x, s, b, v, 4, mask=rows)[1], rtol=1e-5)
    assert np.isfinite(y_rows).all()
