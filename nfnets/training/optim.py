"""Optimizer for NF-ResNets/NFNets: a chain of optax pieces built from a config.

`make_optimizer(config, steps_per_epoch)` returns `(tx, lr_schedule)` where `tx` is

    optax.chain(
        optax.masked(adaptive_grad_clip(agc_clip), agc_mask),     # 1. AGC on raw grads
        optax.add_decayed_weights(weight_decay, weight_decay_mask), # 2. weight decay
        optax.sgd(lr_schedule, momentum, nesterov),               # 3. momentum, then -lr
    )

for `optimizer="sgd"`. This is the order of the NFNet reference (Brock et al., 2021,
deepmind-research/nfnets `optim.py`): AGC clips the raw gradient unit-wise, then
`weight_decay * param` is added to the clipped gradient (so the decay term is never
clipped and never part of the loss), then the heavy-ball / Nesterov momentum trace,
then the learning rate. For `optimizer="adamw"` the chain is AGC followed by
`optax.adamw` (Loshchilov & Hutter): Adam's moments see only the clipped gradient and
the masked decay `lr * weight_decay * param` is applied after the Adam scaling.

Config fields (see `default_optimizer_config()` for the defaults, which are the NFNet
ImageNet recipe of Brock et al., 2021, Sec. 4 and Appendix C):

    optimizer           "sgd" | "adamw"
    learning_rate       base learning rate for `lr_base_batch_size` examples; the peak
                        rate is `learning_rate * batch_size / lr_base_batch_size`
                        (linear scaling rule, NFNet: 0.1 * B / 256)
    lr_base_batch_size  256; 0 or None uses `learning_rate` as is (no batch scaling)
    batch_size          global batch size (all devices and hosts)
    num_epochs          training length; the schedule has
                        round(num_epochs * steps_per_epoch) steps
    warmup_epochs       linear warmup 0 -> peak over round(warmup_epochs * steps_per_epoch)
                        steps, then cosine decay to 0 at the last step
    momentum            SGD momentum (0 = plain SGD)
    nesterov            Nesterov momentum (SGD only; needs momentum > 0)
    weight_decay        decay coefficient, applied only where `weight_decay_mask` is True
                        (conv and dense kernels; never gains, biases or norm scales)
    adam_b1, adam_b2, adam_eps   AdamW moments (adamw only)
    agc_clip            AGC lambda; 0 or None disables AGC. NFNet: 0.01 at batch 4096,
                        smaller for larger batches
    agc_eps             AGC floor on the parameter norm (1e-3)
    agc_exclude         fnmatch patterns of parameters AGC leaves alone (default
                        ("head",): the classifier); see `agc_mask`
    label_smoothing     read by the training loss (`nfnets.training.losses`), not here

AGC and the two masks live in `nfnets.agc` (they belong to the NF method). Other
helpers: `ema_decay_nfnet` and `update_ema` (parameter EMA of the NFNet recipe).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from nfnets.agc import adaptive_grad_clip, agc_mask, check_nonneg, weight_decay_mask

OPTIMIZER_NAMES = ("sgd", "adamw")

PyTree = Any


def default_optimizer_config() -> ml_collections.ConfigDict:
    """The optimizer fields `make_optimizer` reads, set to the NFNet ImageNet recipe.

    Training configs copy or override these; a field missing from the config passed to
    `make_optimizer` takes the value here.
    """
    c = ml_collections.ConfigDict()
    c.optimizer = "sgd"
    c.learning_rate = 0.1
    c.lr_base_batch_size = 256
    c.batch_size = 4096
    c.num_epochs = 360.0
    c.warmup_epochs = 5.0
    c.momentum = 0.9
    c.nesterov = True
    c.weight_decay = 2e-5
    c.adam_b1 = 0.9
    c.adam_b2 = 0.999
    c.adam_eps = 1e-8
    c.agc_clip = 0.01
    c.agc_eps = 1e-3
    c.agc_exclude = ("head",)
    c.label_smoothing = 0.1
    return c


# --------------------------------------------------------------------------- schedule


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
    """Peak rate `learning_rate * batch_size / lr_base_batch_size` (as is if the base is 0)."""
    cfg = _with_defaults(config)
    lr, base, batch = cfg["learning_rate"], cfg["lr_base_batch_size"], cfg["batch_size"]
    check_nonneg("learning_rate", lr)
    if lr == 0:
        raise ValueError("learning_rate must be > 0, got 0")
    if not base:
        return float(lr)
    check_nonneg("lr_base_batch_size", base)
    if not isinstance(batch, int) or isinstance(batch, bool) or batch <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch!r}")
    return float(lr) * batch / base


def schedule_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> tuple[int, int]:
    """``(W, T)``: warmup and total steps, ``round(warmup_epochs * steps_per_epoch)`` and
    ``round(num_epochs * steps_per_epoch)``; errors unless ``0 <= W < T``."""
    cfg = _with_defaults(config)
    if (
        not isinstance(steps_per_epoch, int)
        or isinstance(steps_per_epoch, bool)
        or steps_per_epoch <= 0
    ):
        raise ValueError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch!r}")
    check_nonneg("num_epochs", cfg["num_epochs"])
    check_nonneg("warmup_epochs", cfg["warmup_epochs"])
    total = round(cfg["num_epochs"] * steps_per_epoch)
    warmup = round((cfg["warmup_epochs"] or 0) * steps_per_epoch)
    if total <= 0:
        raise ValueError(
            f"num_epochs * steps_per_epoch must give at least one step, got "
            f"{cfg['num_epochs']} * {steps_per_epoch}"
        )
    if warmup >= total:
        raise ValueError(
            f"warmup ({warmup} steps = {cfg['warmup_epochs']} epochs) must be "
            f"shorter than training ({total} steps = {cfg['num_epochs']} epochs)"
        )
    return warmup, total


def make_lr_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak rate, then cosine decay to 0 at the last step.

    With W, T from `schedule_steps`: lr(t) = peak * t / W for t < W, and
    lr(t) = peak * 0.5 * (1 + cos(pi * (t - W) / (T - W))) for W <= t <= T (0 after T).
    """
    cfg = _with_defaults(config)
    warmup, total = schedule_steps(cfg, steps_per_epoch)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_learning_rate(cfg),
        warmup_steps=warmup,
        decay_steps=total,
        end_value=0.0,
    )


# --------------------------------------------------------------------------- optimizer


def _with_defaults(config: ml_collections.ConfigDict | dict) -> dict:
    defaults = default_optimizer_config().to_dict()
    get = config.get
    return {k: get(k, v) for k, v in defaults.items()}


def check_optimizer_config(config: ml_collections.ConfigDict | dict) -> dict:
    """Checks every optimizer field that does not need the run's length; returns them.

    Raises ValueError naming the field, the value and the valid range.
    """
    cfg = _with_defaults(config)
    name = cfg["optimizer"]
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZER_NAMES)}")
    for key in ("momentum", "weight_decay", "agc_clip", "agc_eps", "adam_eps"):
        check_nonneg(key, cfg[key])
    if cfg["momentum"] is not None and cfg["momentum"] >= 1:
        raise ValueError(f"momentum must be in [0, 1), got {cfg['momentum']!r}")
    for key in ("adam_b1", "adam_b2"):
        check_nonneg(key, cfg[key])
        if cfg[key] >= 1:
            raise ValueError(f"{key} must be in [0, 1), got {cfg[key]!r}")
    peak_learning_rate(cfg)  # learning_rate > 0, a sane lr_base_batch_size
    if name == "sgd" and cfg["nesterov"] and not cfg["momentum"]:
        raise ValueError(
            "nesterov=True needs momentum > 0; set momentum (e.g. 0.9) or nesterov=False"
        )
    exclude = cfg["agc_exclude"] or ()
    if isinstance(exclude, str):
        raise ValueError(
            f"agc_exclude must be a tuple of patterns, got the string {exclude!r}; "
            f"write ({exclude!r},)"
        )
    return cfg


def make_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds `(tx, lr_schedule)` from the config fields listed in the module docstring.

    `tx.update(grads, state, params)` needs `params` (AGC and weight decay read them).
    """
    cfg = check_optimizer_config(config)
    name, exclude = cfg["optimizer"], cfg["agc_exclude"] or ()
    schedule = make_lr_schedule(cfg, steps_per_epoch)
    parts = []
    if cfg["agc_clip"]:
        parts.append(
            optax.masked(
                adaptive_grad_clip(cfg["agc_clip"], cfg["agc_eps"]),
                functools.partial(agc_mask, exclude=tuple(exclude)),
            )
        )
    wd = cfg["weight_decay"] or 0.0
    if name == "sgd":
        momentum = cfg["momentum"] or None
        if wd:
            parts.append(optax.add_decayed_weights(wd, mask=weight_decay_mask))
        parts.append(optax.sgd(schedule, momentum=momentum, nesterov=bool(cfg["nesterov"])))
    else:  # adamw
        parts.append(
            optax.adamw(
                schedule,
                b1=cfg["adam_b1"],
                b2=cfg["adam_b2"],
                eps=cfg["adam_eps"],
                weight_decay=wd,
                mask=weight_decay_mask,
            )
        )
    return optax.chain(*parts), schedule


# --------------------------------------------------------------------------- parameter EMA


def ema_decay_nfnet(step: jax.Array | int) -> jax.Array:
    """NFNet parameter-EMA decay `min(0.99999, (1 + t) / (10 + t))` at step t (0-based).

    Starts at 0.1 (the average follows the parameters closely early on) and grows to
    the cap 0.99999.
    """
    t = jnp.asarray(step, jnp.float32)
    return jnp.minimum(0.99999, (1.0 + t) / (10.0 + t))


def update_ema(ema_params: PyTree, params: PyTree, decay: jax.Array | float) -> PyTree:
    """`decay * ema + (1 - decay) * params`, leaf-wise.

    optax's `ema` transformation takes a fixed decay and averages updates, not
    parameters, so the step-dependent NFNet decay uses optax's Polyak-averaging helper
    `incremental_update(new, old, step_size=1 - decay)` directly on the parameters.
    """
    return optax.incremental_update(params, ema_params, 1.0 - jnp.asarray(decay, jnp.float32))
