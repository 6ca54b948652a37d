"""Checks before a run reads any data or writes anything: the config, then the workdir.

``check_config`` validates the whole config (``plan.validate``, the optimizer
fields, the dataset name, augmentation, the divergence limit, and the model: built
and traced with ``jax.eval_shape`` at the dataset's image shape, so a norm that
does not fit the widths fails here). ``prepare_workdir`` makes sure the workdir
can be written, optionally clears it (``restart``), and compares the config with
the one saved in the newest checkpoint: a resumed run must train the same model
the same way, so any difference outside ``RESUME_FREE_KEYS`` (plus the run length
with ``extend``) fails in one line that lists the keys. Both raise ``ConfigError``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections

from nfnets.registry import create_model
from nfnets.training import outputs
from nfnets.training.augment import augment_from_config
from nfnets.training.checkpoints import Checkpointer
from nfnets.training.datasets import get_spec
from nfnets.training.optim import check_optimizer_config
from nfnets.training.plan import ConfigError, model_overrides, validate
from nfnets.training.step import init_variables

# Keys that may change when resuming: where data lives, what is logged / saved /
# evaluated, the device set-up. Everything else shapes the training itself.
RESUME_FREE_KEYS = (
    "data_dir",
    "log_every_steps",
    "eval_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "progress_bar",
    "tensorboard",
    "eval_batch_size",
    "precise_bn_batches",
    "max_consecutive_skipped_steps",
    "distributed.",
    # Same batches and the same state either way (tested), so a resume may switch:
    "parallelism",
    "input_pipeline",
    "data_workers",
    # Read only by a fresh run; a resume restores its checkpoint instead.
    "init_from",
    "init_exclude",
)
# Keys added to the schema after checkpoints were written without them, with the
# value that means what those checkpoints did: an older run resumes unchanged.
ADDED_KEYS = {"validation_examples": 0}
# The schedule's length, free under --extend (the schedule is re-derived anyway).
LENGTH_KEYS = ("num_epochs", "num_train_steps", "warmup_epochs")
CONFIG_FILE = "config.json"
OUTPUT_NAMES = (
    "checkpoints",
    "tensorboard",
    outputs.METRICS_FILE,
    outputs.SUMMARY_FILE,
    outputs.CURVES_FILE,
    CONFIG_FILE,
)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_model(config: ml_collections.ConfigDict) -> None:
    """Builds the model and traces its init (no compute) at the dataset's image shape."""
    spec = get_spec(config.dataset)
    size = config.image_size or spec.image_shape[0]
    kwargs = model_overrides(config, total_steps=1000)
    images = jax.ShapeDtypeStruct((1, size, size, spec.image_shape[2]), jnp.float32)
    try:
        model = create_model(config.model, num_classes=spec.num_classes, **kwargs)
        jax.eval_shape(lambda x: init_variables(model, jax.random.key(0), x), images)
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"config.model={config.model!r} with model_kwargs "
            f"{config.model_kwargs.to_dict()} cannot be built: {_first_line(e)}"
        ) from None


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Every check that needs neither data nor the workdir; raises ``ConfigError``."""
    validate(config, num_devices)
    try:
        get_spec(config.dataset)
    except ValueError as e:
        raise ConfigError(f"config.dataset={config.dataset!r}: {e}") from None
    try:
        check_optimizer_config(config)
    except ValueError as e:
        raise ConfigError(f"optimizer config: {e}") from None
    try:
        augment_from_config(config)
    except ValueError as e:
        raise ConfigError(f"config.augment: {e}") from None
    limit = config.max_consecutive_skipped_steps
    if not isinstance(limit, int) or limit < 0:
        raise ConfigError(
            f"config.max_consecutive_skipped_steps={limit!r}: give 0 (never stop) or a "
            "positive number of steps"
        )
    _check_model(config)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def config_differences(saved: dict, config: ml_collections.ConfigDict, *, extend: bool) -> list:
    """``[(key, saved value, new value)]`` for keys that may not change on resume."""
    old = {**ADDED_KEYS, **_flatten(saved)}
    new = _flatten(json.loads(config.to_json_best_effort()))
    free = RESUME_FREE_KEYS + (LENGTH_KEYS if extend else ())
    missing = "<absent>"
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b and not any(key == f or (f.endswith(".") and key.startswith(f)) for f in free):
            diffs.append((key, a, b))
    return diffs


def _ensure_writable(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"--workdir {workdir}: cannot create it ({e.strerror}); pass a writable directory"
        ) from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir {workdir} is not writable; pass a writable directory")


def clear_outputs(workdir: str) -> list[str]:
    """Deletes the run outputs (checkpoints, metrics, summary, ...) in ``workdir``; returns them."""
    removed = []
    for name in OUTPUT_NAMES:
        path = os.path.join(workdir, name)
        # Tolerant of files vanishing meanwhile (another program, or a user, deleting too).
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        else:
            continue
        removed.append(name)
    return removed


def prepare_workdir(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    restart: bool = False,
    extend: bool = False,
    writer: bool = True,
) -> int | None:
    """Checks ``workdir`` before anything is written to it; returns the checkpoint step or None.

    ``restart`` first deletes the previous run's outputs (only where ``writer``: with
    several processes, process 0 alone). Otherwise the newest checkpoint's config
    must match ``config`` (``config_differences``); a mismatch raises
    ``ConfigError`` and leaves the workdir (and its config.json) untouched.

    Reading a checkpoint runs orbax's cross-process barriers, so with several
    processes every one must find the same workdir here: the caller holds them all
    at a barrier after this call, before any of them writes to the workdir.
    """
    _ensure_writable(workdir)
    if restart:
        if writer:
            clear_outputs(workdir)
        return None
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        return None
    ckpt = Checkpointer(directory)
    try:
        step = ckpt.latest_step()
        meta = ckpt.read_meta(step) if step is not None else None
    finally:
        ckpt.close()
    if meta is None:
        return None
    diffs = config_differences(meta.get("config", {}), config, extend=extend)
    if diffs:
        shown = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, a, b in diffs[:6])
        more = f" (and {len(diffs) - 6} more)" if len(diffs) > 6 else ""
        raise ConfigError(
            f"{workdir} holds a checkpoint at step {step} trained with a different config "
            f"({shown}{more}); use a new --workdir, or pass the old config "
            f"(--config configs/from_workdir.py:{workdir}), or --restart to discard the run"
        )
    return step


__all__ = [
    "RESUME_FREE_KEYS",
    "check_config",
    "clear_outputs",
    "config_differences",
    "prepare_workdir",
]
