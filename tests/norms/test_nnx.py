"""norms.nnx: every module equals its pure function and its linen twin; NNX modes; SyncBN."""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import norms
from norms import linen as L
from norms import nnx as N
from norms.batch_norm import BatchNormState
from norms.batch_renorm import BatchRenormState
from tests.norms.test_batch_norm import rand
from tests.norms.test_linen import MASK, MODULE_KWARGS, STATEFUL, X, pure_call, randomize
from tests.norms.test_sync_batch_norm import C, check_against_reference, make_data

COT = rand(X.shape, 7)


def nnx_twin(name, params, stats):
    """The NNX module ``name`` over 32 channels holding the given param/state values."""
    m = N.make(name, X.shape[-1], rngs=nnx.Rngs(0), **MODULE_KWARGS.get(name, {}))
    for k, v in {**params, **(stats or {})}.items():
        getattr(m, k)[...] = v
    return m


def as_dict(state) -> dict:
    return {k: np.asarray(v) for k, v in nnx.to_pure_dict(state).items()}


@pytest.mark.parametrize("name", N.NORM_NAMES)
def test_make_builds_linen_params_and_state(name):
    kwargs = MODULE_KWARGS.get(name, {})
    m = N.make(name, 32, rngs=nnx.Rngs(0), **kwargs)
    variables = L.make(name, **kwargs).init(jax.random.key(0), X, train=False)
    ours = as_dict(nnx.state(m, nnx.Param))
    theirs = jax.tree.map(np.asarray, dict(variables.get("params", {})))
    assert ours.keys() == theirs.keys()
    for k, v in theirs.items():  # every init is a constant, so values match too
        assert ours[k].dtype == v.dtype
        np.testing.assert_array_equal(ours[k], v, err_msg=k)
    stats = as_dict(nnx.state(m, nnx.BatchStat))
    assert stats.keys() == dict(variables.get("batch_stats", {})).keys()
    for k, v in stats.items():
        np.testing.assert_array_equal(v, variables["batch_stats"][k], err_msg=k)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("name", N.NORM_NAMES)
def test_modules_equal_pure_functions_and_linen(name, train):
    linen = L.make(name, **MODULE_KWARGS.get(name, {}))
    variables = linen.init(jax.random.key(0), X, train=False)
    params = randomize(dict(variables.get("params", {})))
    stats = variables.get("batch_stats")
    state = None
    if stats is not None:  # a non-trivial, already-updated state
        stats = {**stats, "mean": rand((32,), 2), "count": jnp.array(3, jnp.int32)}
        cls = BatchRenormState if name == "batch_renorm" else BatchNormState
        state = cls(*(stats[k] for k in cls._fields))
    m = nnx_twin(name, params, stats)
    y = m(X, train=train)
    ry, rstate = pure_call(name, jnp.asarray(X), params, state, train)
    np.testing.assert_allclose(y, ry, rtol=1e-6, atol=1e-6)
    full = {"params": params} | ({"batch_stats": stats} if stats is not None else {})
    ly, upd = linen.apply(full, X, train=train, mutable=["batch_stats"])
    np.testing.assert_allclose(y, ly, rtol=1e-6, atol=1e-6)
    if state is not None:
        new = as_dict(nnx.state(m, nnx.BatchStat))
        for k in type(state)._fields:
            np.testing.assert_allclose(new[k], getattr(rstate, k), rtol=1e-6, err_msg=k)
            np.testing.assert_allclose(new[k], upd["batch_stats"][k], rtol=1e-6, err_msg=k)
    if not params:
        return
    # gradients of sum(y * cot) w.r.t. every param, against the pure function's
    grads = nnx.grad(lambda m: jnp.sum(m(X, train=train) * COT))(nnx_twin(name, params, stats))
    ref = jax.grad(lambda p: jnp.sum(pure_call(name, jnp.asarray(X), p, state, train)[0] * COT))
    ref_grads = ref(params)
    for k, g in as_dict(grads).items():
        np.testing.assert_allclose(g, ref_grads[k], rtol=1e-5, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("name", N.NORM_NAMES)
def test_every_module_takes_mask_like_its_pure_function(name):
    m = N.make(name, 32, rngs=nnx.Rngs(0), **MODULE_KWARGS.get(name, {}))
    params = randomize(as_dict(nnx.state(m, nnx.Param)))
    stats = as_dict(nnx.state(m, nnx.BatchStat)) or None
    state = None
    if stats is not None:
        cls = BatchRenormState if name == "batch_renorm" else BatchNormState
        state = cls(*(jnp.asarray(stats[k]) for k in cls._fields))
    m = nnx_twin(name, params, stats)
    y = m(X, train=True, mask=MASK)
    ry, rstate = pure_call(name, jnp.asarray(X), params, state, True, mask=MASK)
    np.testing.assert_allclose(y, ry, rtol=1e-6, atol=1e-6)
    if state is not None:
        new = as_dict(nnx.state(m, nnx.BatchStat))
        for k in type(state)._fields:
            np.testing.assert_allclose(new[k], getattr(rstate, k), rtol=1e-6, err_msg=k)


def test_batch_norm_matches_flax_nnx_batch_norm_over_steps():
    ours = N.BatchNorm(32, momentum=0.8, rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(32, momentum=0.8, use_fast_variance=False, rngs=nnx.Rngs(0))
    for m in (ours, theirs):
        m.scale[...], m.bias[...] = rand((32,), 3, 1.0, 0.5), rand((32,), 4)
    for i in range(2):
        x = rand(X.shape, 10 + i, 3.0, 0.5)
        np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
    for k in ("mean", "var"):
        np.testing.assert_allclose(getattr(ours, k)[...], getattr(theirs, k)[...], rtol=1e-5)
    ours.eval(), theirs.eval()
    np.testing.assert_allclose(ours(X), theirs(X), rtol=1e-4, atol=1e-5)


class Net(nnx.Module):
    """A container, so the mode switches are shown to reach nested norms."""

    def __init__(self, rngs):
        self.bn = N.BatchNorm(32, rngs=rngs)
        self.gn = N.GroupNorm(32, num_groups=8, rngs=rngs)

    def __call__(self, x, train=None):
        return self.gn(self.bn(x, train=train))


def test_train_eval_view_and_call_time_override():
    net = Net(nnx.Rngs(0))
    assert net.bn.use_running_average is False  # built in training mode, as nnx.BatchNorm
    net(X)
    assert int(net.bn.count[...]) == 1
    net.eval()
    assert net.bn.use_running_average is True
    state = BatchNormState(net.bn.mean[...], net.bn.var[...], net.bn.count[...])
    y_eval, _ = norms.batch_norm(X, state, net.bn.scale[...], net.bn.bias[...], train=False)
    np.testing.assert_allclose(net.bn(X), y_eval, rtol=1e-6)  # running statistics
    assert int(net.bn.count[...]) == 1
    net(X, train=True)  # call-time override of eval mode
    assert int(net.bn.count[...]) == 2
    net.train()
    net(X, train=False)  # and of training mode
    assert int(net.bn.count[...]) == 2
    view = nnx.view(net, use_running_average=True)
    assert view.bn.use_running_average is True and net.bn.use_running_average is False
    view(X)
    assert int(net.bn.count[...]) == 2  # the eval view shares the arrays, updates nothing
    nnx.jit(lambda m, x: m(x))(net, X)  # nnx.jit carries the update out of the trace
    assert int(net.bn.count[...]) == 3
    with pytest.raises(ValueError, match="train must be True, False or None"):
        net.bn(X, train="yes")
    with pytest.raises(ValueError, match="use_running_average must be True or False"):
        N.make("batch_norm", 32, rngs=nnx.Rngs(0), use_running_average=None)


@pytest.mark.parametrize("name", STATEFUL)
def test_eval_shape_gives_abstract_params_and_state(name):
    abstract = nnx.eval_shape(lambda: N.make(name, 16, rngs=nnx.Rngs(0)))
    concrete = N.make(name, 16, rngs=nnx.Rngs(0))
    a, c = nnx.state(abstract), nnx.state(concrete)
    a_leaves, c_leaves = jax.tree.leaves(a), jax.tree.leaves(c)
    assert jax.tree.structure(a) == jax.tree.structure(c) and a_leaves
    for s, v in zip(a_leaves, c_leaves, strict=True):
        assert isinstance(s, jax.ShapeDtypeStruct)
        assert (s.shape, s.dtype) == (v.shape, v.dtype)


def test_dtypes_and_zero_scale_init():
    bf16, zeros = jnp.bfloat16, nnx.initializers.zeros
    bn = N.BatchNorm(32, dtype=bf16, param_dtype=bf16, scale_init=zeros, rngs=nnx.Rngs(0))
    y = bn(X)
    assert y.dtype == jnp.bfloat16 and bn.scale[...].dtype == jnp.bfloat16
    assert bn.mean[...].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y, np.float32), 0.0)  # zero scale, zero bias


def test_make_errors_list_valid_names_and_fields():
    with pytest.raises(ValueError, match="'bn'.*batch_norm, batch_renorm.*evonorm_s0, none"):
        N.make("bn", 8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\['momentum'\].*valid fields:.*num_groups"):
        N.make("group_norm", 8, rngs=nnx.Rngs(0), momentum=0.9)
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        N.make("layer_norm", 0, rngs=nnx.Rngs(0))
    assert N.NORM_NAMES == L.NORM_NAMES  # one registry for both APIs


def test_shard_map_sync_bn_uneven_masks_match_one_big_batch():
    data = make_data(3)
    x, mask, cot, scale, bias = data
    bn = N.BatchNorm(C, momentum=0.8, axis_name="d", rngs=nnx.Rngs(0))
    bn.scale[...], bn.bias[...] = scale, bias
    graphdef, params, stats = nnx.split(bn, nnx.Param, nnx.BatchStat)
    mesh = jax.make_mesh((x.shape[0],), ("d",))

    def body(params, stats, x, m, c):
        model = nnx.merge(graphdef, params, stats)

        def loss(model, x):
            y = model(x, mask=m)
            return jnp.sum(y * c), y

        (_, y), (gp, gx) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)
        # all_gather'd statistics are typed device-varying: one row per device out
        new = {k: v[None] for k, v in nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)).items()}
        return y, new, gx, gp  # replicated params: shard_map already sums their cotangent

    f = jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(), P(), P("d"), P("d"), P("d")),
            out_specs=(P("d"), P("d"), P("d"), P()),
        )
    )
    flat = [t.reshape((-1,) + t.shape[2:]) for t in (x, mask, cot)]
    flat = [jax.device_put(t, NamedSharding(mesh, P("d"))) for t in flat]
    y, new, gx, gp = f(params, stats, *flat)
    new_state = BatchNormState(new["mean"], new["var"], new["count"])
    check_against_reference(y, new_state, gx, gp["scale"][...], gp["bias"][...], data)
    np.testing.assert_array_equal(new["count"], 1)


def test_pmap_axis_index_groups_give_per_group_statistics():
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    x, mask = make_data(4)[:2]
    bn = N.BatchNorm(C, axis_name="d", axis_index_groups=groups, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(bn)

    def step(state, x, m):
        model = nnx.merge(graphdef, state)
        return model(x, mask=m), nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

    y, new = jax.tree.map(np.asarray, jax.pmap(step, "d", in_axes=(None, 0, 0))(state, x, mask))
    for g in groups:  # each group is one plain batch norm on the group's batch
        ref = N.BatchNorm(C, rngs=nnx.Rngs(0))
        ry = ref(x[g].reshape(-1, *x.shape[2:]), mask=mask[g].reshape(-1, *mask.shape[2:]))
        np.testing.assert_allclose(y[g].reshape(ry.shape), ry, rtol=1e-4, atol=1e-5)
        for d in g:
            np.testing.assert_allclose(new["mean"][d], ref.mean[...], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(new["var"][d], ref.var[...], rtol=1e-5, atol=1e-6)


def test_flax_is_imported_only_by_the_two_module_files():
    importers = set()
    for path in pathlib.Path(norms.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(n == "flax" or n.startswith("flax.") for n in names):
                importers.add(path.name)
    assert importers == {"linen.py", "nnx.py"}


def test_evonorm_b0_module_stores_the_unbiased_running_var():
    m = N.make("evonorm_b0", 32, rngs=nnx.Rngs(0), unbiased_running_var=True, momentum=0.5)
    m(X)
    n = X.shape[0] * X.shape[1] * X.shape[2]
    var_b = np.asarray(X, np.float64).var(axis=(0, 1, 2))
    np.testing.assert_allclose(m.var[...], 0.5 + 0.5 * var_b * n / (n - 1), rtol=1e-5)


def test_rms_norm_module_equals_flax_nnx_rms_norm():
    ours = N.make("rms_norm", 32, rngs=nnx.Rngs(0))
    theirs = nnx.RMSNorm(32, rngs=nnx.Rngs(0))
    assert as_dict(nnx.state(ours, nnx.Param)).keys() == {"scale"}
    ours.scale[...] = theirs.scale[...] = rand((32,), 3, 1.0, 0.5)
    np.testing.assert_allclose(ours(X), theirs(X), rtol=1e-6)
    mask = np.asarray(MASK) | (np.arange(32) == 0)  # every vector keeps a value for flax
    np.testing.assert_allclose(ours(X, mask=mask), theirs(X, mask=mask), rtol=1e-6)


@pytest.mark.parametrize("name", ["dyt", "derf"])
def test_pointwise_modules_per_channel_equal_linen(name):
    m = N.make(name, 32, rngs=nnx.Rngs(0), per_channel=True, alpha_init=0.8)
    linen = L.make(name, per_channel=True, alpha_init=0.8)
    variables = linen.init(jax.random.key(0), X)
    assert jax.tree.map(np.shape, as_dict(nnx.state(m, nnx.Param))) == jax.tree.map(
        np.shape, dict(variables["params"])
    )
    params = randomize(dict(variables["params"]))
    m = N.make(name, 32, rngs=nnx.Rngs(0), per_channel=True)
    for k, v in params.items():
        getattr(m, k)[...] = v
    np.testing.assert_allclose(m(X), linen.apply({"params": params}, X), rtol=1e-6, atol=1e-6)
