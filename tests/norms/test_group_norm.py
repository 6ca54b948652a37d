"""group_norm / layer_norm / instance_norm against float64 numpy (Wu & He, 2018) and flax.linen."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from norms import group_norm, instance_norm, layer_norm
from tests.norms.numpy_refs import assert_grads_match


def ref_group_norm(x, scale, bias, groups, eps=1e-5, mask=None):
    """Paper formula on NHWC float64: per (n, g) over (H, W, C/G), biased variance."""
    x = np.asarray(x, np.float64)
    n, *spatial, c = x.shape
    xg = x.reshape(n, *spatial, groups, c // groups)
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    if mask is None:
        m = np.ones_like(xg)
    else:
        m = np.broadcast_to(mask, x.shape).reshape(xg.shape).astype(np.float64)
    cnt = m.sum(axis=axes, keepdims=True)
    mean = (xg * m).sum(axis=axes, keepdims=True) / cnt
    var = ((xg - mean) ** 2 * m).sum(axis=axes, keepdims=True) / cnt
    y = ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape)
    if scale is not None:
        y = y * np.asarray(scale, np.float64)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y


def data(shape=(3, 4, 5, 8), loc=0.5, std=2.0, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(loc, std, shape).astype(np.float32)
    c = shape[-1]
    scale = rng.normal(1.0, 0.3, c).astype(np.float32)
    bias = rng.normal(0.0, 0.3, c).astype(np.float32)
    return x, scale, bias


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_group_norm_matches_paper_formula(groups):
    x, s, b = data()
    y = group_norm(x, s, b, num_groups=groups)
    np.testing.assert_allclose(y, ref_group_norm(x, s, b, groups), rtol=1e-5, atol=1e-5)


def test_group_size_is_channels_per_group_and_default_is_32_groups():
    x, s, b = data((2, 3, 3, 64))
    np.testing.assert_allclose(
        group_norm(x, s, b, group_size=16), ref_group_norm(x, s, b, 4), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(group_norm(x), ref_group_norm(x, None, None, 32), atol=1e-5)


def test_channel_axis_keyword_nchw():
    x, s, b = data()
    x_nchw = np.moveaxis(x, -1, 1)
    y = group_norm(x_nchw, s, b, num_groups=4, axis=1)
    np.testing.assert_allclose(
        np.moveaxis(np.asarray(y), 1, -1), ref_group_norm(x, s, b, 4), rtol=1e-5, atol=1e-5
    )
    y = layer_norm(x_nchw, s, b, axis=1)
    np.testing.assert_allclose(
        np.moveaxis(np.asarray(y), 1, -1), ref_group_norm(x, s, b, 1), rtol=1e-5, atol=1e-5
    )


def test_group_norm_gradients_match_finite_differences():
    x, s, b = data((2, 3, 2, 4))
    assert_grads_match(
        lambda x, s, b: group_norm(x, s, b, num_groups=2),
        lambda x, s, b: ref_group_norm(x, s, b, 2),
        (x, s, b),
    )


def test_layer_and_instance_norm_gradients_match_finite_differences():
    x, s, b = data((2, 3, 2, 3))
    assert_grads_match(layer_norm, lambda x, s, b: ref_group_norm(x, s, b, 1), (x, s, b))
    assert_grads_match(instance_norm, lambda x, s, b: ref_group_norm(x, s, b, 3), (x, s, b))


def test_masked_gradients_match_finite_differences():
    x, s, b = data((2, 3, 2, 4))
    mask = np.random.default_rng(4).random((2, 3, 2, 1)) < 0.6
    mask[:, 0, 0] = True
    assert_grads_match(
        lambda x, s, b: group_norm(x, s, b, num_groups=2, mask=mask),
        lambda x, s, b: ref_group_norm(x, s, b, 2, mask=mask),
        (x, s, b),
    )


def test_forward_mode_and_second_order_derivatives():
    # group_norm has a closed-form JVP; forward mode must agree with the float64
    # reference's directional derivative, and grad-of-grad must work.
    x, s, b = data((2, 3, 2, 4))
    rng = np.random.default_rng(5)
    dirs = [rng.normal(size=t.shape).astype(np.float32) for t in (x, s, b)]
    cot = rng.normal(size=x.shape)
    f = lambda x, s, b: jnp.sum(group_norm(x, s, b, num_groups=2) * cot)
    _, tangent = jax.jit(lambda p, t: jax.jvp(f, p, t))((x, s, b), tuple(dirs))
    h = 1e-6

    def ref(t):
        moved = [np.float64(p) + t * np.float64(d) for p, d in zip((x, s, b), dirs, strict=True)]
        return np.sum(ref_group_norm(*moved, 2) * cot)

    np.testing.assert_allclose(tangent, (ref(h) - ref(-h)) / (2 * h), rtol=1e-3)
    # Hessian-vector product vs central differences of the (reference-checked) gradient.
    grad_x = jax.jit(jax.grad(lambda x: f(x, s, b) ** 2))
    hvp = jax.jit(lambda x, v: jax.jvp(grad_x, (x,), (v,))[1])(x, dirs[0])
    e = 1e-2
    fd = (grad_x(x + e * dirs[0]) - grad_x(x - e * dirs[0])) / (2 * e)
    np.testing.assert_allclose(hvp, fd, rtol=2e-2, atol=2e-2 * float(jnp.abs(fd).max()))


def test_one_group_is_layer_norm_and_c_groups_is_instance_norm():
    x, s, b = data()
    np.testing.assert_allclose(
        group_norm(x, s, b, num_groups=1), layer_norm(x, s, b), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(
        group_norm(x, s, b, num_groups=8), instance_norm(x, s, b), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(layer_norm(x, s, b), ref_group_norm(x, s, b, 1), atol=1e-5)
    np.testing.assert_allclose(instance_norm(x, s, b), ref_group_norm(x, s, b, 8), atol=1e-5)


def test_parity_with_flax_group_norm_and_layer_norm():
    x, s, b = data()
    variables = {"params": {"scale": jnp.asarray(s), "bias": jnp.asarray(b)}}
    flax_gn = nn.GroupNorm(num_groups=4, epsilon=1e-5).apply(variables, x)
    np.testing.assert_allclose(group_norm(x, s, b, num_groups=4), flax_gn, rtol=1e-5, atol=1e-5)
    flax_ln = nn.LayerNorm(epsilon=1e-5, reduction_axes=(1, 2, 3), feature_axes=-1).apply(
        variables, x
    )
    np.testing.assert_allclose(layer_norm(x, s, b), flax_ln, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "fn",
    [lambda x: group_norm(x, num_groups=2), layer_norm, instance_norm],
    ids=["group", "layer", "instance"],
)
def test_batch_independence(fn):
    x, _, _ = data()
    other = x.copy()
    other[1:] = np.random.default_rng(9).normal(-3.0, 5.0, other[1:].shape)
    np.testing.assert_allclose(fn(x)[0], fn(other)[0], rtol=1e-6, atol=1e-6)
    # The gradient of example 0's output never reaches the other examples.
    g = jax.jit(jax.grad(lambda x: jnp.sum(fn(x)[0] ** 3)))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(g[1:]), 0.0)


def test_mask_excludes_padding_from_statistics():
    x, s, b = data((2, 4, 6, 4))
    mask = np.ones((2, 4, 6, 1), bool)
    mask[:, :, 4:] = False  # padded columns
    poisoned = np.where(mask, x, 1e4).astype(np.float32)
    y = group_norm(poisoned, s, b, num_groups=2, mask=mask)
    ref = ref_group_norm(x, s, b, 2, mask=mask)
    np.testing.assert_allclose(np.asarray(y)[:, :, :4], ref[:, :, :4], rtol=1e-4, atol=1e-4)
    # The same statistics as group-normalizing the unpadded input.
    np.testing.assert_allclose(
        np.asarray(y)[:, :, :4],
        group_norm(x[:, :, :4], s, b, num_groups=2),
        rtol=1e-4,
        atol=1e-4,
    )
    y_ln = layer_norm(poisoned, s, b, mask=mask)
    np.testing.assert_allclose(np.asarray(y_ln)[:, :, :4], layer_norm(x[:, :, :4], s, b), atol=1e-4)
    y_in = instance_norm(poisoned, s, b, mask=mask)
    np.testing.assert_allclose(
        np.asarray(y_in)[:, :, :4], instance_norm(x[:, :, :4], s, b), atol=1e-4
    )


def test_large_mean_small_std_is_accurate():
    x, s, b = data(loc=1e3, std=1e-2)
    for groups in (1, 4, 8):
        y = group_norm(x, s, b, num_groups=groups)
        assert np.isfinite(np.asarray(y)).all()
        np.testing.assert_allclose(y, ref_group_norm(x, s, b, groups), atol=5e-2)


def test_constant_input_gives_finite_output_and_gradient():
    x = jnp.full((2, 3, 3, 4), 7.0)
    s = jnp.ones(4)
    for fn in (lambda x, s: group_norm(x, s, num_groups=2), layer_norm, instance_norm):
        y = fn(x, s)
        np.testing.assert_allclose(y, 0.0, atol=1e-6)
        loss = lambda x, s, fn=fn: jnp.sum(fn(x, s) ** 2 + fn(x, s))
        gx, gs = jax.jit(jax.grad(loss, (0, 1)))(x, s)
        assert np.isfinite(np.asarray(gx)).all() and np.isfinite(np.asarray(gs)).all()


def test_bfloat16_input_keeps_dtype_with_float32_statistics():
    x, s, b = data(loc=100.0, std=1.0)
    xb = jnp.asarray(x, jnp.bfloat16)
    y = group_norm(xb, s, b, num_groups=4)
    assert y.dtype == jnp.bfloat16
    ref = ref_group_norm(np.asarray(xb.astype(jnp.float32)), s, b, 4)
    np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), ref, atol=5e-2)


def test_works_under_jit_and_vmap():
    x, s, b = data()
    f = jax.jit(lambda x: group_norm(x, s, b, num_groups=4))
    np.testing.assert_allclose(f(x), ref_group_norm(x, s, b, 4), atol=1e-5)
    # vmap over an outer axis of two independent batches.
    xs = np.stack([x, x[::-1]])
    ys = jax.vmap(lambda x: group_norm(x, s, b, num_groups=4))(xs)
    np.testing.assert_allclose(ys[1], ref_group_norm(x[::-1], s, b, 4), atol=1e-5)


def test_errors_name_the_bad_values():
    x, s, _ = data((2, 3, 3, 12))
    with pytest.raises(ValueError, match=r"num_groups=5 .*12 channels"):
        group_norm(x, num_groups=5)
    with pytest.raises(ValueError, match=r"group_size=5 .*12 channels"):
        group_norm(x, group_size=5)
    with pytest.raises(ValueError, match="exactly one"):
        group_norm(x, num_groups=3, group_size=4)
    with pytest.raises(ValueError, match=r"scale has shape \(8,\).*\(12,\)"):
        group_norm(x, jnp.ones(8), num_groups=3)
    with pytest.raises(ValueError, match=r"bias has shape \(\).*\(12,\)"):
        layer_norm(x, None, jnp.zeros(()))
    with pytest.raises(ValueError, match="batch axis"):
        layer_norm(x, axis=0)
    with pytest.raises(ValueError, match="no spatial axis"):
        instance_norm(x[:, 0, 0])
    with pytest.raises(ValueError, match="does not broadcast"):
        group_norm(x, num_groups=3, mask=np.ones((2, 5), bool))
