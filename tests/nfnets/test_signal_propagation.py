"""Signal propagation at init: NF-ResNet bookkeeping vs the expected_std recursion."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import signal_propagation as spp
from nfnets.registry import create_model

DEPTHS = (2, 3, 2)
TINY = {"depths": DEPTHS, "widths": (32, 64, 64), "stem_width": 16}


def expected_variance(depths, alpha):
    """Block-output variance from the NF recursion, written from Brock et al., 2021a, Sec. 3.

    expected_std starts at 1, is reset to 1 at each stage's transition block (its
    shortcut sees the re-normalized input), and grows to sqrt(std^2 + alpha^2) after
    every block: the k-th block of a stage outputs variance 1 + k * alpha^2.
    """
    out = []
    for depth in depths:
        var = 1.0
        for _ in range(depth):
            var += alpha**2
            out.append(var)
    return np.array(out)


@pytest.fixture(scope="module")
def nf_setup():
    images = jax.random.normal(jax.random.key(1), (8, 32, 32, 3), jnp.float32)
    model = create_model("nf_resnet26_small", num_classes=10, **TINY)
    variables = jax.jit(lambda k, x: model.init({"params": k}, x, train=False))(
        jax.random.key(0, impl="rbg"), images
    )
    return images, variables


@pytest.mark.slow
def test_nf_resnet_variance_follows_expected_std(nf_setup):
    images, variables = nf_setup
    model = create_model("nf_resnet26_small", num_classes=10, **TINY)
    res = spp.signal_propagation(model, variables, images, skipinit_gain=1.0)
    assert res["blocks"] == [f"stage{s}_block{b}" for s, d in enumerate(DEPTHS) for b in range(d)]
    np.testing.assert_allclose(res["avg_channel_var"], expected_variance(DEPTHS, 0.2), rtol=0.25)
    assert np.all((res["residual_var"] > 0.6) & (res["residual_var"] < 1.25)), res["residual_var"]
    assert np.all(res["avg_sq_channel_mean"] < 0.05), res["avg_sq_channel_mean"]


@pytest.mark.slow
def test_nf_resnet_large_alpha_shows_growth_and_reset(nf_setup):
    # alpha = 1 makes the recursion 2, 3, | 2, 3, 4, | 2, 3 stand far above sampling noise.
    # Parameters do not depend on alpha (beta and alpha are constants), so reuse them.
    images, variables = nf_setup
    model = create_model("nf_resnet26_small", num_classes=10, alpha=1.0, **TINY)
    res = spp.signal_propagation(model, variables, images, skipinit_gain=1.0)
    var, res_var = res["avg_channel_var"], res["residual_var"]
    np.testing.assert_allclose(var, expected_variance(DEPTHS, 1.0), rtol=0.25)
    starts = np.cumsum((0,) + DEPTHS[:-1])
    for i in range(1, len(var)):
        if i in starts:  # transition: the shortcut re-normalizes, the variance drops back
            assert var[i] < var[i - 1] - 0.5
        else:  # var(h + alpha f) = var(h) + alpha^2 var(f): the branch is uncorrelated
            np.testing.assert_allclose(var[i] - var[i - 1], res_var[i], atol=0.1)


@pytest.mark.slow
def test_unnormalized_skipinit_resnet_grows_with_depth():
    images = jax.random.normal(jax.random.key(1), (8, 16, 16, 3), jnp.float32)
    model = create_model(
        "resnet18_skipinit_small", num_classes=10, depths=(2, 2, 2), widths=(16, 32, 64),
        stem_width=16,
    )  # fmt: skip
    variables = jax.jit(lambda k, x: model.init({"params": k}, x, train=False))(
        jax.random.key(0, impl="rbg"), images
    )
    res = spp.signal_propagation(model, variables, images, skipinit_gain=1.0)
    var, res_var = res["avg_channel_var"], res["residual_var"]
    # He-initialized branches match their input's scale: var(h + f) ~ 2 var(h) per block
    assert np.all(np.diff(var) > 0), var
    assert var[-1] > 4 * var[0] and res_var[-1] > 4 * res_var[0], (var, res_var)
    # with the gains left at 0 every block is the identity (up to projection shortcuts)
    var0 = spp.signal_propagation(model, variables, images)["avg_channel_var"]
    assert var0[-1] < 1.2 * var0[0], var0


class _NoSow(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


def test_errors():
    model, x = _NoSow(), jnp.ones((2, 4, 4, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match="no parameter named"):
        spp.signal_propagation(model, variables, x, skipinit_gain=1.0)
    with pytest.raises(ValueError, match="sowed no 'block_out'"):
        spp.signal_propagation(model, variables, x)
    with pytest.raises(ValueError, match="NHWC"):
        spp.signal_propagation(model, variables, jnp.ones((2, 4, 3)))
    with pytest.raises(SystemExit):
        spp.main(["--models", "nf_resnet50,not_a_model", "--out", "x.png"])


def test_collect_keeps_forward_order_and_set_gains():
    tree = {"stage0_block2": {"block_out": (1,)}, "stage0_block10": {"block_out": (2,)}}
    tree["stage1_block0"] = {"inner": {"block_out": (3, 4)}}
    assert spp._collect(tree, "block_out") == [
        ("stage0_block2", 1),
        ("stage0_block10", 2),
        ("stage1_block0/inner", 3),
        ("stage1_block0/inner", 4),
    ]
    params = {
        "a": {"skip_gain": jnp.zeros(())},
        "b": {"skip_gain": jnp.zeros(()), "w": jnp.ones(2)},
    }
    new, count = spp.set_skipinit_gains(params, 1.0)
    assert count == 2 and float(new["a"]["skip_gain"]) == 1.0 and float(new["b"]["skip_gain"]) == 1
    np.testing.assert_array_equal(new["b"]["w"], params["b"]["w"])


def test_plot_writes_png(tmp_path):
    import matplotlib.image

    res = {
        "blocks": ["b0", "b1", "b2"],
        "shapes": [(2, 8, 8, 4), (2, 8, 8, 4), (2, 4, 4, 8)],
        "avg_sq_channel_mean": np.array([1e-3, 2e-3, 1e-3]),
        "avg_channel_var": np.array([1.04, 1.08, 1.04]),
        "residual_var": np.array([1.0, 0.9, 1.1]),
    }
    out = tmp_path / "spp.png"
    spp.plot_signal_propagation({"a": res, "b": res}, str(out), title="t")
    img = matplotlib.image.imread(out)
    assert img.ndim == 3 and img.shape[1] > img.shape[0] > 200
    with pytest.raises(ValueError, match="empty"):
        spp.plot_signal_propagation({}, str(out))
