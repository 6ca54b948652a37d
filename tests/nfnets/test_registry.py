"""create_model: every name runs (tiny overrides), variant data, dtype, error messages."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nfnets import MODEL_NAMES, create_model

# The NFNet variant table (Brock et al., 2021, Table 7), written out independently of nfnets.nfnet.
NFNET_TABLE = {
    "f0": ((1, 2, 6, 3), 0.2),
    "f1": ((2, 4, 12, 6), 0.3),
    "f2": ((3, 6, 18, 9), 0.4),
    "f3": ((4, 8, 24, 12), 0.4),
    "f4": ((5, 10, 30, 15), 0.5),
    "f5": ((6, 12, 36, 18), 0.5),
    "f6": ((7, 14, 42, 21), 0.5),
    "f7": ((8, 16, 48, 24), 0.5),
}


def _expected_names():
    names = [f"nfnet_{v}" for v in NFNET_TABLE] + [f"nfnet_{v}_plus" for v in NFNET_TABLE]
    names += [f"nf_resnet{d}" for d in (26, 50, 101, 152, 200)]
    for d in (18, 34, 50, 101):
        names += [f"resnet{d}_v1", f"resnet{d}_v2", f"resnet{d}_skipinit"]
    return names + [f"{n}_small" for n in names]


def test_model_names_cover_every_family():
    assert sorted(MODEL_NAMES) == sorted(_expected_names())


@pytest.mark.parametrize("variant", sorted(NFNET_TABLE))
def test_nfnet_variant_rows(variant):
    depths, dropout = NFNET_TABLE[variant]
    for suffix, widths in (("", (256, 512, 1536, 1536)), ("_plus", (384, 768, 2048, 2048))):
        model = create_model(f"nfnet_{variant}{suffix}")
        assert (tuple(model.depths), model.dropout, tuple(model.widths)) == (
            depths,
            dropout,
            widths,
        )
        assert model.stochastic_depth == 0.25 and model.se_ratio == 0.5 and model.alpha == 0.2
        assert model.activation == "gelu" and model.group_width == 128


def _tiny(name):
    """Tiny overrides; one stage except NFNets (two, to run the avg-pool transition).
    Stage transitions of the other families run in test_nf_resnet / test_resnet."""
    if name.startswith("nfnet"):
        return dict(widths=(16, 32), depths=(1, 1), group_width=8, stem_width=8, dropout=0.1)
    if name.startswith("nf_resnet"):
        return dict(widths=(16,), depths=(1,), stem_width=8, dropout=0.1)
    return dict(widths=(8,), depths=(1,), stem_width=8, dropout=0.1)


def _fill(shapes, seed=0):
    """Concrete variables for a shape tree without compiling an init: random weights
    (non-zero skip gains, so every branch is exercised), positive scales/variances."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        key = jax.tree_util.keystr(path)
        if s.dtype == jnp.int32:
            return jnp.ones(s.shape, s.dtype)  # running-stat update counts
        base = 1.0 if any(k in key for k in ("gain", "scale", "'var'", "'v'")) else 0.0
        return jnp.asarray(base + 0.3 * rng.standard_normal(s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


@functools.partial(jax.jit, static_argnums=0)
def _train_and_eval(model, variables, x, key):
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}

    def loss(p):
        logits, _ = model.apply(
            {"params": p, **rest}, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
        )
        return jnp.mean(logits**2)

    value, grads = jax.value_and_grad(loss)(params)
    return value, grads, model.apply(variables, x, train=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_forward_and_grad_finite(name):
    model = create_model(name, num_classes=3, **_tiny(name))
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    shapes = jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x, train=False), x)
    assert "head" in shapes["params"]
    variables = _fill(shapes)
    value, grads, logits = _train_and_eval(model, variables, x, jax.random.key(1))
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits)) and np.isfinite(float(value))
    for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(g))
    assert float(jnp.abs(grads["head"]["kernel"]).max()) > 0


def test_bf16_override_keeps_f32_params_and_logits():
    for name in ("nfnet_f0_small", "nf_resnet26_small", "resnet18_v2_small"):
        model = create_model(name, num_classes=3, dtype=jnp.bfloat16, **_tiny(name))
        x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
        variables = jax.eval_shape(
            lambda x, m=model: m.init({"params": jax.random.key(0)}, x, train=False), x
        )
        assert all(leaf.dtype != jnp.bfloat16 for leaf in jax.tree.leaves(variables))
        out, state = jax.eval_shape(
            lambda v, x, m=model: m.apply(v, x, train=False, mutable=["intermediates"]),
            variables,
            x,
        )
        assert out.dtype == jnp.float32
        block_out = jax.tree.leaves(state["intermediates"])[0]
        assert block_out.dtype == jnp.bfloat16, name


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown model 'nfnet_f9'.*nfnet_f0.*resnet50_v2"):
        create_model("nfnet_f9")


def test_unknown_override_lists_valid_keys():
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['width'\].*depths.*widths"):
        create_model("nfnet_f0", width=(1, 2))
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['group_width'\].*norm_kwargs"):
        create_model("resnet50_v1", group_width=64)


def test_group_width_error_names_both_numbers():
    with pytest.raises(ValueError, match="group width 96 does not divide the stage width 256"):
        create_model("nfnet_f0", group_width=96)


def test_too_small_image_states_minimum():
    model = create_model("nf_resnet50", num_classes=3)
    with pytest.raises(ValueError, match="minimum image size is 32x32"):
        jax.eval_shape(
            lambda x: model.init({"params": jax.random.key(0)}, x, train=False),
            jax.ShapeDtypeStruct((1, 28, 28, 3), jnp.float32),
        )
    small = create_model("nf_resnet50_small", num_classes=3)
    jax.eval_shape(
        lambda x: small.init({"params": jax.random.key(0)}, x, train=False),
        jax.ShapeDtypeStruct((1, 28, 28, 3), jnp.float32),
    )


def test_norm_and_activation_errors():
    with pytest.raises(ValueError, match="unknown norm 'bn'.*batch_norm.*group_norm"):
        create_model("resnet50_v2", norm="bn")
    with pytest.raises(ValueError, match="no field.*'groups'.*num_groups"):
        create_model("resnet50_v2", norm="group_norm", norm_kwargs={"groups": 8})
    with pytest.raises(ValueError, match="unknown activation 'mish'.*gelu"):
        create_model("nf_resnet50", activation="mish")
    with pytest.raises(ValueError, match="num_classes"):
        create_model("nf_resnet50", num_classes=0)


def test_overrides_reach_the_model():
    model = create_model(
        "resnet50_v1", num_classes=10, norm="batch_norm", norm_kwargs={"axis_name": "batch"}
    )
    assert model.num_classes == 10 and dict(model.norm_kwargs) == {"axis_name": "batch"}
    assert hash(model) == hash(create_model("resnet50_v1", num_classes=10, norm="batch_norm",
                                            norm_kwargs={"axis_name": "batch"}))  # fmt: skip


NNX_TINY = {
    "resnet18_v1_small": dict(widths=(8,), depths=(1,), stem_width=8),
    "nf_resnet26_small": dict(widths=(16,), depths=(1,), stem_width=8, stochastic_depth=0.0),
}


@pytest.mark.parametrize("name", sorted(NNX_TINY))
def test_nnx_api_has_the_linen_params_and_equal_outputs_and_grads(name):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 3)), jnp.float32)
    linen = create_model(name, num_classes=3, **NNX_TINY[name])
    variables = linen.init({"params": jax.random.key(0)}, x, train=False)
    params, stats = variables["params"], variables.get("batch_stats", {})
    model = create_model(
        name, 3, api="nnx", rngs=nnx.Rngs(params=1), input_shape=x.shape, **NNX_TINY[name]
    )
    for kind, tree in ((nnx.Param, params), (nnx.BatchStat, stats)):
        state = nnx.state(model, kind)
        ours = nnx.to_pure_dict(state)
        assert jax.tree.structure(ours) == jax.tree.structure(jax.tree.map(np.asarray, tree))
        assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, tree)
        nnx.replace_by_pure_dict(state, tree)  # load the linen weights into the NNX module
        nnx.update(model, state)
    y, upd = linen.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(model(x, train=True, mutable=["batch_stats"]), y, rtol=1e-5)
    new_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    jax.tree.map(np.testing.assert_allclose, new_stats, dict(upd.get("batch_stats", {})))
    trained = {"params": params, **upd}
    y_eval = linen.apply(trained, x, train=False)
    np.testing.assert_allclose(model(x, train=False), y_eval, rtol=1e-5)
    g = nnx.grad(lambda m: jnp.sum(m(x, train=False) ** 2))(model)
    ref = jax.grad(lambda p: jnp.sum(linen.apply({**trained, "params": p}, x, train=False) ** 2))
    g_ref = jax.tree.map(np.asarray, ref(params))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        nnx.to_pure_dict(g),
        g_ref,
    )


def test_nnx_api_errors_name_the_fix():
    with pytest.raises(ValueError, match="api must be one of"):
        create_model("nf_resnet26_small", api="torch")
    with pytest.raises(ValueError, match="rngs=nnx.Rngs"):
        create_model("nf_resnet26_small", api="nnx", input_shape=(1, 32, 32, 3))
    with pytest.raises(ValueError, match=r"input_shape=\(N, H, W, C\)"):
        create_model("nf_resnet26_small", api="nnx", rngs=nnx.Rngs(0))
