"""Training-step throughput: normalizer-free ResNets vs their batch-norm twins.

Run: ``python -m benchmarks.models_bench`` (or ``make bench``). Prints a markdown table.

One training step = jitted forward + backward + ``optax.sgd(0.1, momentum=0.9)``
update on softmax cross-entropy, with the batch-norm models also updating their
running statistics (``mutable=["batch_stats"]``). Each step function is compiled
and warmed up first; then the models of a pair are timed in interleaved rounds (so
background load hits them alike) and the median images/s per model is reported
with the ratio NF / BN (> 1: the NF model is faster). XLA's cost-model FLOP
estimate per image (forward + backward + update, from the lowered step) is printed
alongside: it does not depend on machine load, unlike the timings.

Pairs (default, CPU-sized):

1. ``nf_resnet50`` vs ``resnet50_v2`` with batch norm (the same pre-activation
   bottleneck ResNet-50 with BN), 64x64x3 images, batch 32.
2. ``nf_resnet26_small`` vs its BN twin (``resnet50_v2_small`` with depths
   (2, 2, 2, 2), i.e. the same ResNet-26 layout), 28x28x1 images, batch 32.

Reading the numbers: scaled weight standardization re-standardizes every conv
kernel in the forward and the backward pass of every step, a cost proportional to
the parameter count and independent of the batch, while batch norm's cost grows
with the activations. At small batches and images on a CPU the NF step can
therefore be a little slower despite equal FLOPs; the gap should shrink as
batch x resolution grows. At 64x64 ResNet-50's last stage runs 3x3 convolutions
on 2x2 maps, which XLA's CPU backend executes slowly (seconds per step at batch 32,
the same in both models), so that pair's ratio is pulled towards 1.

Stochastic depth and dropout are off in both models of a pair, so the comparison
is architecture against architecture. ``--preset accelerator`` instead times
NFNet-F0 at 192px (alone: the registry has no BN NFNet) and NF-ResNet-50 vs
ResNet-50 v2 + BN at 224px (ImageNet training resolutions), batch 64, bfloat16
compute with float32 parameters, for a GPU/TPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

from nfnets import create_model


@dataclasses.dataclass(frozen=True)
class Case:
    """One model to time: registry name, overrides, input shape (H, W, C), batch."""

    label: str
    name: str
    overrides: dict[str, Any]
    image: tuple[int, int, int]
    batch: int


def _pairs(preset: str) -> list[tuple[Case, ...]]:
    """Groups timed together: (NF model, BN twin), or an NF model alone."""
    if preset == "cpu":
        return [
            (
                Case("NF-ResNet-50", "nf_resnet50", {"stochastic_depth": 0.0}, (64, 64, 3), 32),
                Case("ResNet-50 v2 + BN", "resnet50_v2", {"norm": "batch_norm"}, (64, 64, 3), 32),
            ),
            (
                Case(
                    "NF-ResNet-26 small",
                    "nf_resnet26_small",
                    {"stochastic_depth": 0.0},
                    (28, 28, 1),
                    32,
                ),
                Case(
                    "ResNet-26 v2 small + BN",
                    "resnet50_v2_small",
                    {"depths": (2, 2, 2, 2), "norm": "batch_norm"},
                    (28, 28, 1),
                    32,
                ),
            ),
        ]
    if preset == "accelerator":
        bf16 = {"dtype": jnp.bfloat16, "stochastic_depth": 0.0, "dropout": 0.0}
        return [
            (Case("NFNet-F0 bf16", "nfnet_f0", bf16, (192, 192, 3), 64),),
            (
                Case("NF-ResNet-50 bf16", "nf_resnet50", bf16, (224, 224, 3), 64),
                Case(
                    "ResNet-50 v2 + BN bf16",
                    "resnet50_v2",
                    {"dtype": jnp.bfloat16},
                    (224, 224, 3),
                    64,
                ),
            ),
        ]
    raise ValueError(f"unknown preset {preset!r}; choose 'cpu' or 'accelerator'")


def make_step(case: Case, num_classes: int = 10):
    """Returns ``(step, state, batch)``: a jitted train step and its initial inputs."""
    model = create_model(case.name, num_classes=num_classes, **case.overrides)
    h, w, c = case.image
    x = jax.random.normal(jax.random.key(0), (case.batch, h, w, c))
    labels = jax.random.randint(jax.random.key(1), (case.batch,), 0, num_classes)
    variables = jax.jit(
        lambda x: model.init({"params": jax.random.key(2, impl="rbg")}, x, train=False)
    )(x)
    params = variables["params"]
    extra = {k: v for k, v in variables.items() if k != "params"}
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = tx.init(params)

    def loss_fn(params, extra, x, labels, key):
        logits, updates = model.apply(
            {"params": params, **extra},
            x,
            train=True,
            rngs={"dropout": key},
            mutable=list(extra),
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, updates

    @jax.jit
    def step(params, opt_state, extra, x, labels, key):
        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, extra, x, labels, key
        )
        deltas, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, deltas)
        return params, opt_state, {**extra, **updates}, loss

    state = (params, opt_state, extra)
    return step, state, (x, labels)


def _run(step, state, batch, key):
    params, opt_state, extra = state
    out = step(params, opt_state, extra, *batch, key)
    jax.block_until_ready(out)
    return out[:3]


def step_gflops(step, state, batch) -> float:
    """XLA's cost-model estimate of one step's floating-point work (GFLOP), load-free."""
    cost = step.lower(*state, *batch, jax.random.key(0)).cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per computation
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan"))) / 1e9


def time_pair(pair: tuple[Case, ...], rounds: int, warmup: int) -> list[tuple[Case, float, float]]:
    """Per case: median images/s (interleaved rounds after compile + warm-up) and GFLOP/image."""
    built = []
    flops = []
    for case in pair:
        step, state, batch = make_step(case)
        flops.append(step_gflops(step, state, batch) / case.batch)
        start = time.perf_counter()
        state = _run(step, state, batch, jax.random.key(0))
        compile_s = time.perf_counter() - start
        for i in range(warmup):
            state = _run(step, state, batch, jax.random.key(i))
        built.append([case, step, state, batch, [], compile_s])
    for r in range(rounds):
        for entry in built:
            case, step, state, batch, times, _ = entry
            start = time.perf_counter()
            entry[2] = _run(step, state, batch, jax.random.key(r))
            times.append(time.perf_counter() - start)
    return [
        (case, case.batch / statistics.median(times), gflop)
        for (case, _, _, _, times, _), gflop in zip(built, flops, strict=True)
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", choices=("cpu", "accelerator"))
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compile")
    args = parser.parse_args(argv if argv is not None else [])
    device = jax.devices()[0]
    print(
        f"jax {jax.__version__}, {device.platform} ({device.device_kind}), "
        f"{jax.device_count()} device(s), {platform.processor() or platform.machine()}; "
        f"median of {args.rounds} interleaved steps after {args.warmup} warm-up\n"
    )
    print("| model | input | batch | images/s | NF / BN speed | GFLOP/image (XLA estimate) |")
    print("|---|---|---|---|---|---|")
    for pair in _pairs(args.preset):
        results = time_pair(pair, args.rounds, args.warmup)
        for i, (case, ips, gflop) in enumerate(results):
            h, w, c = case.image
            ratio = f"{ips / results[1][1]:.2f}" if i == 0 and len(results) == 2 else ""
            print(
                f"| {case.label} | {h}x{w}x{c} | {case.batch} | {ips:.1f} | {ratio} | {gflop:.2f} |"
            )


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
