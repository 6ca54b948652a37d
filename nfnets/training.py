"""The training loop: config -> data, model, optimizer -> pmap steps -> evaluation and outputs.

``train(config, workdir)`` runs (or resumes) one experiment and returns the summary
dict it also writes to ``workdir/summary.json``. Outputs in ``workdir``:
``checkpoints/`` (orbax), ``metrics.jsonl``, ``tensorboard/``, ``summary.json``,
``training_curves.png``, ``config.json``.

Data parallelism: ``jax.pmap`` over this process's devices with axis ``"batch"``;
with several processes (``jax.distributed``) the axis spans every device of every
process and each process feeds its own slice of the global batch. Exact resume:
the state (including the metric sums since the last log) is checkpointed, the data
iterator restarts at the checkpoint's step, and per-step randomness is
``fold_in(seed key, step, device)``, so a resumed run continues exactly as an
uninterrupted one.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from nfnets import data as data_lib
from nfnets import metrics as metrics_lib
from nfnets.checkpoints import Checkpointer
from nfnets.config import ConfigError, Derived, derive
from nfnets.evaluation import evaluate, make_pmapped_eval_step
from nfnets.optim import make_optimizer
from nfnets.train_state import (
    TrainState,
    create_train_state,
    make_pmapped_train_step,
    make_train_step,
    zero_metric_sums,
)

AXIS = "batch"
PyTree = Any


# ----------------------------------------------------------------------------- setup


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


def replicate(tree: PyTree, num_devices: int | None = None) -> PyTree:
    """Host pytree -> one copy per local device (leading axis = local devices), on device."""
    n = jax.local_device_count() if num_devices is None else num_devices
    stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), tree)
    return _identity_pmap(stacked)


_identity_pmap = jax.pmap(lambda x: x, axis_name=AXIS)


def unreplicate(tree: PyTree) -> PyTree:
    """The first local device's copy of a replicated pytree, as numpy (multi-host safe)."""

    def first(x):
        if isinstance(x, jax.Array):
            return np.asarray(x.addressable_data(0)).reshape(x.shape[1:])
        return np.asarray(x)[0]

    return jax.tree.map(first, tree)


def augment_from_config(config: ml_collections.ConfigDict) -> data_lib.Augment:
    a = config.augment
    return data_lib.Augment(
        crop_padding=a.crop_padding,
        flip=a.flip,
        inception_crop=a.inception_crop,
        mixup_alpha=a.mixup_alpha,
        cutmix_alpha=a.cutmix_alpha,
    )


def load_data(config: ml_collections.ConfigDict):
    """(train, test) datasets; a missing dataset raises with the command that prepares it."""
    data_dir = config.data_dir or None
    train_ds = data_lib.load_dataset(config.dataset, split="train", data_dir=data_dir)
    test_ds = data_lib.load_dataset(config.dataset, split="test", data_dir=data_dir)
    return train_ds, test_ds


def build_model(config: ml_collections.ConfigDict, derived: Derived, num_classes: int):
    from nfnets.registry import create_model

    return create_model(config.model, num_classes=num_classes, **derived.model_kwargs)


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop checkpoints and exits at the next step boundary."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ----------------------------------------------------------------------------- loop


class Trainer:
    """Holds the compiled steps and state of one run; ``train`` drives it."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config = config
        self.workdir = workdir
        self.is_writer = jax.process_index() == 0
        self.train_ds, self.test_ds = load_data(config)
        self.info = self.train_ds.info
        self.derived = derive(config, num_train_examples=len(self.train_ds), axis_name=AXIS)
        d = self.derived
        self.model = build_model(config, d, self.info.num_classes)
        self.tx, self.schedule = make_optimizer(d.optimizer_config, d.steps_per_epoch)
        root = jax.random.key(config.seed)
        self.init_rng, self.step_rng = jax.random.split(root)
        size = config.image_size or self.info.image_shape[0]
        self.image_shape = (size, size, self.info.image_shape[2])
        self.train_step = make_pmapped_train_step(
            make_train_step(
                self.model,
                self.tx,
                label_smoothing=config.label_smoothing,
                ema_decay_fn=d.ema_decay_fn,
                axis_name=AXIS,
            ),
            AXIS,
        )
        self.eval_step = make_pmapped_eval_step(self.model, AXIS)
        from norms.batch_norm import sync_batch_stats

        self._sync = jax.pmap(lambda bs: sync_batch_stats(bs, AXIS), axis_name=AXIS)

    # -- state helpers

    def init_state(self) -> TrainState:
        return create_train_state(
            self.model,
            self.tx,
            self.init_rng,
            self.image_shape,
            use_ema=self.derived.ema_decay_fn is not None,
        )

    def sync_stats(self, p_state: TrainState) -> TrainState:
        """Running statistics merged across all devices (see norms.sync_batch_stats)."""
        if not jax.tree.leaves(p_state.batch_stats):
            return p_state
        return p_state.replace(batch_stats=self._sync(p_state.batch_stats))

    def eval_batches(self):
        return (
            data_lib.shard_for_pmap(b, self.derived.local_devices)
            for b in data_lib.eval_iterator(
                self.test_ds,
                global_batch_size=self.config.eval_batch_size,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
                image_size=self.config.eval_image_size or None,
            )
        )

    def train_batches(self, start_step: int, num_steps: int | None = None):
        d = self.derived
        it = data_lib.train_iterator(
            self.train_ds,
            global_batch_size=self.config.batch_size,
            seed=self.config.seed,
            start_step=start_step,
            num_steps=d.total_steps if num_steps is None else num_steps,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            augment=augment_from_config(self.config),
            image_size=self.config.image_size or None,
        )
        return data_lib.prefetch(
            (data_lib.shard_for_pmap(b, d.local_devices) for b in it), buffer_size=2
        )

    def evaluate(self, variables: PyTree) -> dict[str, float]:
        return evaluate(
            self.eval_step, variables, self.eval_batches(), expected_count=len(self.test_ds)
        )

    def eval_all(self, p_state: TrainState, precise_stats: PyTree | None = None) -> dict:
        """Evaluations side by side: running stats, PreciseBN stats, EMA params."""
        has_stats = bool(jax.tree.leaves(p_state.batch_stats))

        def variables(params, stats):
            v = {"params": params}
            if has_stats:
                v["batch_stats"] = stats
            return v

        out = {}
        r = self.evaluate(variables(p_state.params, p_state.batch_stats))
        out["test_loss"], out["test_accuracy"] = r["loss"], r["accuracy"]
        out["test_count"] = r["count"]
        if precise_stats is not None:
            r = self.evaluate(variables(p_state.params, precise_stats))
            out["test_loss_precise_bn"] = r["loss"]
            out["test_accuracy_precise_bn"] = r["accuracy"]
        if p_state.ema_params is not None:
            r = self.evaluate(variables(p_state.ema_params, p_state.batch_stats))
            out["test_loss_ema"] = r["loss"]
            out["test_accuracy_ema"] = r["accuracy"]
        return out

    def precise_bn(self, p_state: TrainState) -> PyTree | None:
        """PreciseBN statistics from ``config.precise_bn_batches`` training batches, or None."""
        n = self.config.precise_bn_batches
        if not n or not jax.tree.leaves(p_state.batch_stats):
            return None
        from nfnets.evaluation import make_precise_bn

        # Fresh training batches (the epoch after the last one), augmented as in training.
        batches = self.train_batches(
            self.derived.total_steps, num_steps=self.derived.total_steps + n
        )
        variables = {"params": p_state.params, "batch_stats": p_state.batch_stats}
        rng = jax.random.fold_in(self.step_rng, 2**31 - 1)
        return make_precise_bn(self.model, AXIS)(variables, batches, n, rng)


def train(config: ml_collections.ConfigDict, workdir: str, **kwargs) -> dict:
    """Trains (or resumes) the experiment ``config`` in ``workdir``; returns the summary.

    A stop signal (SIGTERM/SIGINT) saves a checkpoint and returns early with
    ``{"interrupted": True, "steps": ...}`` (no summary.json): rerun the same command
    to resume. ``kwargs`` go to ``run``.
    """
    return run(config, workdir, **kwargs)[0]


def run(
    config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None
) -> tuple[dict, TrainState]:
    """``train`` that also returns the final host training state (first local replica).

    ``stop_at_step`` behaves like a stop signal arriving during that step
    (checkpoint, then return ``{"interrupted": True, ...}``): for tests of
    resuming and for simulating preemption.
    """
    maybe_initialize_distributed(config)
    os.makedirs(workdir, exist_ok=True)
    trainer = Trainer(config, workdir)
    d = trainer.derived
    ckpt = Checkpointer(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        max_to_keep=config.keep_checkpoints,
        save_every_steps=config.checkpoint_every_steps,
    )
    state = trainer.init_state()
    prior_time = 0.0
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
        prior_time = float(meta.get("train_time_s", 0.0))
    start_step = int(state.step)

    writer = bar = None
    if trainer.is_writer:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2) + "\n")
        metrics_lib.truncate_metrics(workdir, start_step)
        writer = metrics_lib.MetricsWriter(workdir, tensorboard=config.tensorboard)
        if config.progress_bar:
            bar = metrics_lib.ProgressBar(d.total_steps)
        if start_step:
            msg = f"resuming from step {start_step} ({ckpt.directory})"
            bar.message(msg) if bar else print(msg, flush=True)

    p_state = replicate(state, d.local_devices)
    del state
    images_per_step = config.batch_size
    interrupted = False

    def meta(train_time):
        return {"train_time_s": train_time, "config": json.loads(config.to_json_best_effort())}

    def host_state(p):
        return unreplicate(p)

    t0 = time.perf_counter()
    last_log_t, last_log_step = t0, start_step
    info: dict[str, float] = {}
    step = start_step
    with _StopFlag() as stop:
        for batch in trainer.train_batches(start_step):
            p_state, _ = trainer.train_step(p_state, batch, trainer.step_rng)
            step += 1
            if step % config.log_every_steps == 0 or step == d.total_steps:
                sums = unreplicate(p_state.metric_sums)
                p_state = p_state.replace(metric_sums=replicate(zero_metric_sums()))
                now = time.perf_counter()
                good = max(int(sums["steps"]), 1)
                info = {
                    "loss": float(sums["loss"]) / good,
                    "accuracy": float(sums["accuracy"]) / good,
                    "images_per_sec": (step - last_log_step) * images_per_step / (now - last_log_t),
                }
                record = {
                    "train_loss": info["loss"],
                    "train_accuracy": info["accuracy"],
                    "learning_rate": float(trainer.schedule(step - 1)),
                    "skipped_steps": int(sums["skipped"]),
                    "epoch": step / d.steps_per_epoch,
                    "images_per_sec": info["images_per_sec"],
                }
                if int(sums["skipped"]):
                    msg = f"step {step}: skipped {int(sums['skipped'])} non-finite step(s)"
                    bar.message(msg) if bar else None
                last_log_t, last_log_step = now, step
                if writer:
                    writer.write(step, record)
            if bar:
                elapsed = time.perf_counter() - t0
                rate = (step - start_step) / max(elapsed, 1e-9)
                bar.update(step, {**info, "eta_s": (d.total_steps - step) / max(rate, 1e-9)})
            if (
                config.eval_every_steps
                and step % config.eval_every_steps == 0
                and step < d.total_steps
            ):
                p_state = trainer.sync_stats(p_state)
                res = trainer.eval_all(p_state)
                if writer:
                    writer.write(step, {k: v for k, v in res.items() if k != "test_count"})
            if ckpt.save_every_steps and step % ckpt.save_every_steps == 0:
                p_state = trainer.sync_stats(p_state)
                train_time = prior_time + time.perf_counter() - t0
                ckpt.save(step, host_state(p_state), meta(train_time))
            if stop_at_step is not None and step == stop_at_step:
                stop.signum = signal.SIGTERM
            if stop.signum is not None and step < d.total_steps:
                p_state = trainer.sync_stats(p_state)
                train_time = prior_time + time.perf_counter() - t0
                ckpt.save(step, host_state(p_state), meta(train_time))
                msg = f"signal {stop.signum}: saved checkpoint at step {step}; rerun to resume"
                bar.message(msg) if bar else print(msg, flush=True)
                interrupted = True
                break
    jax.block_until_ready(p_state)
    loop_time = time.perf_counter() - t0
    train_time = prior_time + loop_time
    if interrupted:
        ckpt.close()
        if writer:
            writer.close()
        return {"interrupted": True, "steps": step}, unreplicate(p_state)

    p_state = trainer.sync_stats(p_state)
    final_state = host_state(p_state)
    ckpt.save(step, final_state, meta(train_time))
    ckpt.close()
    precise = trainer.precise_bn(p_state)
    results = trainer.eval_all(p_state, precise)
    skipped = int(unreplicate(p_state.num_skipped))
    run_steps = step - start_step
    summary = {
        **results,
        "steps": step,
        "skipped_steps": skipped,
        "wall_time_s": train_time,
        "images_per_sec": run_steps * images_per_step / max(loop_time, 1e-9),
        "epochs": step / d.steps_per_epoch,
        "num_devices": d.num_devices,
        "num_processes": d.process_count,
        "model": config.model,
        "dataset": config.dataset,
        "batch_size": config.batch_size,
    }
    if writer:
        writer.write(step, {k: v for k, v in results.items() if k != "test_count"})
        writer.close()
        metrics_lib.write_summary(workdir, summary)
        metrics_lib.plot_curves(
            metrics_lib.read_metrics(workdir), os.path.join(workdir, metrics_lib.CURVES_FILE)
        )
        line = ", ".join(
            f"{k} {summary[k]:.4f}" for k in sorted(results) if k.startswith("test_accuracy")
        )
        print(f"done: {line}; {step} steps in {train_time:.1f} s", flush=True)
    return summary, final_state


__all__ = ["ConfigError", "Trainer", "maybe_initialize_distributed", "run", "train"]
