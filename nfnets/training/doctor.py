"""The BN doctor: why batch norm broke a run's validation accuracy, layer by layer.

``diagnose(workdir)`` loads a run's ``config.json`` and latest checkpoint (finished
or interrupted) and rebuilds its data, model and device layout with the trainer
itself (:class:`nfnets.training.loop.Trainer`). It then

1. re-estimates the population statistics from ``batches`` training batches, with
   the run's augmentation and per-device batch layout (the trainer's PreciseBN,
   :func:`norms.recompute_batch_stats`);
2. compares them with the running averages per layer
   (:func:`norms.compare_batch_stats`: normalized mean shift and absolute log
   variance ratio, max and mean over channels, plus the update count);
3. evaluates the full test split, every example counted once, with (a) the running
   averages, (b) the PreciseBN statistics, (c) train-mode batch statistics at the
   run's normalization batch (the global eval split cut into training-sized
   batches, laid out over the devices as in training, so SyncBN, device groups
   and ghost batches normalize exactly as they did in training) and, where ghost
   batches or small normalization batches were used, (d) train-mode statistics at
   a few other batch sizes (ghost batches of that size on one device, the
   equivalent of any layout with that normalization batch);
4. names causes and fixes (:mod:`nfnets.training.doctor_report` holds the verdict
   rules and their thresholds, with the measurements they come from).

Train-mode evaluation: the last batch of the split is padded; the padding rows are
filled with real test images (cycled from the first batch) so they normalize like
real data, and only the real rows are scored. Dropout / stochastic depth are on in
train mode, as in training.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nfnets.registry import create_model
from nfnets.training import doctor_report
from nfnets.training.checkpoints import Checkpointer
from nfnets.training.evaluation import evaluate, masked_sums
from nfnets.training.loop import AXIS, Trainer
from nfnets.training.parallel import PER_DEVICE
from nfnets.training.pipeline import eval_iterator, shard_for_pmap
from nfnets.training.step import TrainState, model_variables, replicate
from norms import compare_batch_stats
from norms.linen import module_fields
from norms.running_stats import StaleStatisticsWarning, is_stats_node

NO_BATCH_STATS = "no batch statistics in this model: evaluation does not depend on the batch"
OTHER_SIZES = (2, 8, 32, 128, 512)  # candidate normalization batches for eval (d)
GHOST_EVAL_BATCH = 512  # examples per call when ghost batches emulate a size

PyTree = Any


class DoctorError(Exception):
    """The workdir cannot be diagnosed; the message is one line naming the fix."""


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's own ``config.json`` (written by the trainer when the run started)."""
    if not os.path.isdir(workdir):
        raise DoctorError(f"no such workdir {workdir!r}; pass the --workdir of a training run")
    path = os.path.join(workdir, "config.json")
    try:
        with open(path) as f:
            return ml_collections.ConfigDict(json.load(f))
    except FileNotFoundError:
        raise DoctorError(
            f"{path} is missing: {workdir!r} is not a training workdir (train.py writes "
            "config.json when a run starts)"
        ) from None
    except (OSError, ValueError) as e:
        raise DoctorError(f"cannot read {path}: {e}".replace("\n", " ")) from None


def restore_latest(trainer: Trainer) -> TrainState:
    """The host training state of the newest checkpoint in ``workdir/checkpoints``."""
    directory = os.path.join(os.path.abspath(trainer.workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise DoctorError(
            f"no checkpoint in {directory}: the run saved none yet (checkpoints are written "
            "every checkpoint_every_steps, at the end and on SIGTERM/SIGINT)"
        )
    ckpt = Checkpointer(directory, max_to_keep=max(1, trainer.config.keep_checkpoints))
    try:
        if ckpt.latest_step() is None:
            raise DoctorError(f"no complete checkpoint in {directory}; train (or resume) first")
        # The target's shapes from tracing the initializer (nothing compiled or run).
        shapes = jax.eval_shape(trainer.init_state)
        target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
        state, _ = ckpt.restore(target)
    except DoctorError:
        raise
    except Exception as e:  # noqa: BLE001 - orbax raises many types; report one line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DoctorError(f"cannot restore the checkpoint in {directory}: {msg}") from None
    finally:
        ckpt.close()
    return state


def norm_layers(model: nn.Module, variables: PyTree, image_shape) -> dict[str, nn.Module]:
    """``{"a/b": module}`` of the modules holding ``batch_stats``, in forward (depth) order.

    Found by intercepting the model's calls while tracing one eval-mode forward
    pass (``jax.eval_shape``: nothing is computed).
    """
    order: dict[str, nn.Module] = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and module.has_variable("batch_stats", "var"):
            order.setdefault("/".join(module.path), module.clone(parent=None))
        return next_fun(*args, **kwargs)

    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda v: model.apply(v, dummy, train=False), variables)
    return order


def normalization_batch(config, plan, layers: dict[str, nn.Module]) -> tuple[int, int | None]:
    """``(examples per normalization in training, ghost_batch_size or None)``.

    Per device the batch (or each ghost batch) is normalized on its own; SyncBN
    pools the same slot over every device of the sync group.
    """
    ghosts = {getattr(m, "ghost_batch_size", None) for m in layers.values()}
    ghost = next((g for g in ghosts if g), None)
    synced = {
        "none": 1,
        "all": plan.num_devices,
        "groups": min(config.sync_group_size or plan.num_devices, plan.num_devices),
    }[config.sync_batch_stats]
    return (ghost or plan.per_device_batch) * synced, ghost


def _with_real_padding(batches: Iterator[dict]) -> Iterator[dict]:
    """Eval batches whose padding rows hold real test images (cycled from the first batch)."""
    fill = None
    for batch in batches:
        mask = batch["mask"]
        if fill is None and mask.any():
            fill = batch["image"][mask].copy()
        if fill is not None and not mask.all():
            k = int((~mask).sum())
            batch["image"][~mask] = np.resize(fill, (k, *fill.shape[1:]))
        yield batch


def batch_stats_eval(trainer, model, variables, global_batch: int, devices) -> dict[str, float]:
    """Full-split eval in train mode (batch statistics), ``global_batch`` examples per call.

    ``variables`` are host variables; they are copied to ``devices`` and each
    batch is split over them as ``shard_for_pmap`` does for training.
    """

    def step(v, batch, rng):
        rng = jax.random.fold_in(rng, jax.lax.axis_index(AXIS))
        logits, _ = model.apply(
            v, batch["image"], train=True, rngs={"dropout": rng}, mutable=["batch_stats"]
        )
        return masked_sums(logits, batch, AXIS)

    p_step = jax.pmap(step, axis_name=AXIS, in_axes=(0, 0, None), devices=devices)
    rng = jax.random.fold_in(trainer.base_rng, 2**31 - 2)
    batches = eval_iterator(
        trainer.test_ds,
        global_batch_size=global_batch,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        image_size=trainer.config.eval_image_size or None,
    )
    sharded = (shard_for_pmap(b, len(devices)) for b in _with_real_padding(batches))
    return evaluate(
        lambda v, b: p_step(v, b, rng),
        replicate(variables, len(devices)),
        sharded,
        expected_count=len(trainer.test_ds),
    )


def _model_at_size(trainer: Trainer, size: int, ghost_ok: bool) -> tuple[nn.Module, int]:
    """The run's model normalizing every ``size`` examples on one device; its eval batch."""
    kwargs = dict(trainer.plan.model_kwargs)
    norm_kwargs = dict(kwargs.get("norm_kwargs") or {})
    norm_kwargs.pop("axis_name", None)
    norm_kwargs.pop("axis_index_groups", None)
    norm_kwargs.pop("ghost_batch_size", None)
    batch = size
    if ghost_ok:
        norm_kwargs["ghost_batch_size"] = size
        batch = size * max(1, GHOST_EVAL_BATCH // size)
    kwargs["norm_kwargs"] = norm_kwargs
    model = create_model(trainer.config.model, num_classes=trainer.info.num_classes, **kwargs)
    return model, batch


def other_sizes(norm_batch: int, num_test: int, sizes=None) -> list[int]:
    """The extra normalization batches of eval (d): ``sizes`` up to the split, minus the run's.

    ``sizes`` defaults to ``OTHER_SIZES``, read at call time.
    """
    sizes = OTHER_SIZES if sizes is None else sizes
    return [s for s in sizes if s != norm_batch and s <= num_test]


def _evaluations(trainer, p_state, precise, host_vars, layers, norm_batch, sizes) -> dict:
    p_vars = model_variables(p_state.params, p_state.batch_stats)
    with warnings.catch_warnings():
        # Never-updated statistics are a finding here, not a warning.
        warnings.simplefilter("ignore", StaleStatisticsWarning)
        running = trainer.evaluate(p_vars)
    out = {
        "running": _result(running),
        "precise_bn": _result(trainer.evaluate(model_variables(p_state.params, precise))),
    }
    devices = jax.local_devices()[: trainer.plan.local_devices]
    own = batch_stats_eval(trainer, trainer.model, host_vars, trainer.config.batch_size, devices)
    out["batch_stats"] = {**_result(own), "batch_size": norm_batch}
    ghost_ok = all("ghost_batch_size" in module_fields(type(m)) for m in layers.values())
    by_size = {}
    for size in sizes:
        model, batch = _model_at_size(trainer, size, ghost_ok)
        r = batch_stats_eval(trainer, model, host_vars, batch, jax.local_devices()[:1])
        by_size[str(size)] = _result(r)
    out["batch_stats_by_size"] = by_size
    return out


def _result(r: dict) -> dict[str, float]:
    return {"accuracy": float(r["accuracy"]), "loss": float(r["loss"]), "count": int(r["count"])}


def _layer_rows(running: PyTree, population: PyTree, order: list[str]) -> list[dict]:
    """Per-layer rows of ``compare_batch_stats`` plus the update count, in ``order``."""
    report = compare_batch_stats(running, population)
    counts = _counts(running)
    rank = {name: i for i, name in enumerate(order)}
    rows = [
        {
            "name": name,
            "mean_shift_max": r["mean_shift_max"],
            "mean_shift_mean": r["mean_shift_mean"],
            "var_log_ratio_max": r["var_log_ratio_max"],
            "var_log_ratio_mean": r["var_log_ratio_mean"],
            "count": counts[name],
        }
        for name, r in report.items()
    ]
    return sorted(rows, key=lambda row: rank.get(row["name"], len(rank)))


def _node(tree: PyTree, name: str):
    for key in name.split("/"):
        tree = tree[key]
    return tree


def _counts(tree: PyTree, prefix: str = "") -> dict[str, int]:
    if is_stats_node(tree):
        return {prefix: int(np.asarray(tree["count"]))}
    out = {}
    for key, sub in tree.items():
        out.update(_counts(sub, f"{prefix}/{key}" if prefix else str(key)))
    return out


def _at_init(running: PyTree, name: str) -> bool:
    """True when the layer still holds the initial statistics (mean 0, var 1) exactly."""
    node = _node(running, name)
    mean = np.asarray(node.get("mean", 0.0))
    return bool(np.all(mean == 0.0) and np.all(np.asarray(node["var"]) == 1.0))


def diagnose(workdir: str, *, batches: int = 50, sizes: tuple[int, ...] | None = None) -> dict:
    """Diagnoses the run in ``workdir``; returns the report (the content of doctor.json).

    Args:
      workdir: a training workdir with ``config.json`` and at least one checkpoint.
      batches: training batches for the PreciseBN re-estimate.
      sizes: normalization batch sizes for ``batch_stats_by_size``; given, they
        are all evaluated (except the run's own, which is ``batch_stats``, and
        sizes above the test split). Default: ``OTHER_SIZES``, evaluated only
        where the run had ghost batches or a small normalization batch.

    Returns ``{"layers": [...], "eval": {...}, "verdict": [str], "causes": [code],
    "run": {...}}`` (see :mod:`nfnets.training.doctor_report` for the codes).
    A model without running statistics gives ``verdict == [NO_BATCH_STATS]``,
    ``causes == ["no_batch_statistics"]`` and empty ``layers`` / ``eval``.

    Raises:
      DoctorError: missing or unreadable workdir, config or checkpoint.
    """
    if not isinstance(batches, int) or batches < 1:
        raise DoctorError(f"batches={batches!r}: give a positive number of training batches")
    config = load_run_config(workdir)
    config.precise_bn_batches = batches
    try:
        trainer = Trainer(config, workdir)
    except Exception as e:  # noqa: BLE001 - config errors, missing data: one line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DoctorError(f"cannot rebuild the run from its config.json: {msg}") from None
    state = restore_latest(trainer)
    if not jax.tree.leaves(state.batch_stats):
        return {
            "layers": [],
            "eval": {},
            "verdict": [NO_BATCH_STATS],
            "causes": ["no_batch_statistics"],
            "run": {"workdir": workdir, "step": int(state.step)},
        }
    host_vars = model_variables(state.params, state.batch_stats)
    layers = norm_layers(trainer.model, host_vars, trainer.image_shape)
    norm_batch, ghost = normalization_batch(config, trainer.plan, layers)
    p_state = trainer.put_state(state)
    precise = trainer.precise_bn(p_state)
    rows = _layer_rows(state.batch_stats, trainer.parallel.host(precise, PER_DEVICE), list(layers))
    run = _run_facts(workdir, config, trainer, state, layers, norm_batch, ghost, batches)
    run["layers_at_init"] = [r["name"] for r in rows if _at_init(state.batch_stats, r["name"])]
    if sizes is None:  # the default sizes only where the batch can matter
        relevant = doctor_report.batch_dependence_relevant(run)
        sizes = other_sizes(norm_batch, len(trainer.test_ds)) if relevant else []
    else:
        sizes = other_sizes(norm_batch, len(trainer.test_ds), sizes)
    evals = _evaluations(trainer, p_state, precise, host_vars, layers, norm_batch, sizes)
    causes, verdict = doctor_report.judge(rows, evals, run)
    return {"layers": rows, "eval": evals, "verdict": verdict, "causes": causes, "run": run}


def _run_facts(workdir, config, trainer, state, layers, norm_batch, ghost, batches) -> dict:
    momenta = sorted({float(getattr(m, "momentum", float("nan"))) for m in layers.values()})
    return {
        "workdir": workdir,
        "step": int(state.step),
        "total_steps": trainer.plan.total_steps,
        "finished": int(state.step) >= trainer.plan.total_steps,
        "momentum": momenta[-1],
        "norm": sorted({type(m).__name__ for m in layers.values()}),
        "normalization_batch": norm_batch,
        "ghost_batch_size": ghost,
        "batch_size": config.batch_size,
        "per_device_batch": trainer.plan.per_device_batch,
        "num_devices": trainer.plan.num_devices,
        "sync_batch_stats": config.sync_batch_stats,
        "precise_bn_batches": batches,
        "num_test": len(trainer.test_ds),
    }


__all__ = [
    "NO_BATCH_STATS",
    "DoctorError",
    "diagnose",
    "load_run_config",
    "norm_layers",
    "normalization_batch",
]
