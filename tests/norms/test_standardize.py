"""The shared closed-form JVP (norms.standardize) against float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from norms import batch_norm, init_batch_norm_state
from norms.standardize import Population, standardize


def ref_standardize(x, scale, bias, mask, axes, groups, eps):
    """float64 (y, mean, var) with statistics over ``axes`` (+ channel groups), masked."""
    x = np.asarray(x, np.float64)
    m = np.broadcast_to(mask, x.shape)
    c = x.shape[-1]
    g = c if groups is None else groups
    xg = x.reshape(x.shape[:-1] + (g, c // g))
    mg = m.reshape(xg.shape)
    red = tuple(axes) + (xg.ndim - 1,)
    count = mg.sum(axis=red, keepdims=True)
    mean = np.where(mg, xg, 0.0).sum(axis=red, keepdims=True) / count
    var = np.where(mg, (xg - mean) ** 2, 0.0).sum(axis=red, keepdims=True) / count
    y = ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias
    return y, mean[..., 0], var[..., 0]


CASES = {
    # batch norm: per channel over (N, H, W); group norm: per example and group of 2;
    # centred on the mean or from raw x (both must give the same derivatives).
    "batch": ((0, 1, 2), None, True),
    "batch raw": ((0, 1, 2), None, False),
    "grouped": ((1, 2), 2, False),
    "grouped centred": ((1, 2), 2, True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_and_forward_mode_derivatives_of_all_outputs_match_float64(case):
    axes, groups, centered = CASES[case]
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (3, 4, 2, 4)).astype(np.float32)
    s, b = (rng.normal(size=4).astype(np.float32) for _ in range(2))
    mask = rng.random((3, 4, 2, 1)) > 0.3
    mask[:, 0] = True  # every statistic keeps some values
    mask = np.broadcast_to(mask, x.shape)
    dirs = [rng.normal(size=t.shape).astype(np.float32) for t in (x, s, b)]
    pop = Population.of(axes, num_groups=groups, centered=centered)

    def ours(x, s, b):
        y, mean, var, _ = standardize(x, pop, s, b, eps=1e-3, mask=jnp.asarray(mask))
        return y, mean.reshape(-1), var.reshape(-1)

    def ref(t):
        moved = [np.float64(p) + t * np.float64(d) for p, d in zip((x, s, b), dirs, strict=True)]
        return [o.reshape(-1) for o in ref_standardize(*moved, mask, axes, groups, 1e-3)]

    outs, tangents = jax.jit(lambda p, t: jax.jvp(ours, p, t))((x, s, b), tuple(dirs))
    h = 1e-6
    for name, o, t, r, up, down in zip(
        ("y", "mean", "var"), outs, tangents, ref(0.0), ref(h), ref(-h), strict=True
    ):
        np.testing.assert_allclose(np.ravel(o), r, rtol=1e-4, atol=1e-4, err_msg=name)
        fd = (up - down) / (2 * h)
        np.testing.assert_allclose(
            np.ravel(t), fd, rtol=1e-3, atol=1e-3 * np.abs(fd).max(), err_msg=f"d {name}"
        )


def test_batch_norm_hessian_vector_product_with_mask_and_ghost_batches():
    rng = np.random.default_rng(1)
    x = rng.normal(1.0, 2.0, (4, 3, 2, 3)).astype(np.float32)
    s = rng.normal(1.0, 0.2, 3).astype(np.float32)
    mask = np.ones((4, 1, 1, 1), bool)
    mask[1] = False
    cot = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    state = init_batch_norm_state(3)

    def loss(x):
        y, _ = batch_norm(x, state, s, None, train=True, mask=mask, ghost_batch_size=2, eps=1e-3)
        return jnp.sum(y * cot) ** 2

    grad = jax.jit(jax.grad(loss))
    v = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    hvp = jax.jit(lambda x, v: jax.jvp(grad, (x,), (v,))[1])(x, v)
    e = 1e-2
    fd = (grad(x + e * v) - grad(x - e * v)) / (2 * e)
    np.testing.assert_allclose(hvp, fd, rtol=2e-2, atol=2e-2 * float(jnp.abs(fd).max()))


def test_sync_batch_norm_uses_one_collective_forward_and_one_backward():
    n = jax.device_count()
    x = jnp.ones((n, 2, 2, 3))
    state = init_batch_norm_state(3)

    def loss(x):
        return jnp.sum(batch_norm(x, state, train=True, axis_name="d")[0] ** 2)

    hlo = jax.pmap(jax.grad(loss), axis_name="d").lower(x[:, None]).as_text()
    counts = {op: hlo.count(f'stablehlo.{op}"') for op in ("all_gather", "all_reduce")}
    assert counts == {"all_gather": 1, "all_reduce": 1}, counts


def test_population_is_hashable_with_list_arguments():
    a = Population.of([0, 1], axis_name=["i"], axis_index_groups=[[0, 1], [2, 3]])
    b = Population.of((0, 1), axis_name=("i",), axis_index_groups=((0, 1), (2, 3)))
    assert a == b and hash(a) == hash(b)
