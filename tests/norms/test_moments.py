"""norms.moments against float64 numpy: stability, masks, and both cross-device merges."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.collectives_bench import collective_ops
from norms import default_sync_strategy, moments
from tests.norms.numpy_refs import numeric_grads

moments_module = importlib.import_module("norms.moments")  # norms.moments is the function
STRATEGIES = ("gather", "psum")
COLLECTIVES = ("all_gather", "all_reduce", "reduce_scatter", "all_to_all")


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


def uneven_data(seed):
    """8 devices with different means and uneven masks; device 2 contributes nothing."""
    rng = np.random.default_rng(seed)
    x = rng.normal(5.0, 2.0, (8, 4, 3, 3, 5)) + np.arange(8)[:, None, None, None, None]
    mask = rng.random((8, 4, 1, 1, 1)) < 0.6
    mask[:, 0] = True
    mask[2] = False
    return x.astype(np.float32), mask


@pytest.mark.parametrize("strategy", (None, *STRATEGIES))
def test_pmap_uneven_masks_equal_one_big_batch(strategy):
    x, mask = uneven_data(3)
    f = jax.pmap(
        lambda x, m: moments(x, (0, 1, 2), axis_name="d", mask=m, sync_strategy=strategy),
        axis_name="d",
    )
    mean, var, count = f(x, mask)
    flat_x = x.reshape(32, 3, 3, 5)
    flat_m = mask.reshape(32, 1, 1, 1)
    rm, rv, rc = ref_moments(flat_x, (0, 1, 2), flat_m)
    for d in range(8):
        np.testing.assert_allclose(mean[d], rm, rtol=1e-5)
        np.testing.assert_allclose(var[d], rv, rtol=1e-5)
        np.testing.assert_array_equal(count[d], rc)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_shard_map_uneven_masks_equal_one_big_batch(strategy):
    x, mask = uneven_data(4)
    mesh = jax.make_mesh((8,), ("d",))
    flat_x, flat_m = x.reshape(32, 3, 3, 5), mask.reshape(32, 1, 1, 1)

    def body(x, m):
        stats = moments(x, (0, 1, 2), axis_name="d", mask=m, sync_strategy=strategy)
        return tuple(t[None] for t in stats)

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P("d")))
    sharded = [jax.device_put(t, NamedSharding(mesh, P("d"))) for t in (flat_x, flat_m)]
    mean, var, count = (np.asarray(t) for t in f(*sharded))
    rm, rv, rc = ref_moments(flat_x, (0, 1, 2), flat_m)
    for d in range(8):
        np.testing.assert_allclose(mean[d], rm, rtol=1e-5)
        np.testing.assert_allclose(var[d], rv, rtol=1e-5)
        np.testing.assert_array_equal(count[d], rc)


def ref_standardized(x, mask, eps=1e-3):
    """float64 ``(x - mean) / sqrt(var + eps)`` with masked statistics over axis 0."""
    mean, var, _ = ref_moments(x, (0,), mask)
    return (x - mean) / np.sqrt(var + eps)


def standardized(x, mask, axis_name, strategy, eps=1e-3):
    mean, var, _ = moments(x, 0, axis_name=axis_name, mask=mask, sync_strategy=strategy)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def small_uneven(seed):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(8, 2, 3)) + np.arange(8)[:, None, None]).astype(np.float32)
    mask = rng.random((8, 2, 1)) < 0.6
    mask[:, 0] = True
    mask[5] = False
    cot = rng.normal(size=x.shape)
    return x, mask, cot


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pmap_gradients_through_moments_equal_one_big_batch(strategy):
    """Autodiff through either merge: d(sum over devices of the loss) / dx vs finite diffs."""
    x, mask, cot = small_uneven(5)
    c32 = jnp.asarray(cot, jnp.float32)

    def per_device(x, m, c):
        return jax.grad(lambda x: jnp.sum(standardized(x, m, "d", strategy) * c))(x)

    g = jax.pmap(per_device, axis_name="d")(x, mask, c32)
    flat_m = mask.reshape(16, 1)
    (expected,) = numeric_grads(
        lambda x: ref_standardized(x, flat_m), [x.reshape(16, 3)], cot.reshape(16, 3)
    )
    np.testing.assert_allclose(np.asarray(g).reshape(16, 3), expected, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_shard_map_gradients_through_moments_equal_one_big_batch(strategy):
    x, mask, cot = small_uneven(6)
    mesh = jax.make_mesh((8,), ("d",))
    flat_x, flat_m, flat_c = x.reshape(16, 3), mask.reshape(16, 1), cot.reshape(16, 3)
    f = jax.shard_map(
        lambda x, m: standardized(x, m, "d", strategy),
        mesh=mesh,
        in_specs=(P("d"), P("d")),
        out_specs=P("d"),
    )
    c32 = jnp.asarray(flat_c, jnp.float32)
    xs, ms = (jax.device_put(t, NamedSharding(mesh, P("d"))) for t in (flat_x, flat_m))
    g = jax.jit(jax.grad(lambda x, m: jnp.sum(f(x, m) * c32)))(xs, ms)
    (expected,) = numeric_grads(lambda x: ref_standardized(x, flat_m), [flat_x], flat_c)
    np.testing.assert_allclose(np.asarray(g), expected, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_both_merges_are_stable_on_large_mean_small_std_across_devices(strategy):
    x = np.random.default_rng(7).normal(1e3, 1e-2, (8, 16, 4, 8)).astype(np.float32)
    f = jax.pmap(lambda x: moments(x, (0, 1), axis_name="d", sync_strategy=strategy), axis_name="d")
    mean, var, _ = f(x)
    rm, rv, _ = ref_moments(x.reshape(128, 4, 8), (0, 1))
    np.testing.assert_allclose(mean[0], rm, rtol=1e-6)
    # float32 holds a mean near 1e3 to 6e-5, which limits the between-device term.
    np.testing.assert_allclose(var[3], rv, rtol=1e-2)


def collectives_of(fn, x) -> list[str]:
    # A fresh wrapper each time: the default strategy is read when tracing, and pmap
    # would reuse its trace of the very same function.
    hlo = jax.pmap(lambda x: fn(x), axis_name="d").lower(x).as_text()
    return [op for op in COLLECTIVES for _ in range(hlo.count(f'stablehlo.{op}"'))]


def test_gather_is_one_all_gather_and_psum_two_constant_size_all_reduces():
    x = jnp.ones((8, 4, 2, 3))
    ops = {}
    for s in STRATEGIES:
        f = jax.pmap(lambda x, s=s: moments(x, (0, 1), axis_name="d", sync_strategy=s), "d")
        ops[s] = collective_ops(f.lower(x).as_text())
    # every device's stacked (count, mean, M2) for C = 3: 3 x 3 float32 from each of 8
    assert [(o["op"], o["group"], o["result_bytes"]) for o in ops["gather"]] == [
        ("all_gather", 8, 8 * 3 * 3 * 4)
    ]
    # (count, count * mean), then the centred M2: 2 x C and C numbers, no device axis
    assert [(o["op"], o["group"], o["operand_bytes"]) for o in ops["psum"]] == [
        ("all_reduce", 8, 2 * 3 * 4),
        ("all_reduce", 8, 3 * 4),
    ]


def test_auto_gathers_up_to_the_threshold_and_psums_above(monkeypatch):
    x = jnp.ones((8, 4, 3))
    fn = lambda x: moments(x, 0, axis_name="d")  # noqa: E731
    assert collectives_of(fn, x) == ["all_gather"]  # 8 devices <= GATHER_MAX_GROUP
    monkeypatch.setattr(moments_module, "GATHER_MAX_GROUP", 4)
    assert collectives_of(fn, x) == ["all_reduce", "all_reduce"]
    # With axis_index_groups the group size decides, not the axis size.
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    grouped = lambda x: moments(x, 0, axis_name="d", axis_index_groups=groups)  # noqa: E731
    assert collectives_of(grouped, x) == ["all_gather"]
    with default_sync_strategy("gather"):
        assert collectives_of(fn, x) == ["all_gather"]
    assert collectives_of(fn, x) == ["all_reduce", "all_reduce"]


def test_unknown_sync_strategy_error_names_the_choices():
    with pytest.raises(ValueError, match=r"sync_strategy='ring'.*'gather', 'psum'"):
        moments(jnp.ones((4, 3)), 0, sync_strategy="ring")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_axis_index_groups_give_per_group_statistics(strategy):
    x = np.arange(8 * 2 * 3, dtype=np.float32).reshape(8, 2, 3) ** 1.5
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    f = jax.pmap(
        lambda x: moments(x, 0, axis_name="d", axis_index_groups=groups, sync_strategy=strategy),
        axis_name="d",
    )
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
