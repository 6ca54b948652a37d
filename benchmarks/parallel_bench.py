"""Training-step time of the two parallel paths on 8 virtual CPU devices.

Run: ``python -m benchmarks.parallel_bench``. One process, 8 virtual CPU devices,
the tiny BN ResNet of the tests (widths 8/16, one block per stage) on fake
Fashion-MNIST, global batch 64, and a log read-out after every step (the worst
case for host round trips). Three loops, interleaved round by round, median
seconds per step over the rounds after a warm-up:

- ``pmap (old host pattern)``: the loop before ``config.parallelism`` existed:
  numpy batches handed to the pmapped step (transferred at the call), the rng
  broadcast by ``in_axes=None``, and at each log the four metric sums read one by
  one (``step.unreplicate``) and fresh zeros sent back (``step.replicate``, an
  identity pmap).
- ``pmap``: :class:`nfnets.training.parallel.Pmap` as the trainer uses it:
  batches placed with pmap's own sharding, metric sums packed on device into
  one small array and zeroed there.
- ``shard_map``: :class:`nfnets.training.parallel.ShardMap`, the same over
  global arrays.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

ROUNDS, STEPS, WARMUP = 9, 10, 2


def _setup():
    import jax

    from nfnets.training.loop import Trainer
    from nfnets.training.pipeline import train_iterator
    from nfnets.training.step import make_train_step
    from tests.nfnets.training.tiny_config import fake_data, tiny_bn_config

    data = fake_data(tempfile.mkdtemp())
    config = tiny_bn_config(data)
    config.batch_size, config.tensorboard = 64, False
    trainers = {}
    for par in ("pmap", "shard_map"):
        config.parallelism = par
        trainers[par] = Trainer(config, tempfile.mkdtemp())
    t = trainers["pmap"]
    step = make_train_step(t.model, t.tx, ema_decay_fn=t.plan.ema_decay_fn, axis_name="batch")
    batches = list(
        train_iterator(t.train_ds, global_batch_size=config.batch_size, seed=0, num_steps=STEPS)
    )
    return jax, trainers, step, batches


def _loops(jax, trainers, step, batches):
    """name -> (state, run(state) -> state after STEPS steps + logs)."""
    from nfnets.training.parallel import BATCH
    from nfnets.training.pipeline import shard_for_pmap
    from nfnets.training.step import (
        make_pmapped_train_step,
        replicate,
        unreplicate,
        zero_metric_sums,
    )

    old_step = make_pmapped_train_step(step, "batch")
    t = trainers["pmap"]
    host_rng = jax.random.split(jax.random.key(t.config.seed))[1]

    def old(state):
        for b in batches:
            state = old_step(state, shard_for_pmap(b, 8), host_rng)
            sums = unreplicate(state.metric_sums)
            state = state.replace(metric_sums=replicate(zero_metric_sums()))
            float(sums["loss"])
        return state

    def new(trainer):
        def loop(state):
            for b in batches:
                state = trainer.train_step(state, trainer.parallel.put(b, BATCH), trainer.step_rng)
                state, sums = trainer.read_metrics(state)
            return state

        return loop

    host = t.init_state()
    return {
        "pmap (old host pattern)": (replicate(host), old),
        "pmap": (t.put_state(host), new(t)),
        "shard_map": (trainers["shard_map"].put_state(host), new(trainers["shard_map"])),
    }


def main() -> None:
    """Measures in a subprocess with 8 virtual CPU devices (prints the table)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    code = "from benchmarks.parallel_bench import measure; measure()"
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def measure() -> None:
    """The interleaved measurement in this process (needs the 8 devices already)."""
    jax, trainers, step, batches = _setup()
    loops = _loops(jax, trainers, step, batches)
    states = {k: s for k, (s, _) in loops.items()}
    times = {k: [] for k in loops}
    for r in range(WARMUP + ROUNDS):
        for name, (_, loop) in loops.items():
            t0 = time.perf_counter()
            states[name] = jax.block_until_ready(loop(states[name]))
            if r >= WARMUP:
                times[name].append((time.perf_counter() - t0) / STEPS)
    print(f"{jax.device_count()} {jax.devices()[0].platform} devices, {os.cpu_count()} CPUs;")
    print(f"median of {ROUNDS} interleaved rounds of {STEPS} steps, a log read-out every step\n")
    print("| path | ms / step (median) | min | max |\n|---|---|---|---|")
    for name, ts in times.items():
        ms = [1e3 * t for t in ts]
        print(f"| {name} | {statistics.median(ms):.2f} | {min(ms):.2f} | {max(ms):.2f} |")


if __name__ == "__main__":
    main()
