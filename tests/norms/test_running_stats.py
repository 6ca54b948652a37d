"""norms.running_stats: the state's dtype, and sync_batch_stats against a float64 merge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import norms
from norms import init_batch_norm_state, sync_batch_stats
from norms.running_stats import BatchNormState
from tests.norms.test_batch_norm import ref_group_stats, ref_running

D, C = 8, 4


def ref_sync(means, vars_, counts):
    """Count-weighted union of per-device populations (float64)."""
    w = np.asarray(counts, np.float64)[:, None]
    if w.sum() == 0:
        w = np.ones_like(w)
    mean = (w * means).sum(0) / w.sum()
    var = (w * (vars_ + (means - mean) ** 2)).sum(0) / w.sum()
    return mean, var


def test_sync_batch_stats_is_count_weighted_union_for_states_and_collections():
    rng = np.random.default_rng(4)
    means = rng.normal(size=(D, C)).astype(np.float32)
    vars_ = rng.uniform(0.5, 2.0, (D, C)).astype(np.float32)
    counts = np.array([3, 0, 5, 5, 1, 2, 7, 3], np.int32)
    tree = {
        "layer": BatchNormState(jnp.asarray(means), jnp.asarray(vars_), jnp.asarray(counts)),
        "block": {"bn": {"mean": means, "var": vars_, "count": counts, "step": counts * 10}},
    }
    out = jax.pmap(lambda t: sync_batch_stats(t, "d"), axis_name="d")(tree)
    rm, rv = ref_sync(means, vars_, counts)
    for node in (out["layer"], out["block"]["bn"]):
        node = node._asdict() if hasattr(node, "_asdict") else node
        for d in range(D):
            np.testing.assert_allclose(node["mean"][d], rm, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(node["var"][d], rv, rtol=1e-5)
        assert np.asarray(node["count"]).tolist() == [7] * D
    np.testing.assert_array_equal(out["block"]["bn"]["step"], counts * 10)
    assert isinstance(out["layer"], BatchNormState)


def test_sync_batch_stats_with_no_updates_weighs_devices_equally():
    rng = np.random.default_rng(5)
    means = rng.normal(size=(D, C)).astype(np.float32)
    vars_ = np.ones((D, C), np.float32)
    st = BatchNormState(jnp.asarray(means), jnp.asarray(vars_), jnp.zeros((D,), jnp.int32))
    out = jax.pmap(lambda s: sync_batch_stats(s, "d"), axis_name="d")(st)
    rm, rv = ref_sync(means, vars_, np.zeros(D))
    np.testing.assert_allclose(out.mean[0], rm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.var[3], rv, rtol=1e-5)


def test_sync_batch_stats_outside_pmap_names_the_axis():
    with pytest.raises(ValueError, match="axis_name='batch'"):
        sync_batch_stats(init_batch_norm_state(3), "batch")


def test_init_state_dtype_is_the_running_statistics_dtype():
    assert norms.init_batch_norm_state(3).var.dtype == jnp.float32
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        x = rng.normal(1000.0, 1e-3, (5, 2, 3))  # float64; float32 would lose the spread
        state = norms.init_batch_norm_state(3, jnp.float64)
        rstate = norms.init_batch_renorm_state(3, jnp.float64)
        assert state.mean.dtype == rstate.var.dtype == jnp.float64
        _, new = norms.batch_norm(x, state, train=True, momentum=0.25)
        _, rnew = norms.batch_renorm(x, rstate, train=True, momentum=0.25)
        mean, var = ref_running(0.0, 1.0, [ref_group_stats(x)], 0.25)
        for st in (new, rnew):
            assert st.mean.dtype == st.var.dtype == jnp.float64
            np.testing.assert_allclose(st.mean, mean, rtol=1e-13)
            np.testing.assert_allclose(st.var, var, rtol=1e-12)
    with pytest.raises(ValueError, match="dtype=.*int32.*not a floating dtype"):
        norms.init_batch_norm_state(3, jnp.int32)


@pytest.mark.parametrize("strategy", ["gather", "psum"])
def test_sync_batch_stats_uses_the_shared_merge_with_either_strategy(strategy):
    rng = np.random.default_rng(6)
    means = rng.normal(size=(D, C)).astype(np.float32)
    vars_ = rng.uniform(0.5, 2.0, (D, C)).astype(np.float32)
    counts = np.array([3, 0, 5, 5, 0, 0, 0, 0], np.int32)  # group 2 never updated
    st = BatchNormState(jnp.asarray(means), jnp.asarray(vars_), jnp.asarray(counts))
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]

    def sync(s):
        return sync_batch_stats(s, "d", axis_index_groups=groups, sync_strategy=strategy)

    out = jax.pmap(sync, axis_name="d")(st)
    for g in groups:
        rm, rv = ref_sync(means[g], vars_[g], counts[g])
        for d in g:
            np.testing.assert_allclose(out.mean[d], rm, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(out.var[d], rv, rtol=1e-5)
            assert int(out.count[d]) == counts[g].max()
    hlo = jax.pmap(sync, axis_name="d").lower(st).as_text()
    # the counts' all_gather, then the merge: one all_gather or two psums (all_reduce)
    expected = {"gather": (2, 0), "psum": (1, 2)}[strategy]
    assert (hlo.count("stablehlo.all_gather"), hlo.count("stablehlo.all_reduce")) == expected
    with pytest.raises(ValueError, match="sync_strategy='bad'"):
        sync_batch_stats(st, "d", sync_strategy="bad")
