"""The training loop: config -> data, model, optimizer -> parallel steps -> periodic actions.

``train(config, workdir)`` runs (or resumes) one experiment and returns the summary
dict it also writes to ``workdir/summary.json``. Outputs in ``workdir``:
``checkpoints/`` (orbax), ``metrics.jsonl``, ``tensorboard/``, ``summary.json``,
``training_curves.png``, ``config.json``.

Data parallelism (``config.parallelism``, :mod:`nfnets.training.parallel`):
``"pmap"`` (``jax.pmap`` over this process's devices) or ``"shard_map"``
(``jax.jit(jax.shard_map(...))`` over global arrays), both with axis ``"batch"``;
with several processes (``jax.distributed``) the axis spans every device of every
process and each process feeds its own slice of the global batch. Exact resume:
the state (including the metric sums since the last log) is checkpointed, the data
iterator restarts at the checkpoint's step, and per-step randomness is
``fold_in(seed key, step, device)``, so a resumed run continues exactly as an
uninterrupted one. After each step the loop runs the named actions of
:mod:`nfnets.training.actions` (log, progress, evaluate, checkpoint, stop).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
from jax.experimental import multihost_utils

from nfnets.registry import create_model
from nfnets.training import actions as actions_lib
from nfnets.training import health, outputs
from nfnets.training.checkpoints import Checkpointer
from nfnets.training.datasets import load_dataset, split_validation
from nfnets.training.evaluation import evaluate, make_eval_step, make_precise_bn
from nfnets.training.grain_pipeline import make_train_iterator
from nfnets.training.init import check_init_from, init_from_pretrained
from nfnets.training.optim import make_optimizer
from nfnets.training.parallel import (
    BATCH,
    PER_DEVICE,
    REPLICATED,
    make_parallel,
    pack_metric_sums,
    state_kinds,
    unpack_metric_sums,
    variable_kinds,
)
from nfnets.training.pipeline import eval_iterator, prefetch
from nfnets.training.plan import ConfigError, make_plan
from nfnets.training.preflight import check_config, prepare_workdir
from nfnets.training.step import TrainState, create_train_state, make_train_step, model_variables
from norms import sync_batch_stats

AXIS = "batch"
PyTree = Any


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> bool:
    """Calls ``jax.distributed.initialize`` when the config or the environment asks for it.

    Asked for by ``config.distributed.initialize`` or the environment variable
    ``JAX_COORDINATOR_ADDRESS``. Empty / negative config values are left to JAX's
    auto-detection (SLURM, TPU pods, ...). On CPU, ``cpu_collectives`` ("gloo")
    lets the processes run collectives with each other. Returns True if it
    initialized (or the runtime already was).
    """
    dist = config.distributed
    if not (dist.initialize or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        return False
    if jax.distributed.is_initialized():
        return True
    if dist.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
    kwargs = {}
    if dist.coordinator_address:
        kwargs["coordinator_address"] = dist.coordinator_address
    if dist.num_processes > 0:
        kwargs["num_processes"] = dist.num_processes
    if dist.process_id >= 0:
        kwargs["process_id"] = dist.process_id
    jax.distributed.initialize(**kwargs)
    return True


def load_data(config: ml_collections.ConfigDict):
    """(train, validation or None, test) datasets.

    ``config.validation_examples`` > 0 holds that many training examples out as the
    validation split (``datasets.split_validation``: the same examples for every
    run). A missing dataset raises with the command that prepares it.
    """
    data_dir = config.data_dir or None
    train_ds = load_dataset(config.dataset, split="train", data_dir=data_dir)
    test_ds = load_dataset(config.dataset, split="test", data_dir=data_dir)
    try:
        train_ds, val_ds = split_validation(train_ds, config.validation_examples)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None
    return train_ds, val_ds, test_ds


class Trainer:
    """The data, model, compiled steps and evaluations of one run; ``run`` drives it."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config = config
        self.workdir = workdir
        self.is_writer = jax.process_index() == 0
        self.train_ds, self.val_ds, self.test_ds = load_data(config)
        self.info = self.train_ds.info
        self.plan = make_plan(config, num_train_examples=len(self.train_ds), axis_name=AXIS)
        p = self.plan
        self.model = create_model(config.model, num_classes=self.info.num_classes, **p.model_kwargs)
        self.tx, self.schedule = make_optimizer(p.optimizer_config, p.steps_per_epoch)
        self.init_rng, self.base_rng = jax.random.split(jax.random.key(config.seed))
        size = config.image_size or self.info.image_shape[0]
        self.image_shape = (size, size, self.info.image_shape[2])
        step = make_train_step(
            self.model,
            self.tx,
            label_smoothing=config.label_smoothing,
            ema_decay_fn=p.ema_decay_fn,
            axis_name=AXIS,
        )
        self._compile(step)

    def _compile(self, step) -> None:
        """The mapped train step, eval steps, stats merge and metric read-out."""
        par = self.parallel = make_parallel(self.config.get("parallelism", "pmap"), AXIS)
        kinds = self.kinds = state_kinds(TrainState)
        self.train_step = par.map(step, (kinds, BATCH, REPLICATED), kinds, donate_argnums=(0,))
        self.step_rng = par.put(self.base_rng, REPLICATED)  # placed once, not every step
        eval_step = make_eval_step(self.model, AXIS)
        self._eval_steps = {
            bs: par.map(eval_step, (variable_kinds(dict.fromkeys(bs)), BATCH), REPLICATED)
            for bs in (("params",), ("params", "batch_stats"))
        }
        sync = lambda bs: sync_batch_stats(bs, AXIS)
        self._sync = par.map(sync, (PER_DEVICE,), PER_DEVICE)
        self._read_metrics = par.map(pack_metric_sums, (REPLICATED,), (REPLICATED, REPLICATED))

    def put_state(self, state: TrainState) -> TrainState:
        """Host state -> the device layout of the parallel path."""
        return self.parallel.put(state, self.kinds)

    def host_state(self, p_state: TrainState) -> TrainState:
        """The first local device's copy of the state, as numpy (no cross-device gather)."""
        return self.parallel.host(p_state, self.kinds)

    def read_metrics(self, p_state: TrainState) -> tuple[TrainState, dict[str, float]]:
        """``(state with zeroed metric sums, host sums)``: one small array leaves the device."""
        packed, zeros = self._read_metrics(p_state.metric_sums)
        sums = unpack_metric_sums(self.parallel.host(packed, REPLICATED), p_state.metric_sums)
        return p_state.replace(metric_sums=zeros), sums

    def init_state(self) -> TrainState:
        return create_train_state(
            self.model,
            self.tx,
            self.init_rng,
            self.image_shape,
            use_ema=self.plan.ema_decay_fn is not None,
        )

    def sync_stats(self, p_state: TrainState) -> TrainState:
        """Running statistics merged across all devices (see norms.sync_batch_stats)."""
        if not jax.tree.leaves(p_state.batch_stats):
            return p_state
        return p_state.replace(batch_stats=self._sync(p_state.batch_stats))

    def eval_batches(self, dataset):
        return (
            self.parallel.put(b, BATCH)
            for b in eval_iterator(
                dataset,
                global_batch_size=self.config.eval_batch_size,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
                image_size=self.config.eval_image_size or None,
            )
        )

    def train_batches(self, start_step: int, num_steps: int | None = None):
        p = self.plan
        it = make_train_iterator(
            self.train_ds,
            self.config,
            start_step=start_step,
            num_steps=p.total_steps if num_steps is None else num_steps,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        return prefetch((self.parallel.put(b, BATCH) for b in it), buffer_size=2)

    def evaluate(self, variables: PyTree, dataset=None) -> dict[str, float]:
        """Loss / accuracy / count of ``variables`` over ``dataset`` (default: the test split)."""
        dataset = self.test_ds if dataset is None else dataset
        return evaluate(
            self._eval_steps[tuple(variables)],
            variables,
            self.eval_batches(dataset),
            expected_count=len(dataset),
            fetch=lambda sums: self.parallel.host(sums, REPLICATED),
        )

    def eval_all(self, p_state: TrainState, precise_stats: PyTree | None = None) -> dict:
        """Evaluations side by side: running stats, PreciseBN stats, EMA params.

        Keys ``{split}_loss`` / ``{split}_accuracy`` (plus ``_precise_bn`` / ``_ema``
        variants) for the validation split (when the run has one) and the test split.
        """
        variants = {"": model_variables(p_state.params, p_state.batch_stats)}
        if precise_stats is not None:
            variants["_precise_bn"] = model_variables(p_state.params, precise_stats)
        if p_state.ema_params is not None:
            variants["_ema"] = model_variables(p_state.ema_params, p_state.batch_stats)
        splits = {"test": self.test_ds}
        if self.val_ds is not None:
            splits = {"validation": self.val_ds, **splits}
        out = {}
        for split, dataset in splits.items():
            for suffix, variables in variants.items():
                r = self.evaluate(variables, dataset)
                out[f"{split}_loss{suffix}"] = r["loss"]
                out[f"{split}_accuracy{suffix}"] = r["accuracy"]
            out[f"{split}_count"] = r["count"]
        return out

    def precise_bn(self, p_state: TrainState) -> PyTree | None:
        """PreciseBN statistics from ``config.precise_bn_batches`` training batches, or None."""
        n = self.config.precise_bn_batches
        if not n or not jax.tree.leaves(p_state.batch_stats):
            return None
        # Fresh training batches (the epoch after the last one), augmented as in training.
        total = self.plan.total_steps
        batches = self.train_batches(total, num_steps=total + n)
        variables = model_variables(p_state.params, p_state.batch_stats)
        rng = jax.random.fold_in(self.base_rng, 2**31 - 1)
        return make_precise_bn(self.model, AXIS, self.parallel)(variables, batches, n, rng)


def train(config: ml_collections.ConfigDict, workdir: str, **kwargs) -> dict:
    """Trains (or resumes) the experiment ``config`` in ``workdir``; returns the summary.

    A stop signal (SIGTERM/SIGINT) saves a checkpoint and returns early with
    ``{"interrupted": True, "steps": ...}`` (no summary.json): rerun the same command
    to resume. A diverged run (see ``nfnets.training.health``) writes its summary and
    raises ``TrainingDiverged``. ``kwargs`` go to ``run``.
    """
    summary = run(config, workdir, **kwargs)[0]
    if summary.get("diverged"):
        raise health.TrainingDiverged(summary["divergence"], summary)
    return summary


def _open_outputs(trainer: Trainer, start_step: int, ckpt: Checkpointer):
    """``(writer, bar)`` on the writing process (config.json written, metrics truncated)."""
    config, workdir = trainer.config, trainer.workdir
    if not trainer.is_writer:
        return None, None
    # Written only now, after the checks: config.json is the config of the checkpoints.
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2) + "\n")
    torn = outputs.truncate_metrics(workdir, start_step)
    writer = outputs.MetricsWriter(workdir, tensorboard=config.tensorboard)
    bar = None
    if config.progress_bar:
        bar = outputs.ProgressBar(trainer.plan.total_steps, initial=start_step)
    if torn:
        actions_lib.say(bar, torn)
    if start_step:
        actions_lib.say(bar, f"resuming from step {start_step} ({ckpt.directory})")
    return writer, bar


def _finished_summary(trainer: Trainer, start_step: int, extend: bool) -> dict | None:
    """The saved summary when ``workdir`` already holds the whole run (nothing to do)."""
    total, workdir = trainer.plan.total_steps, trainer.workdir
    if start_step < total:
        return None
    path = os.path.join(workdir, outputs.SUMMARY_FILE)
    if extend and (start_step > total or os.path.exists(path)):
        raise ConfigError(
            f"--extend: {workdir} already holds {start_step} steps and the config asks for "
            f"{total}; raise num_epochs or num_train_steps"
        )
    if not os.path.exists(path):
        return None  # stopped after the last checkpoint: evaluate and summarize it
    actions_lib.say(
        None,
        f"{workdir} holds a finished run ({start_step} steps, {path}); nothing to do. "
        "To train longer rerun with --extend and a larger num_epochs or num_train_steps; "
        "to start over pass --restart (deletes its outputs) or use a new --workdir",
    )
    with open(path) as f:
        return json.load(f)


def _has_checkpoint(workdir: str) -> bool:
    """Whether ``workdir/checkpoints`` holds a step folder (orbax names them by step)."""
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def _all_processes_reach(point: str) -> None:
    """A barrier across processes (none with one process).

    Every process must run the same cross-process collectives in the same order
    (orbax's barriers are collectives too). Without this barrier, process 0 could
    create ``workdir/checkpoints`` before another process had checked the workdir;
    that process would then read the folder (orbax barriers process 0 never joins)
    and the two would pair unrelated collectives: a hang, or worse.
    """
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"nfnets.training.run: {point}")


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    stop_at_step: int | None = None,
    restart: bool = False,
    extend: bool = False,
) -> tuple[dict, TrainState]:
    """``train`` that also returns the final host training state (first local replica).

    ``stop_at_step`` behaves like a stop signal arriving during that step
    (checkpoint, then return ``{"interrupted": True, ...}``): for tests of
    resuming and for simulating preemption. The whole config is checked before
    any data is read or the workdir is created (``preflight.check_config``), and
    against the workdir's checkpoint before anything is written
    (``preflight.prepare_workdir``). A finished workdir is left as it is (its
    summary is returned) unless ``extend`` (train on to a longer ``num_epochs`` /
    ``num_train_steps``) or ``restart`` (delete its outputs, start over).
    """
    maybe_initialize_distributed(config)
    check_config(config, jax.device_count())
    if restart or not _has_checkpoint(workdir):
        check_init_from(config)  # a resumed run never reads init_from
    prepare_workdir(
        config, workdir, restart=restart, extend=extend, writer=jax.process_index() == 0
    )
    _all_processes_reach("workdir checked")
    ckpt = Checkpointer(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        max_to_keep=config.keep_checkpoints,
        save_every_steps=config.checkpoint_every_steps,
    )
    resuming = ckpt.latest_step() is not None
    trainer = Trainer(config, workdir)
    state, prior_time, init_message = trainer.init_state(), 0.0, None
    if resuming:
        state, meta = ckpt.restore(state)
        prior_time = float(meta.get("train_time_s", 0.0))
    else:
        state, init_message = init_from_pretrained(state, trainer.model, trainer.tx, config)
    start_step = int(state.step)
    finished = _finished_summary(trainer, start_step, extend)
    if finished is not None:
        ckpt.close()
        return finished, state
    writer, bar = _open_outputs(trainer, start_step, ckpt)
    if init_message and trainer.is_writer:
        actions_lib.say(bar, init_message)
    run_state = actions_lib.RunState(
        p_state=trainer.put_state(state),
        step=start_step,
        start_step=start_step,
        prior_time=prior_time,
        t0=time.perf_counter(),
    )
    del state
    stop = actions_lib.StopOnSignal(trainer, ckpt, bar, stop_at_step)
    periodic = [
        actions_lib.LogMetrics(trainer, writer, bar, run_state),
        *([actions_lib.ShowProgress(bar)] if bar else []),
        actions_lib.PeriodicEvaluation(trainer, writer),
        actions_lib.StopOnDivergence(trainer),
        actions_lib.PeriodicCheckpoint(trainer, ckpt),
        stop,
    ]
    with stop:
        for batch in trainer.train_batches(start_step):
            run_state.p_state = trainer.train_step(run_state.p_state, batch, trainer.step_rng)
            run_state.step += 1
            for action in periodic:
                action(run_state)
            if run_state.interrupted or run_state.diverged:
                break
    loop_time = actions_lib.wait(run_state)
    if run_state.interrupted and not run_state.diverged:
        ckpt.close()
        if bar:
            bar.close()
        if writer:
            writer.close()
        return {"interrupted": True, "steps": run_state.step}, trainer.host_state(run_state.p_state)
    return _finish(trainer, ckpt, run_state, loop_time, writer, bar)


def _finish(trainer: Trainer, ckpt, run_state, loop_time: float, writer, bar):
    """Evaluation, final checkpoint (only of a healthy run), summary.json and plots.

    A diverged run (in the loop, or a non-finite final test loss) saves no
    checkpoint, so the last one is the last good state.
    """
    config, step = trainer.config, run_state.step
    splits = ("validation", "test") if trainer.val_ds is not None else ("test",)
    results = {f"{split}_{m}": None for split in splits for m in ("loss", "accuracy")}
    p_state = trainer.sync_stats(run_state.p_state)
    final_state = trainer.host_state(p_state)
    if run_state.diverged is None:
        results = trainer.eval_all(p_state, trainer.precise_bn(p_state))
        reason = health.eval_reason(results)
        if reason:
            run_state.diverged = (step, reason)
        else:
            meta = actions_lib.checkpoint_meta(config, run_state.prior_time + loop_time)
            ckpt.save(step, final_state, meta)
    ckpt.close()
    summary = _summary(trainer, run_state, loop_time, results, final_state)
    if bar:
        bar.close()
    if writer:
        if not run_state.diverged:
            writer.write(step, {k: v for k, v in results.items() if not k.endswith("_count")})
        writer.close()
        records = outputs.read_metrics(trainer.workdir)
        summary.update(health.loss_health(records, trainer.info.num_classes))
        outputs.write_summary(trainer.workdir, summary)
        outputs.plot_curves(records, os.path.join(trainer.workdir, outputs.CURVES_FILE))
        if summary["loss_exploded"]:
            actions_lib.say(None, f"warning: train loss reached {summary['max_train_loss']:.3g}")
        if not run_state.diverged:
            line = ", ".join(f"{k} {summary[k]:.4f}" for k in sorted(results) if "_accuracy" in k)
            print(f"done: {line}; {step} steps in {summary['wall_time_s']:.1f} s", flush=True)
    return summary, final_state


def _summary(trainer: Trainer, run_state, loop_time: float, results: dict, final_state) -> dict:
    """summary.json's fields (see ``outputs.SUMMARY_KEYS``); None where there is no number."""
    config, plan, step = trainer.config, trainer.plan, run_state.step
    ran = step - run_state.start_step
    diverged_at, message = None, None
    if run_state.diverged:
        diverged_at = run_state.diverged[0]
        message = health.divergence_message(*run_state.diverged)
    return {
        **results,
        "steps": step,
        "skipped_steps": int(final_state.num_skipped),
        "wall_time_s": run_state.prior_time + loop_time,
        "images_per_sec": ran * config.batch_size / max(loop_time, 1e-9) if ran else None,
        "epochs": step / plan.steps_per_epoch,
        "num_devices": plan.num_devices,
        "num_processes": plan.process_count,
        "model": config.model,
        "dataset": config.dataset,
        "batch_size": config.batch_size,
        "diverged": run_state.diverged is not None,
        "diverged_at_step": diverged_at,
        "divergence": message,
    }


__all__ = ["ConfigError", "Trainer", "maybe_initialize_distributed", "run", "train"]
