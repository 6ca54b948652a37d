"""Float64 numpy helpers shared by the norm tests: finite-difference gradients of references.

The references themselves live next to their tests, each written from its paper's
formula; this module only differentiates them numerically, so the gradients we
compare against never come from JAX.
"""

import jax
import jax.numpy as jnp
import numpy as np


def numeric_grads(ref_fn, args, cotangent, h=1e-6):
    """Central finite differences of ``sum(ref_fn(*args) * cotangent)`` in float64.

    Returns one gradient array per entry of ``args`` (all float64 numpy arrays).
    """
    args = [np.array(a, np.float64) for a in args]
    cot = np.asarray(cotangent, np.float64)

    def loss():
        return float(np.sum(ref_fn(*args) * cot))

    grads = []
    for a in args:
        g = np.zeros_like(a)
        flat, gflat = a.reshape(-1), g.reshape(-1)
        for i in range(flat.size):
            old = flat[i]
            flat[i] = old + h
            up = loss()
            flat[i] = old - h
            down = loss()
            flat[i] = old
            gflat[i] = (up - down) / (2 * h)
        grads.append(g)
    return grads


def assert_grads_match(fn, ref_fn, args, *, seed=0, rtol=2e-3, atol=2e-4):
    """Gradients of ``sum(fn(*args) * r)`` (float32 JAX) vs finite differences of ``ref_fn``.

    ``r`` is a fixed random cotangent so every output element matters.
    """
    args32 = [jnp.asarray(a, jnp.float32) for a in args]
    out = jax.eval_shape(fn, *args32)
    cot = np.random.default_rng(seed).normal(size=out.shape)
    grads = jax.jit(
        jax.grad(
            lambda *a: jnp.sum(fn(*a) * jnp.asarray(cot, jnp.float32)),
            argnums=tuple(range(len(args))),
        )
    )(*args32)
    expected = numeric_grads(ref_fn, [np.asarray(a, np.float64) for a in args32], cot)
    for i, (g, e) in enumerate(zip(grads, expected, strict=True)):
        scale = max(1.0, float(np.abs(e).max()))
        np.testing.assert_allclose(
            np.asarray(g), e, rtol=rtol, atol=atol * scale, err_msg=f"gradient of argument {i}"
        )
