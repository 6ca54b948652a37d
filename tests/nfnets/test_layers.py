"""WSConv2D / StdConv2D / SqueezeExcite / StochasticDepth / helpers vs float64 numpy."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import layers


def _effective_kernel(module, params, in_ch, kh=3, kw=3):
    """The kernel a VALID conv applies, recovered as d out / d x on a kh x kw input."""
    x = jnp.zeros((1, kh, kw, in_ch), jnp.float32)
    jac = jax.jit(jax.jacobian(lambda x: module.apply({"params": params}, x)[0, 0, 0]))(x)
    # jac: (O, 1, kh, kw, I) -> HWIO
    return np.transpose(np.asarray(jac, np.float64)[:, 0], (1, 2, 3, 0))


def _np_scaled_ws(w, gain, eps=1e-4):
    w = np.asarray(w, np.float64)
    fan_in = np.prod(w.shape[:-1])
    mean = w.mean(axis=(0, 1, 2), keepdims=True)
    var = w.var(axis=(0, 1, 2), keepdims=True)
    return np.asarray(gain, np.float64) * (w - mean) / np.sqrt(np.maximum(var * fan_in, eps))


def test_ws_conv_kernel_mean_zero_var_one_over_fan_in():
    module = layers.WSConv2D(6, 3, padding="VALID", use_bias=False)
    params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 3, 3, 5)))["params"]
    gain = jax.random.uniform(jax.random.key(1), (6,), minval=0.5, maxval=2.0)
    params = {**params, "gain": gain, "kernel": params["kernel"] * 3.0 + 0.7}
    w_hat = _effective_kernel(module, params, 5)
    fan_in = 3 * 3 * 5
    gain = np.asarray(gain, np.float64)
    np.testing.assert_allclose(w_hat.mean(axis=(0, 1, 2)), 0.0, atol=1e-6)
    np.testing.assert_allclose(w_hat.var(axis=(0, 1, 2)), gain**2 / fan_in, rtol=1e-4)
    np.testing.assert_allclose(w_hat, _np_scaled_ws(params["kernel"], gain), rtol=1e-4, atol=1e-6)


def test_ws_conv_params_and_init():
    module = layers.WSConv2D(8, (3, 1))
    params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 5, 5, 4)))["params"]
    assert params["kernel"].shape == (3, 1, 4, 8)
    np.testing.assert_array_equal(params["gain"], np.ones(8))
    np.testing.assert_array_equal(params["bias"], np.zeros(8))
    # variance_scaling(1, fan_in, normal): std 1/sqrt(fan_in) before standardization.
    big = jax.jit(layers.WSConv2D(256, 3).init)(jax.random.key(1), jnp.zeros((1, 3, 3, 64)))[
        "params"
    ]
    np.testing.assert_allclose(np.std(big["kernel"]), 1 / math.sqrt(9 * 64), rtol=0.02)


def test_grouped_ws_conv_uses_per_group_fan_in():
    groups, in_ch, out_ch = 4, 8, 12
    module = layers.WSConv2D(out_ch, 3, padding="VALID", feature_group_count=groups)
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, in_ch))
    params = jax.jit(module.init)(jax.random.key(1), x)["params"]
    params = {**params, "bias": jnp.arange(out_ch, dtype=jnp.float32) * 0.1}
    kernel = np.asarray(params["kernel"], np.float64)
    assert kernel.shape == (3, 3, in_ch // groups, out_ch)
    w_hat = _np_scaled_ws(kernel, np.ones(out_ch))
    np.testing.assert_allclose(w_hat.var(axis=(0, 1, 2)), 1 / (9 * in_ch // groups), rtol=1e-9)
    # float64 grouped VALID conv written out directly.
    xn = np.asarray(x, np.float64)
    ref = np.zeros((2, 3, 3, out_ch))
    ig, og = in_ch // groups, out_ch // groups
    for o in range(out_ch):
        g = o // og
        for i in range(3):
            for j in range(3):
                patch = xn[:, i : i + 3, j : j + 3, g * ig : (g + 1) * ig]
                ref[:, i, j, o] = np.einsum("nhwc,hwc->n", patch, w_hat[..., o])
    ref += np.asarray(params["bias"], np.float64)
    got = jax.jit(module.apply)({"params": params}, x)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-5)


def test_ws_conv_constant_kernel_is_finite_with_gradients():
    module = layers.WSConv2D(4, 3)
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    params = jax.jit(module.init)(jax.random.key(1), x)["params"]
    params = {**params, "kernel": jnp.full_like(params["kernel"], 0.3)}

    def loss(p, x):
        return jnp.sum(module.apply({"params": p}, x) ** 2)

    value, (gp, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
    assert np.isfinite(float(value))
    for leaf in jax.tree.leaves((gp, gx)):
        assert np.all(np.isfinite(np.asarray(leaf)))
    # var = 0 => w_hat = 0 up to float32 rounding of the mean (eps inside max): the
    # output is the bias.
    y = jax.jit(module.apply)({"params": params}, x)
    np.testing.assert_allclose(np.asarray(y), 0.0, atol=1e-3)


def test_ws_conv_bf16_compute_keeps_f32_params_and_statistics():
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 8))
    f32 = layers.WSConv2D(16, 3)
    bf16 = layers.WSConv2D(16, 3, dtype=jnp.bfloat16)
    params = jax.jit(f32.init)(jax.random.key(1), x)["params"]
    assert all(
        p.dtype == jnp.float32
        for p in jax.tree.leaves(jax.eval_shape(bf16.init, jax.random.key(1), x))
    )
    # Raw kernel with a large offset: bf16 statistics would lose it entirely.
    params = {**params, "kernel": params["kernel"] + 100.0}
    y32 = jax.jit(f32.apply)({"params": params}, x)
    y16 = jax.jit(bf16.apply)({"params": params}, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y32), atol=0.1, rtol=0.05)


def test_ws_conv_group_errors_name_numbers():
    with pytest.raises(ValueError, match="3 does not divide the 8 input"):
        jax.jit(layers.WSConv2D(6, feature_group_count=3).init)(
            jax.random.key(0), jnp.zeros((1, 4, 4, 8))
        )


def test_std_conv_kernel_is_standardized():
    module = layers.StdConv2D(5, 3, padding="VALID")
    params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 3, 3, 4)))["params"]
    params = {**params, "kernel": params["kernel"] * 0.1 - 1.0}
    w_hat = _effective_kernel(module, params, 4)
    w = np.asarray(params["kernel"], np.float64)
    var = w.var(axis=(0, 1, 2))
    np.testing.assert_allclose(w_hat.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(w_hat.var(axis=(0, 1, 2)), var / (var + 1e-5), rtol=1e-3)


def test_squeeze_excite_matches_numpy():
    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 10))
    module = layers.SqueezeExcite(0.5)
    params = jax.jit(module.init)(jax.random.key(1), x)["params"]
    assert params["fc0"]["kernel"].shape == (10, 5) and params["fc0"]["bias"].shape == (5,)
    assert params["fc1"]["kernel"].shape == (5, 10) and params["fc1"]["bias"].shape == (10,)
    params = jax.tree.map(lambda p: p + 0.1, params)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = np.asarray(x, np.float64).mean(axis=(1, 2))
    h = np.maximum(h @ p["fc0"]["kernel"] + p["fc0"]["bias"], 0)
    h = 1 / (1 + np.exp(-(h @ p["fc1"]["kernel"] + p["fc1"]["bias"])))
    got = jax.jit(module.apply)({"params": params}, x)
    assert got.shape == (3, 1, 1, 10)
    np.testing.assert_allclose(np.asarray(got)[:, 0, 0], h, rtol=1e-5)
    # int(ratio * C) hidden units, at least one.
    small = jax.jit(layers.SqueezeExcite(0.25).init)(jax.random.key(0), jnp.zeros((1, 2, 2, 3)))
    assert small["params"]["fc0"]["kernel"].shape == (3, 1)


@pytest.mark.parametrize("scale_by_keep", [False, True])
def test_stochastic_depth(scale_by_keep):
    module = layers.StochasticDepth(0.3, scale_by_keep=scale_by_keep)
    x = jnp.ones((4000, 2, 2, 3))
    assert module.apply({}, x, train=False) is x
    apply = jax.jit(lambda x, key: module.apply({}, x, train=True, rngs={"dropout": key}))
    y = np.asarray(apply(x, jax.random.key(0)))
    kept_value = 1 / 0.7 if scale_by_keep else 1.0
    per_example = y.reshape(4000, -1)
    # Whole examples are dropped or kept.
    assert np.all((per_example == 0).all(1) | np.isclose(per_example, kept_value).all(1))
    kept = np.isclose(per_example[:, 0], kept_value).mean()
    assert abs(kept - 0.7) < 4 * math.sqrt(0.21 / 4000)


def test_nf_betas_follow_expected_std_with_reset():
    alpha = 0.3
    got = layers.nf_betas((2, 3, 1), alpha)
    a2 = alpha**2
    # Within a stage block j > 0 sees 1 + j alpha^2; a stage's first block sees what
    # the previous stage ended with.
    expected = [1.0, 1 / math.sqrt(1 + a2)]
    expected += [1 / math.sqrt(1 + 2 * a2), 1 / math.sqrt(1 + a2), 1 / math.sqrt(1 + 2 * a2)]
    expected += [1 / math.sqrt(1 + 3 * a2)]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_nf_block_plan():
    plan = layers.nf_block_plan((2, 1, 3), alpha=0.3, stochastic_depth=0.6)
    assert [(p.stage, p.block, p.stride) for p in plan] == [
        (0, 0, 1), (0, 1, 1), (1, 0, 2), (2, 0, 2), (2, 1, 1), (2, 2, 1),
    ]  # fmt: skip
    np.testing.assert_allclose([p.drop_rate for p in plan], [0.6 * i / 6 for i in range(6)])
    assert [p.beta for p in plan] == layers.nf_betas((2, 1, 3), 0.3)


def test_check_image_messages():
    with pytest.raises(ValueError, match="minimum image size is 32x32"):
        layers.check_image(jnp.zeros((1, 16, 40, 3)), 32, "M")
    with pytest.raises(ValueError, match="NHWC"):
        layers.check_image(jnp.zeros((16, 16, 3)), 8, "M")
    layers.check_image(jnp.zeros((1, 32, 32, 3)), 32, "M")


def test_check_stages_and_total_stride():
    layers.check_stages("M", (8, 16), (1, 2))
    with pytest.raises(ValueError, match=r"M: widths \(8, 16\) and depths \(1,\) must"):
        layers.check_stages("M", (8, 16), (1,))
    with pytest.raises(ValueError, match="at most 4 stages, got 5"):
        layers.check_stages("M", (8,) * 5, (1,) * 5)
    with pytest.raises(ValueError, match=r"depth must be >= 1, got \(1, 0\)"):
        layers.check_stages("M", (8, 16), (1, 0))
    assert layers.total_stride(4, 4) == 4 * 2 * 2 * 2
    assert layers.total_stride(1, 2) == 2
    assert layers.total_stride(2, 0) == 2


class _Tail(layers.NFBlock):
    @nn.compact
    def __call__(self, shortcut, f, *, train):
        return self.residual_output(shortcut, f, train=train)


@pytest.mark.parametrize("se_ratio", [0.0, 0.5])
def test_nf_block_residual_output_params_sows_and_formula(se_ratio):
    shortcut = jax.random.normal(jax.random.key(0), (2, 3, 3, 4))
    f = jax.random.normal(jax.random.key(1), (2, 3, 3, 4))
    module = _Tail(
        features=4, mid=4, stride=1, beta=1.0, alpha=0.3, se_ratio=se_ratio,
        stochastic_depth=0.0, activation="relu",
    )  # fmt: skip
    params = module.init(jax.random.key(2), shortcut, f, train=False)["params"]
    assert set(params) == ({"se", "skip_gain"} if se_ratio else {"skip_gain"})
    assert params["skip_gain"].shape == () and float(params["skip_gain"]) == 0.0
    params = {**params, "skip_gain": jnp.asarray(1.7, jnp.float32)}
    out, state = module.apply(
        {"params": params}, shortcut, f, train=False, mutable=["intermediates"]
    )
    branch = np.asarray(f, np.float64)
    if se_ratio:
        p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["se"])
        pooled = branch.mean(axis=(1, 2))
        hidden = np.maximum(pooled @ p["fc0"]["kernel"] + p["fc0"]["bias"], 0)
        gate = 1 / (1 + np.exp(-(hidden @ p["fc1"]["kernel"] + p["fc1"]["bias"])))
        branch = 2 * gate[:, None, None, :] * branch
    expected = np.asarray(shortcut, np.float64) + 0.3 * 1.7 * branch
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(state["intermediates"]["branch_out"][0]), branch, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(state["intermediates"]["block_out"][0], out)


def test_ws_conv_matches_flax_conv_with_standardized_kernel():
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 3))
    module = layers.WSConv2D(4, 3, strides=2)
    params = jax.jit(module.init)(jax.random.key(1), x)["params"]
    w_hat = _np_scaled_ws(params["kernel"], np.asarray(params["gain"])).astype(np.float32)
    ref = nn.Conv(4, (3, 3), strides=2, padding="SAME").apply(
        {"params": {"kernel": w_hat, "bias": params["bias"]}}, x
    )
    got = jax.jit(module.apply)({"params": params}, x)
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5)
