"""The run's plan: config checks and every value derived from the config, after overrides.

``validate(config, ...)`` raises ``ConfigError`` with a message naming the bad key,
its value and the fix; ``make_plan(config, ...)`` returns a ``Plan`` of every value
computed from the config (steps, per-device batch, device groups, EMA decay) so
nothing derived is ever stored in the config itself (an override of
``batch_size`` cannot leave a stale per-device batch behind). ``unknown_overrides``
and ``valid_keys`` explain a mistyped ``--config.<key>`` on the command line.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import math
import re
from collections.abc import Callable, Sequence

import jax
import ml_collections

import norms
from nfnets.training.optim import ema_decay_nfnet, schedule_steps
from nfnets.training.parallel import PARALLELISMS
from nfnets.training.pipeline import steps_per_epoch as full_batches_per_epoch
from norms.linen import STATEFUL_NORM_NAMES

SYNC_MODES = ("none", "all", "groups")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and the fix."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """Values computed from a config and the run's devices/data (never stored in the config).

    Attributes:
      num_devices: global device count (all processes).
      local_devices: this process's device count.
      process_count: number of processes.
      per_device_batch: batch_size / num_devices.
      local_batch: per-process batch (per_device_batch * local_devices).
      steps_per_epoch: num_train_examples // batch_size (last partial batch dropped).
      total_steps: num_train_steps, or round(num_epochs * steps_per_epoch).
      optimizer_config: the config as the optimizer sees it (num_epochs made
        consistent with total_steps).
      axis_index_groups: device groups for stateful norms, or None (all devices).
      model_kwargs: overrides for create_model (norm_kwargs with the sync axis added).
      ema_decay_fn: step -> decay, or None when EMA is off.
    """

    num_devices: int
    local_devices: int
    process_count: int
    per_device_batch: int
    local_batch: int
    steps_per_epoch: int
    total_steps: int
    optimizer_config: ml_collections.ConfigDict
    axis_index_groups: list[list[int]] | None
    model_kwargs: dict
    ema_decay_fn: Callable | None


def _err(key: str, value, fix: str) -> ConfigError:
    return ConfigError(f"config.{key}={value!r}: {fix}")


def parse_ema(value: str) -> Callable | None:
    """``config.ema`` -> decay function of the step, or None ("none")."""
    if value in ("none", "", None):
        return None
    if value == "nfnet":
        return ema_decay_nfnet
    try:
        decay = float(value)
    except ValueError:
        decay = math.nan
    if not 0.0 < decay < 1.0:
        raise _err("ema", value, 'use "none", "nfnet" or a fixed decay in (0, 1) such as "0.999"')
    return lambda step: decay


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Checks the values ``train`` relies on; errors name the key, the value and the fix."""
    if not isinstance(config.batch_size, int) or config.batch_size <= 0:
        raise _err("batch_size", config.batch_size, "give a positive integer")
    if config.batch_size % num_devices:
        lo = (config.batch_size // num_devices) * num_devices
        hi = lo + num_devices
        raise _err(
            "batch_size",
            config.batch_size,
            f"the global batch must divide by the {num_devices} devices "
            f"({config.batch_size} = {config.batch_size // num_devices} x {num_devices} "
            f"+ {config.batch_size % num_devices}); use e.g. --config.batch_size="
            f"{max(lo, num_devices)} or {hi}",
        )
    if not isinstance(config.eval_batch_size, int) or config.eval_batch_size <= 0:
        raise _err("eval_batch_size", config.eval_batch_size, "give a positive integer")
    if config.sync_batch_stats not in SYNC_MODES:
        raise _err("sync_batch_stats", config.sync_batch_stats, f"use one of {SYNC_MODES}")
    if config.sync_batch_stats == "groups":
        k = config.sync_group_size
        if not isinstance(k, int) or k < 1 or num_devices % k:
            raise _err(
                "sync_group_size",
                k,
                f"with sync_batch_stats='groups' give a group size that divides the "
                f"{num_devices} devices",
            )
    parallelism = config.get("parallelism", "pmap")
    if parallelism not in PARALLELISMS:
        raise _err("parallelism", parallelism, f"use one of {PARALLELISMS}")
    if config.dtype not in DTYPES:
        raise _err("dtype", config.dtype, f"use one of {DTYPES}")
    if config.num_epochs <= 0 and config.num_train_steps <= 0:
        raise _err("num_epochs", config.num_epochs, "set num_epochs > 0 or num_train_steps > 0")
    for key in ("log_every_steps",):
        if config[key] <= 0:
            raise _err(key, config[key], "give a positive number of steps")
    for key in ("eval_every_steps", "checkpoint_every_steps", "precise_bn_batches"):
        if config[key] < 0:
            raise _err(key, config[key], "give 0 (off / only at the end) or a positive number")
    if not isinstance(config.validation_examples, int) or config.validation_examples < 0:
        raise _err(
            "validation_examples",
            config.validation_examples,
            "give 0 (no validation split) or the number of training examples to hold out",
        )
    if config.keep_checkpoints < 1:
        raise _err("keep_checkpoints", config.keep_checkpoints, "keep at least 1")
    parse_ema(config.ema)


def device_groups(num_devices: int, group_size: int) -> list[list[int]]:
    """Consecutive device groups ``[[0..k-1], [k..2k-1], ...]`` for axis_index_groups."""
    return [list(range(i, i + group_size)) for i in range(0, num_devices, group_size)]


def _model_kwargs(config: ml_collections.ConfigDict, groups, axis_name: str) -> dict:
    """``create_model`` overrides: ``config.model_kwargs`` plus dtype and the sync axis."""
    model_kwargs = config.model_kwargs.to_dict()
    if "dtype" not in model_kwargs and config.dtype != "float32":
        import jax.numpy as jnp

        model_kwargs["dtype"] = getattr(jnp, config.dtype)
    if model_kwargs.get("norm") in STATEFUL_NORM_NAMES and config.sync_batch_stats != "none":
        norm_kwargs = dict(model_kwargs.get("norm_kwargs") or {})
        norm_kwargs["axis_name"] = axis_name
        if groups is not None:
            norm_kwargs["axis_index_groups"] = groups
        model_kwargs["norm_kwargs"] = norm_kwargs
    for key, value in list(model_kwargs.items()):
        if isinstance(value, list) and key in ("widths", "depths"):
            model_kwargs[key] = tuple(value)

    return model_kwargs


# batch_renorm's r_max / d_max may be the string "paper_scaled" in a config (a config
# cannot hold a function); the plan turns it into the schedule for the run's length.
PAPER_SCALED = "paper_scaled"
# The paper's ramp ends at 40k steps (r_max reaches 3); scaled, it ends halfway through.
_PAPER_RAMP_END = 40_000


def scaled_renorm_schedules(model_kwargs: dict, total_steps: int) -> dict:
    """``model_kwargs`` with ``norm_kwargs`` r_max / d_max = "paper_scaled" made schedules.

    The paper's schedule (Ioffe, 2017, Sec. 4; ``norms.paper_r_max`` /
    ``norms.paper_d_max``: plain batch norm for 5k steps, then linear ramps to
    d_max = 5 at 25k and r_max = 3 at 40k steps) with its steps scaled by
    ``total_steps / 80k``, so the ramps keep their proportions and end halfway
    through the run: batch norm for the first 1/16 of the steps, d_max = 5 at 5/16,
    r_max = 3 at 1/2.
    """
    norm_kwargs = dict(model_kwargs.get("norm_kwargs") or {})
    scaled = [k for k in ("r_max", "d_max") if norm_kwargs.get(k) == PAPER_SCALED]
    if not scaled:
        return model_kwargs
    factor = 2 * _PAPER_RAMP_END / max(int(total_steps), 1)
    paper = {"r_max": norms.paper_r_max, "d_max": norms.paper_d_max}
    for key in scaled:
        norm_kwargs[key] = functools.partial(_rescaled, paper[key], factor)
    return {**model_kwargs, "norm_kwargs": norm_kwargs}


def _rescaled(schedule: Callable, factor: float, step):
    return schedule(step * factor)


def model_overrides(
    config: ml_collections.ConfigDict, total_steps: int, groups=None, axis_name: str = "batch"
) -> dict:
    """``create_model`` overrides of ``config``: model_kwargs, dtype, the sync axis of
    stateful norms and the "paper_scaled" renorm schedules for ``total_steps``."""
    return scaled_renorm_schedules(_model_kwargs(config, groups, axis_name), total_steps)


def make_plan(
    config: ml_collections.ConfigDict,
    *,
    num_train_examples: int,
    num_devices: int | None = None,
    local_devices: int | None = None,
    process_count: int | None = None,
    axis_name: str = "batch",
) -> Plan:
    """Validates ``config`` and computes every derived value (see ``Plan``)."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    local_devices = jax.local_device_count() if local_devices is None else local_devices
    process_count = jax.process_count() if process_count is None else process_count
    validate(config, num_devices)
    try:
        steps_per_epoch = full_batches_per_epoch(num_train_examples, config.batch_size)
    except ValueError as e:
        raise _err("batch_size", config.batch_size, str(e)) from None
    if config.num_train_steps > 0:
        total_steps = int(config.num_train_steps)
    else:
        total_steps = max(1, round(config.num_epochs * steps_per_epoch))
    opt_config = ml_collections.ConfigDict(config.to_dict())
    opt_config.num_epochs = total_steps / steps_per_epoch
    try:
        schedule_steps(opt_config, steps_per_epoch)
    except ValueError as e:
        raise _err("warmup_epochs", config.warmup_epochs, f"{e}; lower warmup_epochs") from None

    groups = None
    if config.sync_batch_stats == "groups" and config.sync_group_size < num_devices:
        groups = device_groups(num_devices, config.sync_group_size)
    model_kwargs = model_overrides(config, total_steps, groups, axis_name)
    return Plan(
        num_devices=num_devices,
        local_devices=local_devices,
        process_count=process_count,
        per_device_batch=config.batch_size // num_devices,
        local_batch=config.batch_size // process_count,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        optimizer_config=opt_config,
        axis_index_groups=groups,
        model_kwargs=model_kwargs,
        ema_decay_fn=parse_ema(config.ema),
    )


_OVERRIDE = re.compile(r"^--?config\.([A-Za-z0-9_.]+)(=.*)?$")


def unknown_overrides(config: ml_collections.ConfigDict, argv: Sequence[str]) -> list[str]:
    """Dotted keys of ``--config.<key>[=value]`` arguments that ``config`` does not have."""
    bad = []
    for arg in argv:
        m = _OVERRIDE.match(arg)
        if not m:
            continue
        node = config
        for part in m.group(1).split("."):
            if isinstance(node, ml_collections.ConfigDict | dict) and part in node:
                node = node[part]
            else:
                bad.append(m.group(1))
                break
    return bad


_NORM_OVERRIDE = re.compile(r"^--?config\.model_kwargs\.norm_kwargs\.([A-Za-z_]\w*)=(.*)$")


def split_norm_overrides(argv: Sequence[str]) -> tuple[list[str], dict]:
    """``(other args, {key: value})`` for ``--config.model_kwargs.norm_kwargs.KEY=VALUE``.

    A norm's settings depend on the norm, so the config schema cannot declare them;
    these arguments are taken out before the config flags are parsed and applied
    by ``apply_norm_overrides``. VALUE is a Python literal (``8``, ``0.99``,
    ``"(0, 1)"``) or else a string; ``create_model`` rejects keys the norm lacks.
    """
    rest, found = [], {}
    for arg in argv:
        m = _NORM_OVERRIDE.match(arg)
        if not m:
            rest.append(arg)
            continue
        try:
            found[m.group(1)] = ast.literal_eval(m.group(2))
        except (ValueError, SyntaxError):
            found[m.group(1)] = m.group(2)
    return rest, found


def apply_norm_overrides(config: ml_collections.ConfigDict, values: dict) -> None:
    """Sets ``config.model_kwargs.norm_kwargs[key] = value`` for each item (in place)."""
    if not values:
        return
    with config.unlocked():
        if "norm_kwargs" not in config.model_kwargs:
            config.model_kwargs.norm_kwargs = ml_collections.ConfigDict()
        for key, value in values.items():
            config.model_kwargs.norm_kwargs[key] = value


def valid_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every dotted key of ``config`` (for error messages)."""
    keys = []
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(valid_keys(v, f"{prefix}{k}."))
        else:
            keys.append(f"{prefix}{k}")
    return keys
