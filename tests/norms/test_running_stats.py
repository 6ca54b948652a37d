"""sync_batch_stats (norms.running_stats) against a float64 numpy merge of the devices' moments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from norms import init_batch_norm_state, sync_batch_stats
from norms.running_stats import BatchNormState

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
