"""SyncBN's cross-device merge: time on 8 and 16 devices, bytes per device up to 512.

Run: ``python -m benchmarks.collectives_bench`` (or ``make bench``). Prints two
markdown tables for the two strategies of :func:`norms.moments`
(``sync_strategy="gather"``: one ``all_gather`` of every device's
``(count, mean, M2)``; ``"psum"``: two all-reduces of constant size):

1. Time of the merge alone (``moments`` of a ``(2, C)`` per-device batch under
   ``jax.pmap``), median of interleaved repeats after warm-up, on 8 and 16
   virtual CPU devices for a few widths ``C``. This is what sets
   ``norms.moments.GATHER_MAX_GROUP``.
2. Bytes each device receives in the collectives of one SyncBN layer
   (``norms.batch_norm`` in train mode, ``C = 2048`` channels, forward and
   forward + backward) for axis sizes 8, 64 and 512, read from the operand and
   result shapes of the collectives in the lowered StableHLO. Per device, with
   ``N`` the replica group's size: an ``all_gather`` receives the ``N - 1`` other
   parts, ``(N - 1) / N`` of its result; a bandwidth-optimal all-reduce
   (reduce-scatter then all-gather, e.g. a ring) receives ``2 (N - 1) / N`` of its
   operand; ``reduce_scatter`` and ``all_to_all`` ``(N - 1) / N`` of their operand.

Everything runs in one subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=512``
(CPU devices; lowering needs the devices to exist, not to be fast).
"""

from __future__ import annotations

import math
import re
import statistics
import sys
import time

from benchmarks._subprocess import json_with_cpu_devices

DEVICES = 512
STRATEGIES = ("gather", "psum")
COLLECTIVES = ("all_gather", "all_reduce", "reduce_scatter", "all_to_all")
# '"stablehlo.all_reduce"(...) ... : (operand types) -> result types', with an optional
# reduction region in between whose lines never hold "(tensor". The replica groups are
# either explicit ('dense<...> : tensor<GROUPSxSIZExi64>') or, for a collective over
# whole mesh axes (newer JAX), '#stablehlo.replica_group_mesh_axes<mesh = @M, axes =
# [...]>', whose group size is the product of those axes' sizes in 'sdy.mesh @M'.
_OP = re.compile(
    r'"stablehlo\.(' + "|".join(COLLECTIVES) + r')"\(.*?replica_groups = '
    r"(?:dense<.*?> : tensor<\d+x(\d+)xi64>"
    r"|#stablehlo\.replica_group_mesh_axes<mesh = @([\w.]+), axes = \[(.*?)\]>)"
    r".*?: \(([^)]*)\) -> \(?([^\n]*?)\)?$",
    re.DOTALL | re.MULTILINE,
)
_MESH = re.compile(r"sdy\.mesh @([\w.]+) = <\[(.*?)\]>")
_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "i32": 4, "i64": 8}


def tensor_bytes(types: str) -> int:
    """Total bytes of a comma-separated list of ``tensor<AxBxf32>`` types."""
    total = 0
    for dims, dtype in re.findall(r"tensor<((?:\d+x)*)(\w+)>", types):
        total += math.prod(int(d) for d in dims.split("x") if d) * _BYTES[dtype]
    return total


def _mesh_axis_sizes(stablehlo: str) -> dict[str, dict[str, int]]:
    """``{mesh name: {axis name: size}}`` of the module's ``sdy.mesh`` declarations."""
    return {
        name: {a: int(n) for a, n in re.findall(r'"(\w+)"=(\d+)', axes)}
        for name, axes in _MESH.findall(stablehlo)
    }


def collective_ops(stablehlo: str) -> list[dict]:
    """Collectives of a lowered module: op, group size, operand and result bytes."""
    meshes = _mesh_axis_sizes(stablehlo)
    ops = []
    for op, size, mesh, axes, operands, results in _OP.findall(stablehlo):
        if not size:
            if "sub_axis_info" in axes:
                raise NotImplementedError(f"replica groups over sub-axes: {axes}")
            names = re.findall(r'name = "(\w+)"', axes)
            size = math.prod(meshes[mesh][a] for a in names)
        ops.append(
            {
                "op": op,
                "group": int(size),
                "operand_bytes": tensor_bytes(operands),
                "result_bytes": tensor_bytes(results),
            }
        )
    return ops


def received_bytes(op: dict) -> float:
    """Bytes one device receives in ``op`` (see the module docstring for the model)."""
    n = op["group"]
    if op["op"] == "all_gather":
        return op["result_bytes"] * (n - 1) / n
    if op["op"] == "all_reduce":
        return 2 * op["operand_bytes"] * (n - 1) / n
    return op["operand_bytes"] * (n - 1) / n


def layer_collectives(devices: int, strategy: str, channels: int = 2048) -> dict:
    """Collectives of one SyncBN layer under ``pmap`` over ``devices``, fwd and fwd+bwd."""
    import jax
    import jax.numpy as jnp

    import norms

    state = norms.init_batch_norm_state(channels)

    def layer(x, scale, bias):
        return norms.batch_norm(x, state, scale, bias, train=True, axis_name="d")[0]

    def grad(x, scale, bias):
        return jax.grad(lambda *a: jnp.sum(layer(*a) ** 2), argnums=(0, 1, 2))(x, scale, bias)

    x = jax.ShapeDtypeStruct((devices, 1, 2, 2, channels), jnp.float32)
    p = jax.ShapeDtypeStruct((channels,), jnp.float32)
    out = {}
    with norms.default_sync_strategy(strategy):
        for mode, fn in (("fwd", layer), ("fwd+bwd", grad)):
            f = jax.pmap(
                fn, axis_name="d", in_axes=(0, None, None), devices=jax.devices()[:devices]
            )
            ops = collective_ops(f.lower(x, p, p).as_text())
            out[mode] = {
                "ops": [o["op"] for o in ops],
                "received": sum(received_bytes(o) for o in ops),
            }
    return out


def merge_times(devices: int, widths, rounds: int = 40) -> dict:
    """Median seconds of the merge alone, ``{C: {strategy: s}}``, interleaved rounds."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from norms import moments

    out = {}
    for c in widths:
        x = jnp.asarray(np.random.default_rng(0).normal(size=(devices, 2, c)), jnp.float32)
        fns = {
            s: jax.pmap(
                lambda x, s=s: moments(x, 0, axis_name="d", sync_strategy=s)[:2],
                axis_name="d",
                devices=jax.devices()[:devices],
            )
            for s in STRATEGIES
        }
        for f in fns.values():
            for _ in range(3):
                jax.block_until_ready(f(x))
        times = {s: [] for s in fns}
        for _ in range(rounds):
            for s, f in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(x))
                times[s].append(time.perf_counter() - t0)
        out[c] = {s: statistics.median(t) for s, t in times.items()}
    return out


def measure_here() -> dict:
    """Both tables' numbers; needs ``DEVICES`` visible devices."""
    import norms  # noqa: F401  (norms.moments is the function; the module is in sys.modules)

    moments_module = sys.modules["norms.moments"]
    return {
        "times": {n: merge_times(n, (64, 256, 1024, 2048)) for n in (8, 16)},
        "bytes": {n: {s: layer_collectives(n, s) for s in STRATEGIES} for n in (8, 64, 512)},
        "threshold": moments_module.GATHER_MAX_GROUP,
    }


def measure() -> dict:
    """:func:`measure_here` in a subprocess with ``DEVICES`` virtual CPU devices."""
    code = (
        "import json; from benchmarks.collectives_bench import measure_here; "
        "print(json.dumps(measure_here()))"
    )
    return json_with_cpu_devices(code, DEVICES)


def table(res: dict) -> str:
    lines = [
        "Merge alone (moments of a (2, C) batch per device under pmap), median ms, "
        "virtual CPU devices:",
        "",
        "| devices | C | gather (ms) | psum (ms) | gather / psum |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n, by_c in res["times"].items():
        for c, t in by_c.items():
            g, p = t["gather"] * 1e3, t["psum"] * 1e3
            lines.append(f"| {n} | {c} | {g:.3f} | {p:.3f} | {g / p:.2f} |")
    lines += [
        "",
        f"`auto` gathers on groups of up to {res['threshold']} devices and psums above.",
        "",
        "Bytes received per device by the collectives of one SyncBN layer "
        "(C = 2048, float32, train mode):",
        "",
        "| devices | strategy | fwd collectives | fwd KiB | fwd+bwd collectives | fwd+bwd KiB |",
        "|---:|---|---|---:|---|---:|",
    ]
    for n, by_s in res["bytes"].items():
        for s, modes in by_s.items():
            f, fb = modes["fwd"], modes["fwd+bwd"]
            lines.append(
                f"| {n} | {s} | {', '.join(f['ops'])} | {f['received'] / 1024:.1f} | "
                f"{', '.join(fb['ops'])} | {fb['received'] / 1024:.1f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> str:
    del argv
    out = table(measure())
    print(out)
    return out


if __name__ == "__main__":
    main()
