"""Normalized ResNet baselines: torchvision parameter counts, every norm, SyncBN under pmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets.registry import create_model
from norms import linen as norms_linen

# torchvision ResNet (v1.5) parameter counts.
TORCHVISION = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160}


def _init_shapes(model, size=32, batch=1):
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x, train=False), x)


def _count(tree) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


@pytest.mark.parametrize("depth", [18, 34, 50, pytest.param(101, marks=pytest.mark.slow)])
def test_v1_batch_norm_counts_match_torchvision(depth):
    variables = _init_shapes(create_model(f"resnet{depth}_v1"))
    assert _count(variables["params"]) == TORCHVISION[depth]
    # Running mean/var (and update count) per BN layer in "batch_stats".
    assert "batch_stats" in variables


def test_v2_and_skipinit_layouts():
    v2 = _init_shapes(create_model("resnet50_v2"))["params"]
    assert "stem_norm" not in v2 and "final_norm" in v2
    assert set(v2["stage1_block0"]) >= {"norm_in", "norm0", "norm1", "conv_shortcut"}
    skip = _init_shapes(create_model("resnet18_skipinit"))
    assert "batch_stats" not in skip
    block = skip["params"]["stage0_block1"]
    assert block["skip_gain"].shape == () and "bias" in block["conv0"]
    assert not any("norm" in k for k in block)


TINY = dict(num_classes=4, widths=(32, 64), depths=(1, 1), stem_width=32)


@pytest.mark.parametrize("norm", norms_linen.NORM_NAMES)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_every_norm_traces_in_train_and_eval(norm, version):
    model = create_model(f"resnet18_{version}_small", norm=norm, **TINY)
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    variables = _init_shapes(model, size=8, batch=2)
    out, updates = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x
    )
    assert out.shape == (2, 4) and out.dtype == jnp.float32
    assert jax.tree.structure(updates.get("batch_stats", {})) == jax.tree.structure(
        variables.get("batch_stats", {})
    )
    evaluated = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert evaluated.shape == (2, 4)


@pytest.mark.parametrize("norm", ["rms_norm", "dyt", "derf"])
def test_statistics_free_norms_run_a_forward_pass_by_config(norm):
    model = create_model("resnet50_v2_small", norm=norm, **{**TINY, "depths": (1, 1)})
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    variables = jax.jit(lambda x: model.init({"params": jax.random.key(1)}, x, train=False))(x)
    assert "batch_stats" not in variables  # no running statistics to keep
    block = variables["params"]["stage0_block0"]
    expected = {"rms_norm": {"scale"}, "dyt": {"scale", "bias", "alpha"}}
    assert set(block["norm0"]) == expected.get(norm, {"scale", "bias", "alpha", "shift"})
    logits = jax.jit(lambda v, x: model.apply(v, x, train=True))(variables, x)
    assert logits.shape == (2, 4) and np.isfinite(np.asarray(logits)).all()
    # no batch statistic: the first example's logits ignore the second example
    other = x.at[1].set(10.0 * x[1] + 3.0)
    np.testing.assert_allclose(
        model.apply(variables, other, train=True)[0], logits[0], rtol=1e-5, atol=1e-6
    )


def test_group_norm_with_weight_standardized_convs_runs():
    model = create_model(
        "resnet18_v2_small", norm="group_norm", norm_kwargs={"num_groups": 8}, ws_conv=True, **TINY
    )
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    variables = jax.jit(
        lambda x: model.init({"params": jax.random.key(1, impl="rbg")}, x, train=False)
    )(x)
    assert "batch_stats" not in variables
    assert "bias" not in variables["params"]["stage0_block0"]["conv0"]

    @jax.jit
    def run(params):
        loss = lambda p: jnp.sum(model.apply({"params": p}, x, train=True) ** 2)
        return jax.value_and_grad(loss)(params)

    value, grads = run(variables["params"])
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_sync_batch_norm_under_pmap_equals_one_big_batch():
    devices = jax.local_device_count()
    assert devices == 8, "tests/conftest.py sets 8 virtual CPU devices"
    tiny = dict(num_classes=3, widths=(8, 16), depths=(1, 1), stem_width=8)
    synced = create_model("resnet18_v2_small", norm_kwargs={"axis_name": "batch"}, **tiny)
    single = create_model("resnet18_v2_small", **tiny)
    x = jax.random.normal(jax.random.key(0), (16, 8, 8, 3)) * 2.0 + 0.5
    variables = jax.jit(
        lambda x: single.init({"params": jax.random.key(1, impl="rbg")}, x, train=False)
    )(x)

    def loss(model, params, stats, x):
        logits, upd = model.apply(
            {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(logits**2), (logits, upd["batch_stats"])

    @jax.jit
    def reference(params, stats, x):
        return jax.grad(lambda p: loss(single, p, stats, x), has_aux=True)(params)

    def per_device(params, stats, x):
        grads, aux = jax.grad(lambda p: loss(synced, p, stats, x), has_aux=True)(params)
        return jax.lax.psum(grads, "batch"), aux

    ref_grads, (ref_logits, ref_stats) = reference(variables["params"], variables["batch_stats"], x)
    replicate = lambda t: jax.tree.map(lambda a: jnp.stack([a] * devices), t)
    grads, (logits, stats) = jax.pmap(per_device, axis_name="batch")(
        replicate(variables["params"]),
        replicate(variables["batch_stats"]),
        x.reshape(devices, 2, 8, 8, 3),
    )
    np.testing.assert_allclose(logits.reshape(16, 3), ref_logits, rtol=1e-4, atol=1e-5)
    for got, want in zip(jax.tree.leaves(stats), jax.tree.leaves(ref_stats), strict=True):
        for d in range(devices):
            np.testing.assert_allclose(got[d], want, rtol=1e-4, atol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(got[0], want, rtol=2e-3, atol=1e-4)


def _stage_shapes(name: str, **kwargs) -> dict[str, tuple]:
    """Output shape of each stage block, from an abstract forward pass."""
    model = create_model(name, num_classes=10, **kwargs)
    x = jnp.zeros((2, 28, 28, 1))

    def forward(x):
        variables = model.init(jax.random.key(0), x, train=False)
        _, state = model.apply(
            variables, x, train=False, mutable=["intermediates"], capture_intermediates=True
        )
        return state["intermediates"]

    inter = jax.eval_shape(forward, x)
    return {k: v["__call__"][0].shape for k, v in inter.items() if k.startswith("stage")}


def test_small_stem_stride_gives_the_nf_models_resolutions():
    # The BN twin of configs/default.py: same stem, widths, depths and ratio.
    shape = {"stem_width": 16, "stem_stride": 2, "widths": (32, 64, 128), "depths": (1, 1, 1)}
    shape["bottleneck_ratio"] = 0.5
    nf = _stage_shapes("nf_resnet26_small", **shape)
    twin = _stage_shapes("resnet50_v2_small", norm="batch_norm", **shape)
    assert (
        twin
        == nf
        == {
            "stage0_block0": (2, 14, 14, 32),
            "stage1_block0": (2, 7, 7, 64),
            "stage2_block0": (2, 4, 4, 128),
        }
    )


@pytest.mark.parametrize("name", ["resnet50_v2", "nf_resnet50"])
def test_stem_stride_on_the_full_stem_is_refused(name):
    with pytest.raises(ValueError, match="small 3x3 stem only"):
        model = create_model(name, num_classes=10, stem_stride=2)
        model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
