"""norms.moments against float64 numpy: stability, masks, and one-collective cross-device merge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from norms import moments


def ref_moments(x, axes, mask=None):
    x = np.asarray(x, np.float64)
    m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
    count = m.sum(axis=axes)
    mean = np.where(m, x, 0).sum(axis=axes) / np.maximum(count, 1)
    keep = np.expand_dims(mean, axes)
    var = np.where(m, (x - keep) ** 2, 0).sum(axis=axes) / np.maximum(count, 1)
    return mean, var, count


def test_matches_float64_on_large_mean_small_std():
    x = np.random.default_rng(0).normal(1e3, 1e-2, (16, 4, 4, 8)).astype(np.float32)
    mean, var, count = moments(jnp.asarray(x), (0, 1, 2))
    rm, rv, rc = ref_moments(x, (0, 1, 2))
    np.testing.assert_allclose(mean, rm, rtol=1e-6)
    np.testing.assert_allclose(var, rv, rtol=5e-2)
    np.testing.assert_array_equal(count, rc)
    assert (np.asarray(var) > 0).all()


def test_masked_statistics_ignore_masked_values():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 3, 5)).astype(np.float32)
    mask = rng.random((6, 1, 1)) < 0.5
    mask[0] = True
    x_poisoned = np.where(mask, x, 1e6).astype(np.float32)
    mean, var, count = moments(x_poisoned, (0, 1), mask=mask)
    rm, rv, rc = ref_moments(x, (0, 1), mask)
    np.testing.assert_allclose(mean, rm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, rv, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(count, rc)


def test_bf16_input_gives_float32_statistics():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(8, 4)), jnp.bfloat16)
    mean, var, _ = moments(x, 0)
    assert mean.dtype == jnp.float32 and var.dtype == jnp.float32
    rm, rv, _ = ref_moments(np.asarray(x.astype(jnp.float32)), 0)
    np.testing.assert_allclose(var, rv, rtol=1e-5)


def test_pmap_uneven_masks_equal_one_big_batch():
    rng = np.random.default_rng(3)
    x = rng.normal(5.0, 2.0, (8, 4, 3, 3, 5)).astype(np.float32)
    mask = rng.random((8, 4, 1, 1, 1)) < 0.6
    mask[:, 0] = True
    f = jax.pmap(lambda x, m: moments(x, (0, 1, 2), axis_name="d", mask=m), axis_name="d")
    mean, var, count = f(x, mask)
    flat_x = x.reshape(32, 3, 3, 5)
    flat_m = mask.reshape(32, 1, 1, 1)
    rm, rv, rc = ref_moments(flat_x, (0, 1, 2), flat_m)
    for d in range(8):
        np.testing.assert_allclose(mean[d], rm, rtol=1e-5)
        np.testing.assert_allclose(var[d], rv, rtol=1e-5)
        np.testing.assert_array_equal(count[d], rc)


def test_one_collective_per_call():
    f = jax.pmap(lambda x: moments(x, (0, 1), axis_name="d"), axis_name="d")
    hlo = f.lower(jnp.ones((8, 4, 2, 3))).as_text()
    collectives = [
        op
        for op in ("all_gather", "all_reduce", "reduce_scatter", "all_to_all")
        for _ in range(hlo.count(f'stablehlo.{op}"'))
    ]
    assert collectives == ["all_gather"]


def test_axis_index_groups_give_per_group_statistics():
    x = np.arange(8 * 2 * 3, dtype=np.float32).reshape(8, 2, 3) ** 1.5
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    f = jax.pmap(lambda x: moments(x, 0, axis_name="d", axis_index_groups=groups), axis_name="d")
    mean, var, _ = f(x)
    rm0, rv0, _ = ref_moments(x[:4].reshape(8, 3), 0)
    rm1, rv1, _ = ref_moments(x[4:].reshape(8, 3), 0)
    np.testing.assert_allclose(mean[0], rm0, rtol=1e-6)
    np.testing.assert_allclose(var[3], rv0, rtol=1e-5)
    np.testing.assert_allclose(mean[5], rm1, rtol=1e-6)
    np.testing.assert_allclose(var[7], rv1, rtol=1e-5)


def test_unbound_axis_name_error_names_the_axis():
    with pytest.raises(ValueError, match="axis_name='batch'.*pmap"):
        moments(jnp.ones((4, 3)), 0, axis_name="batch")


def test_bad_mask_shape_error_names_shapes():
    with pytest.raises(ValueError, match=r"\(3,\).*\(4, 2\)"):
        moments(jnp.ones((4, 2)), 0, mask=jnp.ones((3,), bool))


def test_constant_input_gives_finite_gradient():
    g = jax.grad(lambda x: jnp.sum(jax.lax.rsqrt(moments(x, 0)[1] + 1e-5)))(jnp.ones((4, 3)))
    assert np.isfinite(np.asarray(g)).all()
