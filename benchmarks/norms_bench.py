"""Speed of our batch_norm / group_norm against flax.linen's, and SyncBN collective counts.

Run: ``python -m benchmarks.norms_bench`` (or ``make bench``). Prints a markdown table.

1. Forward + backward on an NHWC float32 batch, default (64, 32, 32, 128): the
   jitted gradient of ``sum(norm(x)^2)`` with respect to ``x``, ``scale`` and
   ``bias``, for ``norms.batch_norm`` (train mode) vs ``flax.linen.BatchNorm``
   (``use_fast_variance=False``, its numerically stable two-pass variance) and
   ``norms.group_norm`` vs ``flax.linen.GroupNorm`` (32 groups). Every function is
   compiled and warmed up first; then the four are timed in interleaved rounds
   (so background load hits them alike) and the median per function is reported
   with the ratio ours / flax.
2. Collectives in one SyncBN layer (train-mode forward, and forward + backward)
   under ``jax.pmap`` over 8 devices: occurrences of ``stablehlo.all_gather`` /
   ``all_reduce`` / ``reduce_scatter`` / ``all_to_all`` in the lowered module. If
   fewer than 8 devices are visible, that part runs in a subprocess with
   ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (CPU devices).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import norms

COLLECTIVES = ("all_gather", "all_reduce", "reduce_scatter", "all_to_all")


def _ours_bn(x, scale, bias, state):
    return norms.batch_norm(x, state, scale, bias, train=True)[0]


def _ours_gn(x, scale, bias, state):
    return norms.group_norm(x, scale, bias, num_groups=32)


def _flax(module):
    def apply(x, scale, bias, state):
        params = {"params": {"scale": scale, "bias": bias}}
        if state is None:
            return module.apply(params, x)
        variables = {**params, "batch_stats": {"mean": state.mean, "var": state.var}}
        return module.apply(variables, x, mutable=["batch_stats"])[0]

    return apply


def fwd_bwd(norm_fn, state):
    """jit(grad(sum(norm(x)^2))) with respect to x, scale and bias."""

    def loss(x, scale, bias):
        return jnp.sum(jnp.square(norm_fn(x, scale, bias, state)))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def time_interleaved(fns: dict, args, *, rounds: int, warmup: int = 2) -> dict:
    """Median wall time (s) per function over interleaved rounds, after compile + warm-up."""
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def speed(shape=(64, 32, 32, 128), rounds: int = 15) -> dict:
    c = shape[-1]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(1.0, 2.0, shape), jnp.float32)
    scale = jnp.asarray(rng.normal(1.0, 0.1, c), jnp.float32)
    bias = jnp.zeros(c, jnp.float32)
    state = norms.init_batch_norm_state(c)
    flax_bn = nn.BatchNorm(
        use_running_average=False, momentum=0.9, epsilon=1e-5, use_fast_variance=False
    )
    flax_gn = nn.GroupNorm(num_groups=32, epsilon=1e-5)
    fns = {
        "batch_norm": fwd_bwd(_ours_bn, state),
        "flax BatchNorm": fwd_bwd(_flax(flax_bn), state),
        "group_norm": fwd_bwd(_ours_gn, None),
        "flax GroupNorm": fwd_bwd(_flax(flax_gn), None),
    }
    return time_interleaved(fns, (x, scale, bias), rounds=rounds)


def count_collectives_here(devices: int = 8, c: int = 16) -> dict:
    """Collective ops in one SyncBN layer's lowered HLO, ours vs flax (needs ``devices``)."""
    x = jnp.ones((devices, 4, 4, 4, c), jnp.float32)
    scale, bias = jnp.ones(c), jnp.zeros(c)
    state = norms.init_batch_norm_state(c)
    flax_bn = nn.BatchNorm(
        use_running_average=False, axis_name="batch", momentum=0.9, use_fast_variance=False
    )

    def ours(x, scale, bias):
        return norms.batch_norm(x, state, scale, bias, train=True, axis_name="batch")[0]

    def theirs(x, scale, bias):
        variables = {
            "params": {"scale": scale, "bias": bias},
            "batch_stats": {"mean": state.mean, "var": state.var},
        }
        return flax_bn.apply(variables, x, mutable=["batch_stats"])[0]

    out = {}
    for name, fn in (("ours", ours), ("flax", theirs)):
        grad = jax.grad(lambda *a, fn=fn: jnp.sum(fn(*a) ** 2), argnums=(0, 1, 2))
        for mode, f in (("fwd", fn), ("fwd+bwd", grad)):
            hlo = (
                jax.pmap(f, axis_name="batch", in_axes=(0, None, None))
                .lower(x, scale, bias)
                .as_text()
            )
            out[f"{name} {mode}"] = {op: hlo.count(f'stablehlo.{op}"') for op in COLLECTIVES}
    return out


def count_collectives(devices: int = 8) -> dict:
    """:func:`count_collectives_here`, in a subprocess with virtual CPU devices if needed."""
    if jax.device_count() >= devices:
        return count_collectives_here(devices)
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    code = (
        "import json; from benchmarks.norms_bench import count_collectives_here; "
        f"print(json.dumps(count_collectives_here({devices})))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def machine() -> str:
    devs = jax.devices()
    kinds = sorted({d.device_kind for d in devs})
    cpu = platform.processor() or platform.machine()
    return (
        f"jax {jax.__version__}, backend {jax.default_backend()}, {len(devs)} device(s) "
        f"({', '.join(kinds)}), {os.cpu_count()} CPU cores, {cpu}, "
        f"Python {platform.python_version()}"
    )


def table(times: dict, shape, collectives: dict) -> str:
    ms = {k: v * 1e3 for k, v in times.items()}
    lines = [
        f"Machine: {machine()}",
        "",
        f"Forward + backward (grad of sum(y^2) wrt x, scale, bias), float32 {shape}, median:",
        "",
        "| norm | ours (ms) | flax (ms) | ours / flax |",
        "|---|---:|---:|---:|",
    ]
    for ours, theirs in (("batch_norm", "flax BatchNorm"), ("group_norm", "flax GroupNorm")):
        lines.append(
            f"| {ours} vs {theirs} | {ms[ours]:.2f} | {ms[theirs]:.2f} | "
            f"{ms[ours] / ms[theirs]:.2f} |"
        )
    lines.append(
        f"| flax GroupNorm / flax BatchNorm | | | "
        f"{ms['flax GroupNorm'] / ms['flax BatchNorm']:.2f} |"
    )
    lines += [
        "",
        "Collectives in one SyncBN layer under pmap over 8 devices (train mode):",
        "",
        "| layer | " + " | ".join(COLLECTIVES) + " | total |",
        "|---|" + "---:|" * (len(COLLECTIVES) + 1),
    ]
    for name, counts in collectives.items():
        cells = " | ".join(str(counts[op]) for op in COLLECTIVES)
        lines.append(f"| {name} | {cells} | {sum(counts.values())} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="64,32,32,128", help="N,H,W,C")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    times = speed(shape, rounds=args.rounds)
    out = table(times, shape, count_collectives())
    print(out)
    return out


if __name__ == "__main__":
    main()
