"""nfnets.agc (AGC and the parameter masks) against float64 numpy references and optax."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nfnets import agc

LAM = 0.01
EPS = 1e-3


# ----------------------------------------------------------------------------- references


def unit_norms_np(x: np.ndarray) -> np.ndarray:
    """Unit = output slice (last axis); vectors and scalars are one unit (Brock et al., 2021)."""
    x = np.asarray(x, np.float64)
    if x.ndim <= 1:
        return np.broadcast_to(np.sqrt(np.sum(x**2)), x.shape)
    axes = tuple(range(x.ndim - 1))
    return np.broadcast_to(np.sqrt(np.sum(x**2, axis=axes, keepdims=True)), x.shape)


def agc_np(g: np.ndarray, w: np.ndarray, lam: float, eps: float = EPS) -> np.ndarray:
    """If ||G_i|| > lam * max(||W_i||, eps): G_i *= lam * max(||W_i||, eps) / max(||G_i||, 1e-6)."""
    g = np.asarray(g, np.float64)
    gn, wn = unit_norms_np(g), unit_norms_np(w)
    max_norm = lam * np.maximum(wn, eps)
    return np.where(gn > max_norm, g * max_norm / np.maximum(gn, 1e-6), g)


def rand(key, shape, scale=1.0):
    return scale * jax.random.normal(key, shape, jnp.float32)


def make_params_and_grads(seed=0):
    """A model-shaped tree: stem conv, block with dense, 3D kernel and SkipInit, head."""
    shapes = {
        "stem": {"kernel": (3, 3, 3, 8), "gain": (8,), "bias": (8,)},
        "stage0": {
            "block0": {
                "conv1": {"kernel": (1, 1, 8, 4), "gain": (4,), "bias": (4,)},
                "se": {"kernel": (4, 6), "bias": (6,)},
                "conv1d": {"kernel": (3, 4, 5)},
                "skip_gain": (),
            }
        },
        "head": {"kernel": (8, 10), "bias": (10,)},
    }
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(jax.random.key(seed), 2 * len(leaves))
    params = [rand(keys[2 * i], s, 0.5) for i, s in enumerate(leaves)]
    # grads of mixed size: about half the units are above the clipping threshold.
    grads = [
        rand(keys[2 * i + 1], s) * (0.004 if i % 2 else 0.05) / math.sqrt(max(1, math.prod(s)))
        for i, s in enumerate(leaves)
    ]
    params, grads = jax.tree.unflatten(treedef, params), jax.tree.unflatten(treedef, grads)
    grads["head"] = jax.tree.map(lambda g: 100.0 * g, grads["head"])  # far above threshold
    return params, grads


# ----------------------------------------------------------------------------- AGC


def weights_and_grads(shape, seed=3):
    """Random W and G whose per-unit ratio ||G_i|| / ||W_i|| spans the threshold LAM."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    w = rand(k1, shape)
    n_units = shape[-1] if shape else 1
    scale = jnp.geomspace(0.1, 10.0, n_units) * LAM / math.sqrt(max(1, math.prod(shape[:-1])))
    return w, rand(k2, shape) * scale.reshape(shape[-1:] if shape else ())


@pytest.mark.parametrize("shape", [(5, 3), (3, 3, 4, 6), (2, 2, 2, 3, 4), (7,), ()])
def test_optax_default_axes_match_design_for_standard_layouts(shape):
    w, g = weights_and_grads(shape)
    out, _ = optax.adaptive_grad_clip(LAM, eps=EPS).update(g, optax.EmptyState(), w)
    np.testing.assert_allclose(out, agc_np(g, w, LAM), rtol=2e-5, atol=1e-9)


@pytest.mark.parametrize("shape", [(3, 4, 5), (1, 6), (1, 1, 1, 6)])
def test_optax_default_axes_differ_from_design_where_the_wrapper_passes_axes(shape):
    # rank 3: optax assumes multi-head dense (axis 0 only); size-1 fan-in: optax squeezes
    # the kernel to a vector and clips it as one unit.
    w, g = weights_and_grads(shape)
    out, _ = optax.adaptive_grad_clip(LAM, eps=EPS).update(g, optax.EmptyState(), w)
    assert not np.allclose(out, agc_np(g, w, LAM), rtol=1e-3)
    assert agc.agc_unit_axes(shape) == tuple(range(len(shape) - 1))


@pytest.mark.parametrize(
    "shape", [(5, 3), (3, 3, 4, 6), (3, 4, 5), (2, 2, 2, 3, 4), (1, 6), (1, 1, 1, 6), (7,), ()]
)
def test_adaptive_grad_clip_matches_numpy_reference(shape):
    w, g = weights_and_grads(shape)
    out, _ = agc.adaptive_grad_clip(LAM, EPS).update(g, optax.EmptyState(), w)
    out, g, w = np.asarray(out), np.asarray(g), np.asarray(w)
    np.testing.assert_allclose(out, agc_np(g, w, LAM), rtol=2e-5, atol=1e-9)
    wn = unit_norms_np(w)
    assert np.all(unit_norms_np(out) <= LAM * np.maximum(wn, EPS) * (1 + 1e-5))
    unclipped = unit_norms_np(g) <= LAM * np.maximum(wn, EPS)
    np.testing.assert_array_equal(out[unclipped], g[unclipped])
    if len(shape) >= 2:  # units on both sides of the threshold
        assert unclipped.any() and not unclipped.all()


def test_agc_zero_weights_use_eps_floor():
    w = jnp.zeros((4, 3))
    g = jnp.ones((4, 3))
    out, _ = agc.adaptive_grad_clip(LAM, EPS).update(g, optax.EmptyState(), w)
    np.testing.assert_allclose(np.linalg.norm(out, axis=0), LAM * EPS, rtol=1e-5)


def test_agc_needs_params():
    with pytest.raises(ValueError, match="needs params"):
        agc.adaptive_grad_clip(LAM).update({"a": jnp.ones(3)}, optax.EmptyState())


def test_masks():
    params, _ = make_params_and_grads()
    m = agc.agc_mask(params)
    assert m["head"] == {"kernel": False, "bias": False}
    assert all(jax.tree.leaves(m["stem"])) and all(jax.tree.leaves(m["stage0"]))
    m = agc.agc_mask({"params": params}, exclude=("stage*/block0/se/*", "stem"))
    assert m["params"]["stage0"]["block0"]["se"] == {"kernel": False, "bias": False}
    assert m["params"]["stage0"]["block0"]["conv1"]["kernel"] and m["params"]["head"]["kernel"]
    assert not any(jax.tree.leaves(m["params"]["stem"]))
    with pytest.raises(TypeError, match=r"\('head',\)"):
        agc.agc_mask(params, exclude="head")

    wd = agc.weight_decay_mask(params)
    kernels = {
        "/".join(str(k.key) for k in path)
        for path, v in jax.tree_util.tree_leaves_with_path(wd)
        if v
    }
    assert kernels == {
        "stem/kernel",
        "stage0/block0/conv1/kernel",
        "stage0/block0/se/kernel",
        "stage0/block0/conv1d/kernel",
        "head/kernel",
    }
