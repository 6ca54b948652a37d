"""filter_response_norm (+TLU) against float64 numpy written from Singh & Krishnan (2020)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from norms import filter_response_norm
from tests.norms.numpy_refs import assert_grads_match


def ref_frn(x, scale, bias, tau=None, eps=1e-6, learned_eps=None, mask=None):
    """nu2 = mean_{H,W} x^2; y = scale * x / sqrt(nu2 + |eps|) + bias; z = max(y, tau).

    With ``mask`` the mean is over the True values only (0 when there are none).
    """
    x = np.asarray(x, np.float64)
    axes = tuple(range(1, x.ndim - 1))
    m = np.ones(x.shape) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
    nu2 = (m * x**2).sum(axis=axes, keepdims=True) / np.maximum(m.sum(axis=axes, keepdims=True), 1)
    e = abs(eps) if learned_eps is None else abs(eps) + np.abs(learned_eps)
    y = np.asarray(scale, np.float64) * x / np.sqrt(nu2 + e) + np.asarray(bias, np.float64)
    return y if tau is None else np.maximum(y, tau)


def data(shape=(3, 4, 5, 6), loc=0.5, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = rng.normal(loc, 2.0, shape).astype(np.float32)
    scale = rng.normal(1.0, 0.3, c).astype(np.float32)
    bias = rng.normal(0.0, 0.3, c).astype(np.float32)
    tau = rng.normal(0.0, 0.3, c).astype(np.float32)
    return x, scale, bias, tau


def test_matches_paper_formula_with_and_without_tlu():
    x, s, b, t = data()
    np.testing.assert_allclose(filter_response_norm(x, s, b), ref_frn(x, s, b), atol=1e-5)
    np.testing.assert_allclose(
        filter_response_norm(x, s, b, t), ref_frn(x, s, b, t), rtol=1e-5, atol=1e-5
    )


def test_no_mean_subtraction():
    # A shifted input is not centred: its output keeps a nonzero spatial mean.
    x = np.random.default_rng(1).normal(5.0, 1.0, (2, 4, 4, 3)).astype(np.float32)
    y = np.asarray(filter_response_norm(x))
    assert (y.mean(axis=(1, 2)) > 0.9).all()
    np.testing.assert_allclose(np.mean(y.astype(np.float64) ** 2, axis=(1, 2)), 1.0, rtol=1e-4)


def test_learned_eps_and_one_by_one_inputs():
    x, s, b, t = data((4, 1, 1, 6))
    le = np.full(6, 1e-4, np.float32)
    y = filter_response_norm(x, s, b, t, learned_eps=le)
    np.testing.assert_allclose(y, ref_frn(x, s, b, t, learned_eps=le), rtol=1e-5, atol=1e-5)
    # Without spatial axes at all, nu2 is x^2.
    y2 = filter_response_norm(x[:, 0, 0], s, b, t, learned_eps=np.float32(1e-2))
    np.testing.assert_allclose(y2, ref_frn(x, s, b, t, learned_eps=1e-2)[:, 0, 0], atol=1e-5)


def test_channel_axis_keyword():
    x, s, b, t = data()
    y = filter_response_norm(np.moveaxis(x, -1, 1), s, b, t, axis=1)
    np.testing.assert_allclose(np.moveaxis(np.asarray(y), 1, -1), ref_frn(x, s, b, t), atol=1e-5)


def test_gradients_match_finite_differences():
    x, s, b, t = data((2, 3, 2, 3))
    assert_grads_match(
        lambda x, s, b, t: filter_response_norm(x, s, b, t),
        lambda x, s, b, t: ref_frn(x, s, b, t),
        (x, s, b, t),
    )
    le = np.full(3, 0.05, np.float32)
    assert_grads_match(
        lambda x, le: filter_response_norm(x, s, b, learned_eps=le),
        lambda x, le: ref_frn(x, s, b, learned_eps=le),
        (x[:, :1, :1], le),
    )


def test_batch_independence():
    x, s, b, t = data()
    other = x.copy()
    other[1:] *= -7.0
    np.testing.assert_allclose(
        filter_response_norm(x, s, b, t)[0], filter_response_norm(other, s, b, t)[0], atol=1e-6
    )


def test_large_mean_small_std_and_zero_input():
    x, s, b, t = data(loc=1e3)
    x = (1e3 + (x - 0.5) * 5e-3).astype(np.float32)
    np.testing.assert_allclose(filter_response_norm(x, s, b, t), ref_frn(x, s, b, t), atol=5e-2)
    z = jnp.zeros((2, 3, 3, 6))
    y = filter_response_norm(z, s, b, t)
    np.testing.assert_allclose(y, np.maximum(b, t) * np.ones((2, 3, 3, 1)), atol=1e-6)
    loss = lambda z, s, t: jnp.sum(filter_response_norm(z, s, b, t) ** 2)
    grads = jax.jit(jax.grad(loss, (0, 1, 2)))(z, s, t)
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()


def test_errors_name_the_shapes():
    x, s, b, _ = data()
    with pytest.raises(ValueError, match=r"tau has shape \(\).*\(6,\)"):
        filter_response_norm(x, s, b, jnp.zeros(()))
    with pytest.raises(ValueError, match=r"scale has shape \(4,\).*\(6,\)"):
        filter_response_norm(x, jnp.ones(4))
    with pytest.raises(ValueError, match=r"learned_eps has shape \(2,\)"):
        filter_response_norm(x, learned_eps=jnp.ones(2))


def test_mask_excludes_values_from_nu2_and_whole_examples_pass_through():
    x, s, b, tau = data()
    mask = np.random.default_rng(5).random(x.shape[:-1] + (1,)) < 0.6  # per position
    mask[:, 0, 0] = True
    y = filter_response_norm(x, s, b, tau, mask=mask)
    np.testing.assert_allclose(y, ref_frn(x, s, b, tau, mask=mask), rtol=1e-5, atol=1e-5)
    # nu2 is per example: masking example 1 leaves the others' outputs alone,
    # and its own outputs stay finite (nu2 = 0 there).
    rows = np.ones((x.shape[0], 1, 1, 1), bool)
    rows[1] = False
    y_rows = np.asarray(filter_response_norm(x, s, b, tau, mask=rows))
    y_all = np.asarray(filter_response_norm(x, s, b, tau))
    keep = rows[:, 0, 0, 0]  # equal up to the masked sum's rounding
    np.testing.assert_allclose(y_rows[keep], y_all[keep], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y_rows[1], ref_frn(x, s, b, tau, mask=rows)[1], rtol=1e-5)
    assert np.isfinite(y_rows).all()
