"""SyncBN on 8 virtual devices equals one-device batch norm on the concatenated batch.

Both cross-device merges of norms.moments ("gather": one all_gather, "psum": two
constant-size all-reduces) are forced in turn with norms.default_sync_strategy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from norms import batch_norm, default_sync_strategy, init_batch_norm_state
from tests.norms.test_batch_norm import rand, ref_bn_train, ref_running

D, B, C = 8, 3, 4
STRATEGIES = ("gather", "psum")


def make_data(seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(D, B, 2, C)) * 2.0 + np.arange(D)[:, None, None, None]).astype(
        np.float32
    )  # every device has a different mean, so per-device stats would be wrong
    mask = rng.random((D, B, 1, 1)) < 0.6
    mask[:, 0] = True
    mask[2] = False  # one device contributes nothing at all
    cot = rng.normal(size=x.shape).astype(np.float32)
    scale = rng.normal(size=(C,)).astype(np.float32)
    bias = rng.normal(size=(C,)).astype(np.float32)
    return x, mask, cot, scale, bias


def per_device_step(x, mask, cot, scale, bias, state, axis_name, psum_param_grads=True):
    """Output, new state and gradients of sum(y * cot) over all devices.

    Under shard_map (varying-axis tracking) the cotangent of a replicated parameter is
    already summed over devices; under pmap/vmap it is per device and needs a psum.
    """

    def loss(x, scale, bias):
        y, st = batch_norm(
            x, state, scale, bias, train=True, axis_name=axis_name, mask=mask, momentum=0.8
        )
        return jnp.sum(y * cot), (y, st)

    (_, (y, st)), (gx, gs, gb) = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        x, scale, bias
    )
    if psum_param_grads:
        gs, gb = jax.lax.psum(gs, axis_name), jax.lax.psum(gb, axis_name)
    return y, st, gx, gs, gb


def one_device_reference(x, mask, cot, scale, bias):
    """Plain batch_norm on the concatenated batch (itself checked against float64 numpy)."""
    xf, mf, cf = (t.reshape((-1,) + t.shape[2:]) for t in (x, mask, cot))

    def loss(x, scale, bias):
        y, st = batch_norm(
            x, init_batch_norm_state(C), scale, bias, train=True, mask=mf, momentum=0.8
        )
        return jnp.sum(y * cf), (y, st)

    (_, (y, st)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(xf, scale, bias)
    return y, st, grads


def check_against_reference(y, st, gx, gs, gb, data):
    x, mask, cot, scale, bias = data
    ry, rst, (rgx, rgs, rgb) = one_device_reference(*data)
    np.testing.assert_allclose(np.asarray(y).reshape(ry.shape), ry, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gx).reshape(rgx.shape), rgx, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gs).reshape(-1, C)[0], rgs, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gb).reshape(-1, C)[0], rgb, rtol=1e-4, atol=1e-5)
    mean = np.asarray(st.mean).reshape(-1, C)
    for d in range(mean.shape[0]):
        np.testing.assert_allclose(mean[d], rst.mean, rtol=1e-5, atol=1e-6)
    # and the reference itself against float64 numpy on the union of valid examples
    _, stats = ref_bn_train(x.reshape(-1, 2, C), mask=mask.reshape(-1, 1, 1))
    rm, rv = ref_running(np.zeros(C), np.ones(C), stats, 0.8)
    np.testing.assert_allclose(rst.mean, rm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rst.var, rv, rtol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pmap_uneven_masks_match_one_big_batch_outputs_and_gradients(strategy):
    data = make_data(0)
    x, mask, cot, scale, bias = data
    state = init_batch_norm_state(C)
    f = jax.pmap(
        lambda x, m, c, s, b: per_device_step(x, m, c, s, b, state, "d"),
        axis_name="d",
        in_axes=(0, 0, 0, None, None),
    )
    with default_sync_strategy(strategy):
        out = f(x, mask, cot, scale, bias)
    check_against_reference(*out, data)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_shard_map_uneven_masks_match_one_big_batch_outputs_and_gradients(strategy):
    data = make_data(1)
    x, mask, cot, scale, bias = data
    state = init_batch_norm_state(C)
    mesh = jax.make_mesh((D,), ("d",))
    flat = [t.reshape((-1,) + t.shape[2:]) for t in (x, mask, cot)]

    def body(x, m, c, s, b):
        y, st, gx, gs, gb = per_device_step(x, m, c, s, b, state, "d", psum_param_grads=False)
        return y, jax.tree.map(lambda t: t[None], st), gx, gs[None], gb[None]

    f = jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P("d"), P("d"), P("d"), P(), P()),
            out_specs=(P("d"), P("d"), P("d"), P("d"), P("d")),
        )
    )
    flat = [jax.device_put(t, NamedSharding(mesh, P("d"))) for t in flat]
    rep = [jax.device_put(t, NamedSharding(mesh, P())) for t in (scale, bias)]
    with default_sync_strategy(strategy):
        out = f(*flat, *rep)
    check_against_reference(*out, data)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_vmap_axis_name_matches_one_big_batch(strategy):
    data = make_data(2)
    x, mask, cot, scale, bias = data
    state = init_batch_norm_state(C)
    f = jax.jit(
        jax.vmap(lambda x, m, c: per_device_step(x, m, c, scale, bias, state, "v"), axis_name="v")
    )
    with default_sync_strategy(strategy):
        out = f(x, mask, cot)
    check_against_reference(*out, data)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_axis_index_groups_give_per_group_batch_norm(strategy):
    x, mask, _, _, _ = make_data(3)
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    state = init_batch_norm_state(C)
    f = jax.pmap(
        lambda x, m: batch_norm(
            x, state, train=True, axis_name="d", axis_index_groups=groups, mask=m
        ),
        axis_name="d",
    )
    with default_sync_strategy(strategy):
        y, st = f(x, mask)
    for k, g in enumerate(groups):
        ry, stats = ref_bn_train(x[g].reshape(-1, 2, C), mask=mask[g].reshape(-1, 1, 1))
        np.testing.assert_allclose(np.asarray(y)[g].reshape(ry.shape), ry, rtol=1e-4, atol=1e-4)
        rm, rv = ref_running(np.zeros(C), np.ones(C), stats, 0.9)
        np.testing.assert_allclose(np.asarray(st.var)[g[-1]], rv, rtol=1e-5, err_msg=f"group {k}")


def test_sync_layer_emits_one_collective_in_the_forward_pass():
    state = init_batch_norm_state(C)
    f = jax.pmap(lambda x: batch_norm(x, state, train=True, axis_name="d"), axis_name="d")
    hlo = f.lower(jnp.ones((D, B, 2, C))).as_text()
    assert collectives(hlo) == ["all_gather"]  # "auto" on 8 devices


def collectives(hlo: str) -> list[str]:
    return [
        op
        for op in ("all_gather", "all_reduce", "reduce_scatter", "all_to_all")
        for _ in range(hlo.count(f'stablehlo.{op}"'))
    ]


@pytest.mark.parametrize(
    "strategy, fwd, fwd_bwd",
    [
        ("gather", ["all_gather"], ["all_gather", "all_reduce"]),
        ("psum", ["all_reduce"] * 2, ["all_reduce"] * 3),
    ],
)
def test_each_strategy_emits_its_collectives_forward_and_backward(strategy, fwd, fwd_bwd):
    """The backward pass adds one psum of (sum(ct), sum((x - mean) * ct)) either way."""
    state = init_batch_norm_state(C)

    def layer(x):
        return batch_norm(x, state, train=True, axis_name="d")[0]

    x = jnp.ones((D, B, 2, C))
    with default_sync_strategy(strategy):
        f_hlo = jax.pmap(layer, axis_name="d").lower(x).as_text()
        g = jax.grad(lambda x: jnp.sum(layer(x) ** 2))
        g_hlo = jax.pmap(g, axis_name="d").lower(x).as_text()
    assert collectives(f_hlo) == fwd
    assert collectives(g_hlo) == fwd_bwd


def test_ghost_batches_with_axis_name_pool_the_same_run_across_devices():
    x = rand((D, 4, C), 6, 1.0, 2.0) + np.arange(4, dtype=np.float32)[None, :, None]
    state = init_batch_norm_state(C)
    f = jax.pmap(
        lambda x: batch_norm(x, state, train=True, axis_name="d", ghost_batch_size=2),
        axis_name="d",
    )
    y, st = f(x)
    for j in range(2):  # ghost batch j = examples 2j, 2j+1 of every device
        run = x[:, 2 * j : 2 * j + 2].reshape(-1, C)
        ry, _ = ref_bn_train(run)
        np.testing.assert_allclose(
            np.asarray(y)[:, 2 * j : 2 * j + 2].reshape(-1, C), ry, rtol=1e-4, atol=1e-5
        )
    _, stats = ref_bn_train(
        np.concatenate([x[:, 0:2].reshape(-1, C), x[:, 2:4].reshape(-1, C)]), ghost=2 * D
    )
    rm, rv = ref_running(np.zeros(C), np.ones(C), stats, 0.9)
    np.testing.assert_allclose(np.asarray(st.var)[0], rv, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(st.mean)[5], rm, rtol=1e-5, atol=1e-6)
