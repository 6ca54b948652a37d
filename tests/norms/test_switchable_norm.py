"""switchable_norm against float64 numpy written from Luo et al. (2019), plus its limits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import norms
from tests.norms.numpy_refs import assert_grads_match


def softmax(z):
    e = np.exp(np.asarray(z, np.float64) - np.max(z))
    return e / e.sum()


def ref_switchable(x, scale, bias, ml, vl, run_mean=None, run_var=None, eps=1e-5, mask=None):
    """Each branch's moments computed directly from x (not derived from one another)."""
    x = np.asarray(x, np.float64)
    m = np.ones(x.shape) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)

    def mom(axes):
        cnt = np.maximum(m.sum(axis=axes, keepdims=True), 1)
        mu = (x * m).sum(axis=axes, keepdims=True) / cnt
        return mu, (((x - mu) ** 2) * m).sum(axis=axes, keepdims=True) / cnt

    spatial = tuple(range(1, x.ndim - 1))
    mu_in, var_in = mom(spatial)
    mu_ln, var_ln = mom(tuple(range(1, x.ndim)))
    if run_mean is None:
        mu_bn, var_bn = mom(tuple(range(x.ndim - 1)))
    else:
        mu_bn, var_bn = np.asarray(run_mean, np.float64), np.asarray(run_var, np.float64)
    w, wv = softmax(ml), softmax(vl)
    mu = w[0] * mu_in + w[1] * mu_ln + w[2] * mu_bn
    var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
    y = (x - mu) / np.sqrt(var + eps) * np.asarray(scale, np.float64) + np.asarray(bias)
    return y, mu_bn.reshape(-1), var_bn.reshape(-1)


def data(shape=(4, 3, 5, 6), loc=0.5, std=2.0, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = rng.normal(loc, std, shape).astype(np.float32)
    # Per-example and per-channel offsets so the three branches really differ.
    x = x + rng.normal(0, 1, (shape[0],) + (1,) * (len(shape) - 2) + (c,)).astype(np.float32)
    s = rng.normal(1.0, 0.3, c).astype(np.float32)
    b = rng.normal(0.0, 0.3, c).astype(np.float32)
    ml = rng.normal(0, 1, 3).astype(np.float32)
    vl = rng.normal(0, 1, 3).astype(np.float32)
    return x, s, b, ml, vl


def test_train_output_and_running_update_match_paper_formula():
    x, s, b, ml, vl = data()
    st = norms.init_batch_norm_state(6)
    y, new = norms.switchable_norm(x, st, s, b, ml, vl, train=True, momentum=0.8)
    ref, mu_bn, var_bn = ref_switchable(x, s, b, ml, vl)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.mean, 0.2 * mu_bn, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.var, 0.8 + 0.2 * var_bn, rtol=1e-5)
    assert int(new.count) == 1
    # The BN branch's batch moments, for PreciseBN.
    _, _, bm = norms.switchable_norm(x, st, s, b, ml, vl, train=True, return_batch_stats=True)
    np.testing.assert_allclose(bm.mean, mu_bn, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bm.var, var_bn, rtol=1e-5)
    np.testing.assert_array_equal(bm.count, 4 * 3 * 5)


def test_eval_uses_running_statistics_for_the_bn_branch():
    x, s, b, ml, vl = data()
    rng = np.random.default_rng(3)
    st = norms.BatchNormState(
        jnp.asarray(rng.normal(size=6), jnp.float32),
        jnp.asarray(rng.uniform(0.5, 2, 6), jnp.float32),
        jnp.asarray(5, jnp.int32),
    )
    y, new = norms.switchable_norm(x, st, s, b, ml, vl, train=False)
    ref, _, _ = ref_switchable(x, s, b, ml, vl, st.mean, st.var)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert new is st
    assert (
        norms.switchable_norm(x, st, s, b, ml, vl, train=False, return_batch_stats=True)[2] is None
    )


def test_extreme_logits_reduce_to_instance_layer_and_batch_norm():
    x, s, b, _, _ = data()
    st = norms.init_batch_norm_state(6)
    for k, expected in (
        (0, norms.instance_norm(x, s, b)),
        (1, norms.layer_norm(x, s, b)),
        (2, norms.batch_norm(x, st, s, b, train=True)[0]),
    ):
        logits = np.full(3, -40.0, np.float32)
        logits[k] = 40.0
        y, _ = norms.switchable_norm(x, st, s, b, logits, logits, train=True)
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_gradients_match_finite_differences():
    x, s, b, ml, vl = data((3, 2, 2, 3))
    st = norms.init_batch_norm_state(3)
    assert_grads_match(
        lambda *a: norms.switchable_norm(a[0], st, *a[1:], train=True)[0],
        lambda *a: ref_switchable(*a)[0],
        (x, s, b, ml, vl),
    )


def test_mask_and_large_mean_small_std():
    x, s, b, ml, vl = data(loc=1e3, std=1e-2)
    x = (1e3 + (x - x.mean()) * 1e-2).astype(np.float32)
    mask = np.ones((4, 3, 5, 1), bool)
    mask[:, :, 3:] = False
    poisoned = np.where(mask, x, -1e4).astype(np.float32)
    st = norms.init_batch_norm_state(6)
    y, new = norms.switchable_norm(poisoned, st, s, b, ml, vl, train=True, mask=mask)
    ref, mu_bn, var_bn = ref_switchable(x, s, b, ml, vl, mask=mask)
    np.testing.assert_allclose(np.asarray(y)[:, :, :3], ref[:, :, :3], atol=5e-2)
    np.testing.assert_allclose(new.mean, 0.1 * mu_bn, rtol=1e-5)
    np.testing.assert_allclose(new.var, 0.9 + 0.1 * var_bn, rtol=1e-5)


def test_pmap_uneven_masks_equal_one_big_batch_with_one_collective():
    rng = np.random.default_rng(5)
    x = rng.normal(1.0, 2.0, (8, 2, 3, 3, 4)).astype(np.float32)
    mask = rng.random((8, 2, 1, 1, 1)) < 0.6
    mask[:, 0] = True
    _, s, b, ml, vl = data((2, 3, 3, 4))
    st = norms.init_batch_norm_state(4)

    def step(x, m):
        return norms.switchable_norm(x, st, s, b, ml, vl, train=True, axis_name="d", mask=m)

    f = jax.pmap(step, axis_name="d")
    y, new = f(x, mask)
    ref, mu_bn, var_bn = ref_switchable(
        x.reshape(16, 3, 3, 4), s, b, ml, vl, mask=mask.reshape(16, 1, 1, 1)
    )
    keep = mask.reshape(16)
    np.testing.assert_allclose(np.asarray(y).reshape(16, 3, 3, 4)[keep], ref[keep], atol=1e-4)
    for d in range(8):
        np.testing.assert_allclose(new.var[d], 0.9 + 0.1 * var_bn, rtol=1e-5)
    hlo = f.lower(x, mask).as_text()
    assert hlo.count('stablehlo.all_gather"') == 1
    assert hlo.count('stablehlo.all_reduce"') == 0


def test_constant_input_gives_finite_output_and_gradient():
    _, s, b, ml, vl = data()
    x = jnp.full((4, 3, 5, 6), 3.0)
    st = norms.init_batch_norm_state(6)

    def loss(x, s, ml, vl):
        y, _ = norms.switchable_norm(x, st, s, b, ml, vl, train=True)
        return jnp.sum(y**2 + y)

    y, _ = norms.switchable_norm(x, st, s, b, ml, vl, train=True)
    # x - mean is float32 rounding (~1e-7) times rsqrt(eps) ~ 316.
    np.testing.assert_allclose(y, np.broadcast_to(b, y.shape), atol=1e-3)
    for g in jax.jit(jax.grad(loss, (0, 1, 2, 3)))(x, s, ml, vl):
        assert np.isfinite(np.asarray(g)).all()


def test_errors():
    x, s, b, ml, vl = data()
    st = norms.init_batch_norm_state(6)
    with pytest.raises(ValueError, match=r"mean_logits has shape \(2,\)"):
        norms.switchable_norm(x, st, s, b, ml[:2], vl, train=True)
    with pytest.raises(ValueError, match=r"state.mean has shape \(5,\)"):
        norms.switchable_norm(x, norms.init_batch_norm_state(5), s, b, ml, vl, train=True)
    with pytest.raises(ValueError, match=r"scale has shape \(5,\)"):
        norms.switchable_norm(x, st, s[:5], b, ml, vl, train=True)
    with pytest.raises(ValueError, match="no spatial axis"):
        norms.switchable_norm(x[:, 0, 0], st, s, b, ml, vl, train=True)
    with pytest.raises(ValueError, match="axis_name='nope'"):
        norms.switchable_norm(x, st, s, b, ml, vl, train=True, axis_name="nope")


def test_eval_ignores_axis_name_so_sync_layers_init_outside_pmap():
    # axis_name only matters for batch statistics; eval (and flax init) run anywhere.
    x, s, b, ml, vl = data()
    st = norms.init_batch_norm_state(6)._replace(count=jnp.ones((), jnp.int32))
    y, _ = norms.switchable_norm(x, st, s, b, ml, vl, train=False, axis_name="batch")
    y0, _ = norms.switchable_norm(x, st, s, b, ml, vl, train=False)
    np.testing.assert_array_equal(y, y0)
