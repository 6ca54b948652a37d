"""norms.linen: every module runs via make(), equals its pure function, and keeps state right."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import norms
from norms import linen as L
from norms.batch_renorm import BatchRenormState
from norms.running_stats import BatchNormState, StaleStatisticsWarning
from tests.norms.test_batch_norm import rand

X = rand((4, 2, 2, 32), 0, 1.0, 2.0)
STATEFUL = ("batch_norm", "batch_renorm", "switchable_norm", "evonorm_b0")


def randomize(params, seed=1):
    """Random parameter values, so equality with the pure function is not trivial."""
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(
        tree, [jnp.asarray(rng.uniform(0.5, 1.5, np.shape(v)), v.dtype) for v in leaves]
    )


@pytest.mark.parametrize("name", L.NORM_NAMES)
def test_make_every_name_runs_init_and_apply(name):
    module = L.make(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # init neither updates nor warns about statistics
        variables = module.init(jax.random.key(0), X, train=False)
    y_eval = module.apply(variables, X, train=False) if name not in STATEFUL else None
    y, upd = module.apply(variables, X, train=True, mutable=["batch_stats"])
    assert y.shape == X.shape and np.isfinite(np.asarray(y)).all()
    if name in STATEFUL:
        assert int(variables["batch_stats"]["count"]) == 0
        assert int(upd["batch_stats"]["count"]) == 1
        assert upd["batch_stats"]["var"].dtype == jnp.float32
    else:
        assert "batch_stats" not in variables and not upd
        np.testing.assert_allclose(y, y_eval, rtol=1e-6)  # batch-independent: train ignored


def test_make_errors_list_valid_names_and_fields():
    with pytest.raises(ValueError, match="'bn'.*batch_norm, batch_renorm.*evonorm_s0, none"):
        L.make("bn")
    with pytest.raises(ValueError, match=r"\['momentum'\].*valid fields:.*num_groups"):
        L.make("group_norm", momentum=0.9)
    assert isinstance(L.make("frn", learned_eps=True, name="n"), L.FilterResponseNorm)


def pure_call(name, x, p, state, train, mask=None):
    """The matching pure-function call for each module name (params p, state)."""
    s, b, m = p.get("scale"), p.get("bias"), mask
    if name == "batch_norm":
        return norms.batch_norm(x, state, s, b, train=train, momentum=0.9, mask=m)
    if name == "batch_renorm":
        return norms.batch_renorm(x, state, s, b, train=train, r_max=1.5, d_max=0.5, mask=m)
    if name == "switchable_norm":
        ml, vl = p["mean_logits"], p["var_logits"]
        return norms.switchable_norm(x, state, s, b, ml, vl, train=train, mask=m)
    if name == "evonorm_b0":
        return norms.evonorm_b0(x, state, s, b, p["v"], train=train, mask=m)
    if name == "group_norm":
        return norms.group_norm(x, s, b, num_groups=8, mask=m), None
    if name == "layer_norm":
        return norms.layer_norm(x, s, b, mask=m), None
    if name == "instance_norm":
        return norms.instance_norm(x, s, b, mask=m), None
    if name == "frn":
        return norms.filter_response_norm(x, s, b, p["tau"], learned_eps=p["eps"], mask=m), None
    if name == "evonorm_s0":
        return norms.evonorm_s0(x, s, b, p["v"], num_groups=8, mask=m), None
    if name == "rms_norm":
        return norms.rms_norm(x, s, mask=m), None
    if name == "dyt":  # pointwise: no statistics, so no mask
        return norms.dynamic_tanh(x, p["alpha"], s, b), None
    if name == "derf":
        return norms.derf(x, p["alpha"], p["shift"], s, b), None
    return x, None


# No statistics: a mask has no values to leave out, so these modules ignore it.
MASK_FREE = ("none", "dyt", "derf")


MODULE_KWARGS = {
    "batch_renorm": {"r_max": 1.5, "d_max": 0.5},
    "group_norm": {"num_groups": 8},
    "frn": {"learned_eps": True},
    "evonorm_s0": {"num_groups": 8},
}


@pytest.mark.parametrize("name", L.NORM_NAMES)
def test_modules_equal_their_pure_functions(name):
    module = L.make(name, **MODULE_KWARGS.get(name, {}))
    variables = module.init(jax.random.key(0), X, train=False)
    params = randomize(variables.get("params", {}))
    stats = variables.get("batch_stats")
    if stats is not None:  # a non-trivial, already-updated state
        stats = {**stats, "mean": rand((32,), 2), "count": jnp.array(3, jnp.int32)}
    full = {"params": params} | ({"batch_stats": stats} if stats is not None else {})
    state = None
    if stats is not None:
        cls = BatchRenormState if name == "batch_renorm" else BatchNormState
        state = cls(*(stats[k] for k in cls._fields))
    for train in (True, False):
        y, upd = module.apply(full, X, train=train, mutable=["batch_stats"])
        ry, rstate = pure_call(name, jnp.asarray(X), params, state, train)
        np.testing.assert_allclose(y, ry, rtol=1e-6, atol=1e-6, err_msg=f"train={train}")
        if state is not None:
            for k in type(state)._fields:
                np.testing.assert_allclose(upd["batch_stats"][k], getattr(rstate, k), rtol=1e-6)


# Per-position mask (some spatial positions of some examples are padding).
MASK = np.array([[1, 1, 0, 1], [1, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]], bool).reshape(4, 2, 2, 1)


@pytest.mark.parametrize("name", L.NORM_NAMES)
def test_every_module_takes_mask_like_its_pure_function(name):
    module = L.make(name, **MODULE_KWARGS.get(name, {}))
    variables = module.init(jax.random.key(0), X, train=False, mask=MASK)
    params = randomize(variables.get("params", {}))
    full = {**variables, "params": params}
    stats = variables.get("batch_stats")
    state = None
    if stats is not None:
        cls = BatchRenormState if name == "batch_renorm" else BatchNormState
        state = cls(*(stats[k] for k in cls._fields))
    y, upd = module.apply(full, X, train=True, mask=MASK, mutable=["batch_stats"])
    ry, rstate = pure_call(name, jnp.asarray(X), params, state, True, mask=MASK)
    np.testing.assert_allclose(y, ry, rtol=1e-6, atol=1e-6)
    if name not in MASK_FREE:  # the mask changes the output (it is not ignored)
        unmasked = module.apply(full, X, train=True, mutable=["batch_stats"])[0]
        assert not np.allclose(y, unmasked, rtol=1e-4, atol=1e-4)
    if state is not None:
        for k in type(state)._fields:
            np.testing.assert_allclose(upd["batch_stats"][k], getattr(rstate, k), rtol=1e-6)


def test_linen_batch_norm_matches_flax_over_steps():
    ours, theirs = L.BatchNorm(momentum=0.8), nn.BatchNorm(momentum=0.8, use_fast_variance=False)
    v_ours = ours.init(jax.random.key(0), X, train=False)
    v_theirs = theirs.init(jax.random.key(0), X, use_running_average=True)
    params = randomize(v_ours["params"])
    s_ours, s_theirs = v_ours["batch_stats"], v_theirs["batch_stats"]
    for i in range(2):
        x = rand(X.shape, 10 + i, 3.0, 0.5)
        y1, u1 = ours.apply(
            {"params": params, "batch_stats": s_ours}, x, train=True, mutable=["batch_stats"]
        )
        y2, u2 = theirs.apply(
            {"params": params, "batch_stats": s_theirs},
            x,
            use_running_average=False,
            mutable=["batch_stats"],
        )
        s_ours, s_theirs = u1["batch_stats"], u2["batch_stats"]
        np.testing.assert_allclose(y1, y2, rtol=1e-4, atol=1e-5)
    for k in ("mean", "var"):
        np.testing.assert_allclose(s_ours[k], s_theirs[k], rtol=1e-5, atol=1e-6)
    y1 = ours.apply({"params": params, "batch_stats": s_ours}, X, train=False)
    y2 = theirs.apply({"params": params, "batch_stats": s_theirs}, X, use_running_average=True)
    np.testing.assert_allclose(y1, y2, rtol=1e-4, atol=1e-5)


def test_train_is_required_and_never_inferred():
    bn = L.BatchNorm()
    variables = bn.init(jax.random.key(0), X, train=False)
    with pytest.raises(TypeError, match="train"):
        bn.apply(variables, X)
    with pytest.raises(ValueError, match="mutable=\\['batch_stats'\\]"):
        bn.apply(variables, X, train=True)
    # a mutable collection does not switch to training: eval leaves the state alone
    with pytest.warns(StaleStatisticsWarning):
        _, upd = bn.apply(variables, X, train=False, mutable=["batch_stats"])
    assert int(upd["batch_stats"]["count"]) == 0
    with pytest.raises(ValueError, match="train must be True or False"):
        bn.apply(variables, X, train=None, mutable=["batch_stats"])


def test_sows_batch_moments_only_when_collection_is_mutable():
    bn = L.BatchNorm()
    variables = bn.init(jax.random.key(0), X, train=True)
    _, upd = bn.apply(variables, X, train=True, mutable=["batch_stats"])
    assert set(upd) == {"batch_stats"}
    _, upd = bn.apply(variables, X, train=True, mutable=["batch_stats", "batch_moments"])
    m = upd["batch_moments"]
    np.testing.assert_allclose(m["mean"], X.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["var"], X.var((0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(m["count"], 16)


def test_dtypes_and_zero_scale_init():
    bn = L.BatchNorm(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, scale_init=nn.initializers.zeros)
    variables = bn.init(jax.random.key(0), X, train=False)
    y, upd = bn.apply(variables, X, train=True, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16 and variables["params"]["scale"].dtype == jnp.bfloat16
    assert upd["batch_stats"]["mean"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y, np.float32), 0.0)  # zero scale, zero bias


@pytest.mark.parametrize("name", ["switchable_norm", "evonorm_b0"])
def test_sown_batch_moments_equal_float64_masked_statistics(name):
    # The modules sow the moments their function returns (no second computation).
    mask = np.ones((4, 1, 1, 1), bool)
    mask[2] = False
    module = L.make(name)
    variables = module.init(jax.random.key(0), X, train=False)
    _, upd = module.apply(
        variables, X, train=True, mask=mask, mutable=["batch_stats", "batch_moments"]
    )
    kept = np.asarray(X, np.float64)[mask[:, 0, 0, 0]]
    m = upd["batch_moments"]
    np.testing.assert_allclose(m["mean"], kept.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["var"], kept.var((0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(m["count"], 12)


@pytest.mark.parametrize("name", ["switchable_norm", "evonorm_b0"])
def test_sync_layer_sowing_batch_moments_emits_one_collective(name):
    module = L.make(name, axis_name="batch")
    x = jnp.ones((jax.device_count(), 2, 2, 2, 4))
    variables = module.init(jax.random.key(0), x[0], train=False)

    def fwd(v, x):
        return module.apply(v, x, train=True, mutable=["batch_stats", "batch_moments"])

    hlo = jax.pmap(fwd, axis_name="batch", in_axes=(None, 0)).lower(variables, x).as_text()
    ops = ("all_gather", "all_reduce", "reduce_scatter", "all_to_all")
    assert sum(hlo.count(f'stablehlo.{op}"') for op in ops) == 1


def test_evonorm_b0_module_stores_the_unbiased_running_var():
    module = L.make("evonorm_b0", unbiased_running_var=True, momentum=0.5)
    variables = module.init(jax.random.key(0), X, train=False)
    _, upd = module.apply(variables, X, train=True, mutable=["batch_stats"])
    n = X.shape[0] * X.shape[1] * X.shape[2]
    var_b = np.asarray(X, np.float64).var(axis=(0, 1, 2))
    np.testing.assert_allclose(
        upd["batch_stats"]["var"], 0.5 + 0.5 * var_b * n / (n - 1), rtol=1e-5
    )


def test_rms_norm_module_equals_flax_rms_norm():
    ours, theirs = L.make("rms_norm"), nn.RMSNorm()
    v_ours = ours.init(jax.random.key(0), X)
    v_theirs = theirs.init(jax.random.key(0), X)
    assert jax.tree.map(jnp.shape, v_ours) == jax.tree.map(jnp.shape, v_theirs)  # scale only
    params = randomize(v_ours)
    np.testing.assert_allclose(ours.apply(params, X), theirs.apply(params, X), rtol=1e-6)


@pytest.mark.parametrize("name", ["dyt", "derf"])
def test_pointwise_modules_scalar_or_per_channel_params_and_dtypes(name):
    module = L.make(name)
    params = module.init(jax.random.key(0), X)["params"]
    pre = ("alpha",) if name == "dyt" else ("alpha", "shift")
    assert set(params) == {"scale", "bias", *pre}
    assert float(params["alpha"]) == 0.5 and params["alpha"].shape == ()  # the papers' init
    if name == "derf":
        assert float(params["shift"]) == 0.0 and params["shift"].shape == ()
    wide = L.make(name, per_channel=True, alpha_init=0.8, dtype=jnp.bfloat16)
    v = wide.init(jax.random.key(0), X)
    np.testing.assert_array_equal(v["params"]["alpha"], np.full(32, 0.8, np.float32))
    v = {"params": randomize(v["params"])}
    y = wide.apply(v, X)
    p = v["params"]
    ry = pure_call(name, jnp.asarray(X), p, None, True)[0]
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ry.astype(jnp.bfloat16)))
