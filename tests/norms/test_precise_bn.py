"""PreciseBN: merged batch moments equal float64 statistics of the concatenated data."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from norms import batch_norm, init_batch_norm_state
from norms import linen as L
from norms.precise_bn import apply_recomputed_stats, recompute_batch_stats
from tests.norms.test_batch_norm import rand, ref_bn_train, ref_group_stats

C = 3


def uneven_batches():
    sizes = (5, 2, 8, 1)
    return [rand((n, 2, C), 10 + i, 3.0 * i, 1.0 + i) for i, n in enumerate(sizes)]


def test_uneven_batches_give_statistics_of_the_concatenation():
    state = init_batch_norm_state(C)
    masks = [
        np.random.default_rng(i).random((b.shape[0], 1, 1)) < 0.7
        for i, b in enumerate(uneven_batches())
    ]
    for m in masks:
        m[0] = True
    data = list(zip(uneven_batches(), masks, strict=True))

    @jax.jit
    def stats_fn(batch):
        x, m = batch
        _, _, moments = batch_norm(x, state, train=True, mask=m, return_batch_stats=True)
        return {"block": {"bn": moments._asdict()}}

    out = recompute_batch_stats(stats_fn, data)["block"]["bn"]
    all_x = np.concatenate([x for x, _ in data])
    all_m = np.concatenate([m for _, m in data])
    rm, rv, rc = ref_group_stats(all_x, all_m)
    np.testing.assert_allclose(out["mean"], rm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["var"], rv, rtol=1e-5)
    np.testing.assert_allclose(out["count"], rc)
    # num_batches keeps only the first batches
    first = recompute_batch_stats(stats_fn, data, num_batches=2)["block"]["bn"]
    rm2, rv2, _ = ref_group_stats(
        np.concatenate([x for x, _ in data[:2]]), np.concatenate([m for _, m in data[:2]])
    )
    np.testing.assert_allclose(first["var"], rv2, rtol=1e-5)


def test_apply_writes_states_and_flax_collections():
    batches = uneven_batches()
    state = init_batch_norm_state(C)
    stats_fn = jax.jit(lambda x: batch_norm(x, state, train=True, return_batch_stats=True)[2])
    rec = recompute_batch_stats(stats_fn, batches)
    rm, rv, rc = ref_group_stats(np.concatenate(batches))
    new_state = apply_recomputed_stats(state, rec)
    np.testing.assert_allclose(new_state.mean, rm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_state.var, rv, rtol=1e-5)
    assert int(new_state.count) == 1 and new_state.count.dtype == jnp.int32
    collection = {
        "a": {
            "mean": jnp.zeros(C),
            "var": jnp.ones(C),
            "count": jnp.array(0),
            "step": jnp.array(9),
        },
        "b": {"mean": jnp.ones(C)},
    }
    new = apply_recomputed_stats(collection, {"a": rec._asdict()}, unbiased=True)
    np.testing.assert_allclose(new["a"]["var"], rv * rc / (rc - 1), rtol=1e-5)
    assert int(new["a"]["step"]) == 9 and new["b"] is collection["b"]
    with pytest.raises(ValueError, match="c has recomputed statistics.*'a', 'b'"):
        apply_recomputed_stats(collection, {"c": rec._asdict()})


def test_synced_moments_over_8_devices_cover_every_device():
    batches = [rand((8, n, 2, C), 20 + i, float(i)) for i, n in enumerate((3, 1, 2))]
    state = init_batch_norm_state(C)
    stats_fn = jax.pmap(
        lambda x: batch_norm(x, state, train=True, axis_name="d", return_batch_stats=True)[2],
        axis_name="d",
    )
    rec = recompute_batch_stats(stats_fn, batches)
    rm, rv, rc = ref_group_stats(np.concatenate([b.reshape(-1, 2, C) for b in batches]))
    for d in range(8):
        np.testing.assert_allclose(rec.mean[d], rm, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rec.var[d], rv, rtol=1e-5)
    np.testing.assert_allclose(rec.count[0], rc)


def test_no_batches_is_an_error():
    with pytest.raises(ValueError, match="yielded no batch"):
        recompute_batch_stats(lambda b: b, [])


def test_flax_model_batch_moments_recompute_and_apply():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            x = L.BatchNorm(name="bn1")(x, train=train)
            x = nn.Dense(C, name="dense")(x)
            return L.BatchNorm(name="bn2")(x, train=train)

    model = Net()
    batches = uneven_batches()
    variables = model.init(jax.random.key(0), batches[0], train=False)

    @jax.jit
    def stats_fn(batch):
        _, state = model.apply(
            variables, batch, train=True, mutable=["batch_stats", "batch_moments"]
        )
        return state["batch_moments"]

    rec = recompute_batch_stats(stats_fn, batches)
    rm1, rv1, _ = ref_group_stats(np.concatenate(batches))
    np.testing.assert_allclose(rec["bn1"]["mean"], rm1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rec["bn1"]["var"], rv1, rtol=1e-5)
    dense = variables["params"]["dense"]
    k, b = np.float64(dense["kernel"]), np.float64(dense["bias"])
    h = np.concatenate([ref_bn_train(x)[0] @ k + b for x in batches])  # train-mode bn1 per batch
    rm2, rv2, _ = ref_group_stats(h)
    np.testing.assert_allclose(rec["bn2"]["mean"], rm2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rec["bn2"]["var"], rv2, rtol=1e-4)
    new_stats = apply_recomputed_stats(variables["batch_stats"], rec)
    np.testing.assert_allclose(new_stats["bn1"]["var"], rv1, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recomputed statistics count as updated
        model.apply({**variables, "batch_stats": new_stats}, batches[0], train=False)
