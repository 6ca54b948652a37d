"""Speed of our norms against flax.linen's, and SyncBN collective counts.

Run: ``python -m benchmarks.norms_bench`` (or ``make bench``). Prints markdown tables.

1. Forward + backward on an NHWC float32 batch, default (64, 32, 32, 128): the
   jitted gradient of ``sum(norm(x)^2)`` with respect to ``x``, ``scale`` and
   ``bias``, for ``norms.batch_norm`` (train mode), ``group_norm`` (32 groups),
   ``layer_norm``, ``instance_norm``, ``filter_response_norm`` (with TLU),
   ``evonorm_s0`` (32 groups), ``rms_norm`` (over C, ``scale`` only) and the
   pointwise ``dynamic_tanh`` and ``derf``, against ``flax.linen.BatchNorm``,
   ``GroupNorm``, ``LayerNorm`` (over H, W, C), ``InstanceNorm`` and ``RMSNorm``
   where flax has the norm, the first four with ``use_fast_variance=False``
   (flax's two-pass variance: the same numerics as ours; RMSNorm's mean square
   has no variance to cancel). Every function is compiled and warmed up first; then all are timed
   in interleaved rounds (so background load hits them alike) and the median per
   function is reported, with the ratios ours / flax and ours / our batch_norm.
2. A roofline-style count of bytes moved: XLA's ``bytes accessed`` estimate of
   each compiled program, in passes over ``x`` (one pass = one read or one write
   of an array of ``x``'s size), and a measured time per pass (timed in the same
   rounds: a per-channel sum, one read, gives the pass time; ``x * a + b``, a
   read and a write into a fresh array, is shown too). A norm's floor is 5
   passes: two reads for the stable two-pass statistics, one read for the
   backward pass's two sums, one read and one write for ``dx``. A pointwise
   layer (DyT, Derf) has no statistics: one read and one write forward, and
   its fwd+bwd floor is 2 passes (read ``x``, write ``dx``, with the ``scale`` /
   ``bias`` sums taken in the same read).
3. Collectives in one SyncBN layer (train-mode forward, and forward + backward)
   under ``jax.pmap`` over 8 devices: occurrences of ``stablehlo.all_gather`` /
   ``all_reduce`` / ``reduce_scatter`` / ``all_to_all`` in the lowered module. If
   fewer than 8 devices are visible, that part runs in a subprocess with
   ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (CPU devices).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import norms
from benchmarks._subprocess import json_with_cpu_devices

COLLECTIVES = ("all_gather", "all_reduce", "reduce_scatter", "all_to_all")


def _ours_bn(x, scale, bias, state):
    return norms.batch_norm(x, state, scale, bias, train=True)[0]


def _ours(fn, **kwargs):
    def apply(x, scale, bias, state):
        return fn(x, scale, bias, **kwargs)

    return apply


def _frn(x, scale, bias, state):
    return norms.filter_response_norm(x, scale, bias, jnp.zeros_like(bias))


def _evonorm_s0(x, scale, bias, state):
    return norms.evonorm_s0(x, scale, bias, jnp.ones_like(scale), num_groups=32)


def _rms(x, scale, bias, state):
    return norms.rms_norm(x, scale)  # flax's RMSNorm has no bias either


def _dyt(x, scale, bias, state):
    return norms.dynamic_tanh(x, 0.5, scale, bias)


def _derf(x, scale, bias, state):
    return norms.derf(x, 0.5, 0.1, scale, bias)


def _flax_rms(module):
    def apply(x, scale, bias, state):
        return module.apply({"params": {"scale": scale}}, x)

    return apply


def _flax(module):
    def apply(x, scale, bias, state):
        params = {"params": {"scale": scale, "bias": bias}}
        if state is None:
            return module.apply(params, x)
        variables = {**params, "batch_stats": {"mean": state.mean, "var": state.var}}
        return module.apply(variables, x, mutable=["batch_stats"])[0]

    return apply


def norm_pairs(channels: int) -> list[tuple[str, object, str | None, object]]:
    """``(ours name, ours fn, flax name or None, flax fn or None)`` for every norm timed."""
    stable = {"epsilon": 1e-5, "use_fast_variance": False}
    return [
        (
            "batch_norm",
            _ours_bn,
            "BatchNorm",
            _flax(nn.BatchNorm(use_running_average=False, momentum=0.9, **stable)),
        ),
        (
            "group_norm",
            _ours(norms.group_norm, num_groups=32),
            "GroupNorm",
            _flax(nn.GroupNorm(num_groups=32, **stable)),
        ),
        (
            "layer_norm",
            _ours(norms.layer_norm),
            "LayerNorm",
            _flax(nn.LayerNorm(reduction_axes=(1, 2, 3), feature_axes=-1, **stable)),
        ),
        (
            "instance_norm",
            _ours(norms.instance_norm),
            "InstanceNorm",
            _flax(nn.InstanceNorm(feature_axes=-1, **stable)),
        ),
        ("filter_response_norm", _frn, None, None),
        ("evonorm_s0", _evonorm_s0, None, None),
        # RMSNorm over the channel axis (flax's default reduction_axes=-1); its mean
        # square needs no centring, so flax's one-pass statistic is also stable here.
        ("rms_norm", _rms, "RMSNorm", _flax_rms(nn.RMSNorm())),
        ("dynamic_tanh", _dyt, None, None),
        ("derf", _derf, None, None),
    ]


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


def compiled_bytes(fn, args) -> float:
    """XLA's ``bytes accessed`` estimate of the compiled ``fn(*args)``."""
    cost = fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("bytes accessed", float("nan")))


def speed(shape=(64, 32, 32, 128), rounds: int = 15) -> dict:
    """Median seconds and compiled bytes per function, keyed by name (flax ones: 'flax X')."""
    c = shape[-1]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(1.0, 2.0, shape), jnp.float32)
    scale = jnp.asarray(rng.normal(1.0, 0.1, c), jnp.float32)
    bias = jnp.zeros(c, jnp.float32)
    state = norms.init_batch_norm_state(c)
    fns = {}
    for ours, ours_fn, theirs, theirs_fn in norm_pairs(c):
        st = state if ours == "batch_norm" else None
        fns[ours] = fwd_bwd(ours_fn, st)
        if theirs is not None:
            fns[f"flax {theirs}"] = fwd_bwd(theirs_fn, st)
    # Pass probes: a per-channel sum reads x once; x * a + b reads it and writes a
    # fresh array (whose first touch of new pages also costs time).
    fns[READ] = jax.jit(lambda x, scale, bias: jnp.sum(x, axis=(0, 1, 2)))
    fns[READ_WRITE] = jax.jit(lambda x, scale, bias: x * scale + bias)
    args = (x, scale, bias)
    times = time_interleaved(fns, args, rounds=rounds)
    return {
        "times": times,
        "bytes": {name: compiled_bytes(fn, args) for name, fn in fns.items()},
        "x_bytes": x.size * x.dtype.itemsize,
    }


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
    code = (
        "import json; from benchmarks.norms_bench import count_collectives_here; "
        f"print(json.dumps(count_collectives_here({devices})))"
    )
    return json_with_cpu_devices(code, devices)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    devs = jax.devices()
    kinds = sorted({d.device_kind for d in devs})
    return (
        f"jax {jax.__version__}, backend {jax.default_backend()}, {len(devs)} device(s) "
        f"({', '.join(kinds)}), {os.cpu_count()} CPU cores ({cpu_model()}, "
        f"{platform.machine()}), Python {platform.python_version()}"
    )


FLOOR_PASSES = 5
READ = "sum over N, H, W"
READ_WRITE = "x * a + b"


def table(res: dict, shape, collectives: dict) -> str:
    ms = {k: v * 1e3 for k, v in res["times"].items()}
    passes = {k: v / res["x_bytes"] for k, v in res["bytes"].items()}
    per_pass = ms[READ] / passes[READ]
    bn = ms["batch_norm"]
    lines = [
        f"Machine: {machine()}",
        "",
        f"Forward + backward (grad of sum(y^2) wrt x, scale, bias), float32 {shape}, median:",
        "",
        "| norm | ours (ms) | flax (ms) | ours / flax | ours / our batch_norm "
        "| XLA passes over x | ms at measured pass time |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for ours, _, theirs, _ in norm_pairs(shape[-1]):
        flax_ms = ms.get(f"flax {theirs}")
        cells = ("", "") if flax_ms is None else (f"{flax_ms:.2f}", f"{ms[ours] / flax_ms:.2f}")
        lines.append(
            f"| {ours} | {ms[ours]:.2f} | {cells[0]} | {cells[1]} | {ms[ours] / bn:.2f} | "
            f"{passes[ours]:.1f} | {passes[ours] * per_pass:.1f} |"
        )
    lines += [
        "",
        f"Memory floor: one pass over x ({res['x_bytes'] / 2**20:.0f} MiB) takes "
        f"{per_pass:.2f} ms ({READ}: {ms[READ]:.2f} ms for {passes[READ]:.1f} passes; "
        f"{READ_WRITE}: {ms[READ_WRITE]:.2f} ms for {passes[READ_WRITE]:.1f} passes); "
        f"a norm's fwd+bwd needs at least {FLOOR_PASSES} passes = "
        f"{FLOOR_PASSES * per_pass:.1f} ms.",
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
    res = speed(shape, rounds=args.rounds)
    out = table(res, shape, count_collectives())
    print(out)
    return out


if __name__ == "__main__":
    main()
