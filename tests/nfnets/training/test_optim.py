"""nfnets.training.optim (chain, schedule, EMA) against float64 numpy references and optax."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from nfnets import agc
from nfnets.training import optim
from tests.nfnets.test_agc import EPS, LAM, agc_np, make_params_and_grads, unit_norms_np


def config(**kw):
    c = optim.default_optimizer_config()
    c.update(kw)
    return c


def test_sgd_chain_clips_all_but_head_and_decays_only_kernels():
    params, grads = make_params_and_grads()
    wd = 1e-2
    cfg = config(
        optimizer="sgd", learning_rate=1.0, lr_base_batch_size=0, num_epochs=1.0,
        warmup_epochs=0.0, momentum=0.0, nesterov=False, weight_decay=wd, agc_clip=LAM,
    )  # fmt: skip
    tx, schedule = optim.make_optimizer(cfg, steps_per_epoch=10)
    assert float(schedule(0)) == pytest.approx(1.0)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)

    def expected(path, g, w):
        names = [str(k.key) for k in path]
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        clipped = g if names[0] == "head" else agc_np(g, w, LAM)
        decay = wd * w if names[-1] == "kernel" else 0.0
        return -(clipped + decay)

    ref = jax.tree_util.tree_map_with_path(expected, grads, params)
    chex.assert_trees_all_close(updates, ref, rtol=2e-5, atol=1e-9)
    # the head is untouched by AGC even though its gradient is above the threshold
    head_g, head_w = np.asarray(grads["head"]["kernel"]), np.asarray(params["head"]["kernel"])
    assert np.any(unit_norms_np(head_g) > LAM * unit_norms_np(head_w))
    # every clipped parameter satisfies the bound after the step (before decay)
    for path, g in jax.tree_util.tree_leaves_with_path(updates):
        names = [str(k.key) for k in path]
        if names[0] == "head":
            continue
        w = np.asarray(params[names[0]] if len(names) == 1 else _get(params, names))
        clipped = -np.asarray(g, np.float64) - (wd * w if names[-1] == "kernel" else 0.0)
        assert np.all(unit_norms_np(clipped) <= LAM * np.maximum(unit_norms_np(w), EPS) * 1.0001)
    # some units were clipped and some were not, so both branches are exercised
    g_all = jax.tree.leaves(grads)
    w_all = jax.tree.leaves(params)
    ratios = np.concatenate(
        [
            (unit_norms_np(g) / np.maximum(unit_norms_np(w), EPS)).ravel()
            for g, w in zip(g_all, w_all, strict=True)
        ]
    )
    assert np.any(ratios > LAM) and np.any(ratios < LAM)


def _get(tree, names):
    for n in names:
        tree = tree[n]
    return tree


def test_schedule_warmup_then_cosine_to_zero():
    cfg = config(learning_rate=0.1, batch_size=512, lr_base_batch_size=256,
                 num_epochs=10.0, warmup_epochs=2.0)  # fmt: skip
    _, schedule = optim.make_optimizer(cfg, steps_per_epoch=10)
    peak, w, t_total = 0.2, 20, 100
    steps = np.arange(0, 106)
    ref = np.where(
        steps < w,
        peak * steps / w,
        peak * 0.5 * (1 + np.cos(np.pi * np.clip(steps - w, 0, t_total - w) / (t_total - w))),
    )
    got = np.array([float(schedule(s)) for s in steps])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-8)
    assert got[w] == pytest.approx(peak) and got[t_total] == pytest.approx(0.0, abs=1e-9)


def test_nesterov_sgd_two_steps_by_hand():
    params, grads = make_params_and_grads(seed=4)
    lr_peak, m, wd = 0.3, 0.9, 1e-3
    cfg = config(
        optimizer="sgd", learning_rate=lr_peak, lr_base_batch_size=0, num_epochs=2.0,
        warmup_epochs=1.0, momentum=m, nesterov=True, weight_decay=wd, agc_clip=0.0,
    )  # fmt: skip
    tx, schedule = optim.make_optimizer(cfg, steps_per_epoch=4)
    state = tx.init(params)
    p = params
    ref_p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    ref_buf = jax.tree.map(np.zeros_like, ref_p)
    mask = agc.weight_decay_mask(params)
    for step in range(3):
        lr = lr_peak * step / 4  # warmup: 0, 0.075, 0.15
        assert float(schedule(step)) == pytest.approx(lr)
        updates, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, updates)
        gd = jax.tree.map(
            lambda g, w, k: np.asarray(g, np.float64) + (wd * w if k else 0.0), grads, ref_p, mask
        )
        ref_buf = jax.tree.map(lambda b, g: m * b + g, ref_buf, gd)
        ref_p = jax.tree.map(lambda w, g, b, lr=lr: w - lr * (g + m * b), ref_p, gd, ref_buf)
    chex.assert_trees_all_close(p, ref_p, rtol=1e-5, atol=1e-7)


def test_adamw_first_step_by_hand():
    params, grads = make_params_and_grads(seed=5)
    cfg = config(optimizer="adamw", learning_rate=1e-2, lr_base_batch_size=0, num_epochs=1.0,
                 warmup_epochs=0.0, weight_decay=0.1, agc_clip=0.0)  # fmt: skip
    tx, _ = optim.make_optimizer(cfg, steps_per_epoch=5)
    updates, _ = tx.update(grads, tx.init(params), params)
    mask = agc.weight_decay_mask(params)
    # step 1: bias-corrected moments are g and g^2, so the Adam direction is g/(|g|+eps)
    ref = jax.tree.map(
        lambda g, w, k: -1e-2
        * (np.asarray(g, np.float64) / (np.abs(g) + 1e-8) + (0.1 * np.asarray(w) if k else 0.0)),
        grads, params, mask,
    )  # fmt: skip
    chex.assert_trees_all_close(updates, ref, rtol=1e-4, atol=1e-7)


def test_config_validation():
    with pytest.raises(ValueError, match="valid names: sgd, adamw"):
        optim.make_optimizer(config(optimizer="lamb"), 10)
    with pytest.raises(ValueError, match="learning_rate must be >= 0, got -0.1"):
        optim.make_optimizer(config(learning_rate=-0.1), 10)
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        optim.make_optimizer(config(weight_decay=-1e-5), 10)
    with pytest.raises(ValueError, match="momentum must be in"):
        optim.make_optimizer(config(momentum=1.0), 10)
    with pytest.raises(ValueError, match="nesterov=True needs momentum"):
        optim.make_optimizer(config(momentum=0.0, nesterov=True), 10)
    with pytest.raises(ValueError, match="warmup .* must be shorter"):
        optim.make_optimizer(config(num_epochs=2.0, warmup_epochs=2.0), 10)
    with pytest.raises(ValueError, match="steps_per_epoch must be a positive integer"):
        optim.make_optimizer(config(), 0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        optim.make_optimizer(config(batch_size=0), 10)
    with pytest.raises(ValueError, match="agc_exclude must be a tuple"):
        optim.make_optimizer(ml_collections.ConfigDict({"agc_exclude": "head"}), 10)
    # fields missing from a training config take the recipe defaults
    minimal = ml_collections.ConfigDict({"optimizer": "sgd", "batch_size": 256})
    tx, schedule = optim.make_optimizer(minimal, steps_per_epoch=3)
    assert float(schedule(15)) == pytest.approx(0.1)  # peak 0.1 * 256 / 256 after 5 epochs


# ----------------------------------------------------------------------------- EMA


def test_ema_decay_and_update():
    for t in (0, 1, 9, 1000, 10**6, 10**7):
        assert float(optim.ema_decay_nfnet(t)) == pytest.approx(
            min(0.99999, (1 + t) / (10 + t)), rel=1e-6
        )
    assert float(optim.ema_decay_nfnet(0)) == pytest.approx(0.1)
    ema = {"a": jnp.ones((3,)), "b": {"c": jnp.zeros((2, 2))}}
    p = {"a": jnp.full((3,), 3.0), "b": {"c": jnp.full((2, 2), -2.0)}}
    out = jax.jit(optim.update_ema)(ema, p, optim.ema_decay_nfnet(5))
    d = 6 / 15
    chex.assert_trees_all_close(
        out, {"a": np.full(3, d + (1 - d) * 3.0), "b": {"c": np.full((2, 2), (1 - d) * -2.0)}},
        rtol=1e-6,
    )  # fmt: skip
