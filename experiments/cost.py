"""Training-step throughput of every norm on the same model and batch.

The price of each remedy: images per second of one training step (forward,
backward, SGD-Nesterov update, batch-statistics update) of the tiny ResNet-18 v2
of ``batch_size`` (stem 8, widths 8/16/32) at batch 128 on 28x28x1 inputs, one
device, for each norm, as a ratio to the same model without normalization
(``norm="none"``). All norms are compiled first, then timed in one process,
interleaved: 9 rounds, each running 10 steps of every norm in a rotated order;
the table gives the median over rounds (the machine is shared, so interleaving
spreads load changes over every norm alike).

The step is ``jax.jit`` of ``value_and_grad`` of the cross-entropy through
``nfnets.create_model``'s model and an optax update: the per-norm part of the
trainer's step (its metric sums and non-finite guard cost the same for every norm).
SyncBN has no cost on one device and is not listed.

``--quick``: one stage of width 4, 1 round of 1 step.
"""

from __future__ import annotations

import statistics
import sys
import time

from experiments import grid

NORMS = {  # key -> (label, norm, norm_kwargs, ws_conv)
    "none": ("no normalization", "none", {}, False),
    "bn": ("BN", "batch_norm", {}, False),
    "bn_ghost16": ("BN, ghost batches of 16", "batch_norm", {"ghost_batch_size": 16}, False),
    "bn_ghost2": ("BN, ghost batches of 2", "batch_norm", {"ghost_batch_size": 2}, False),
    "brn": ("batch renorm", "batch_renorm", {}, False),
    "sn": ("switchable norm", "switchable_norm", {}, False),
    "evonorm_b0": ("EvoNorm-B0", "evonorm_b0", {}, False),
    "gn": ("GN (4 groups)", "group_norm", {"num_groups": 4}, False),
    "gn_ws": ("GN + WS", "group_norm", {"num_groups": 4}, True),
    "ln": ("LN", "layer_norm", {}, False),
    "in": ("IN", "instance_norm", {}, False),
    "frn": ("FRN + TLU", "frn", {}, False),
    "evonorm_s0": ("EvoNorm-S0 (4 groups)", "evonorm_s0", {"num_groups": 4}, False),
}
BASELINE = "none"


def sizes(quick: bool) -> dict:
    model = grid.QUICK_RESNET if quick else grid.TINY_RESNET
    return {**model, "batch_size": 32 if quick else 128}


def cells(quick: bool) -> list[grid.Cell]:
    out = []
    for key, (label, norm, kwargs, ws) in NORMS.items():
        if quick and "num_groups" in kwargs:
            kwargs = {"num_groups": 2}
        overrides = {
            **sizes(quick),
            "model_kwargs.norm": norm,
            "model_kwargs.norm_kwargs": kwargs,
            "model_kwargs.ws_conv": ws,
        }
        out.append(grid.Cell(key, "fashion_mnist_norms", overrides, 0, {"label": label}))
    return out


def make_step(config):
    """(jitted step, initial carry) for the model of ``config`` at ``config.batch_size``."""
    import jax
    import optax

    from nfnets import create_model

    model = create_model(config.model, num_classes=10, **config.model_kwargs.to_dict())
    n = config.batch_size
    x = jax.random.normal(jax.random.key(0), (n, 28, 28, 1))
    y = jax.random.randint(jax.random.key(1), (n,), 0, 10)
    variables = model.init({"params": jax.random.key(2)}, x[:1], train=False)
    params, stats = variables["params"], variables.get("batch_stats", {})
    tx = optax.sgd(0.05, momentum=0.9, nesterov=True)

    def loss_fn(params, stats):
        v = {"params": params, **({"batch_stats": stats} if stats else {})}
        logits, new = model.apply(
            v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(3)}
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, new.get("batch_stats", stats)

    @jax.jit
    def step(carry):
        params, stats, opt_state = carry
        (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state

    carry = (params, stats, tx.init(params))
    return step, carry


def run_cells(todo: list[grid.Cell], all_cells: list[grid.Cell], ctx: grid.Context) -> list[dict]:
    """Times ``todo`` (plus the baseline) interleaved in this process; returns entries."""
    import jax

    rounds, steps = (1, 1) if ctx.quick else (9, 10)
    base = next(c for c in all_cells if c.key == BASELINE)
    cells = todo if base in todo else [base, *todo]
    runners = {}
    for cell in cells:
        print(f"[cost] compiling {cell.key}", flush=True)
        step, carry = make_step(grid.build_config(cell))
        carry = jax.block_until_ready(step(carry))  # compile + one warm-up step
        runners[cell.key] = [step, carry]
    times = {c.key: [] for c in cells}
    for r in range(rounds):
        order = cells[r % len(cells) :] + cells[: r % len(cells)]
        for cell in order:
            step, carry = runners[cell.key]
            t0 = time.perf_counter()
            for _ in range(steps):
                carry = step(carry)
            jax.block_until_ready(carry)
            times[cell.key].append((time.perf_counter() - t0) / steps)
            runners[cell.key][1] = carry
        print(f"[cost] round {r + 1}/{rounds} done", flush=True)
    batch = sizes(ctx.quick)["batch_size"]
    base_t = statistics.median(times[BASELINE])
    env = grid.git_state()
    entries = []
    for cell in cells:
        if cell not in todo:
            continue
        t = statistics.median(times[cell.key])
        entries.append(
            {
                "key": cell.key,
                "config": f"configs/{cell.config}.py",
                "overrides": {
                    k: list(v) if isinstance(v, tuple) else v for k, v in cell.overrides.items()
                },
                "seed": 0,
                "info": cell.info,
                "status": "ok",
                "diverged": False,
                "step_time_s": t,
                "step_times_s": times[cell.key],
                "images_per_sec": batch / t,
                "throughput_ratio_to_none": base_t / t,
                "steps": rounds * steps,
                "rounds": rounds,
                "cell_time_s": sum(times[cell.key]) * steps,
                "git_commit": env["commit"],
            }
        )
    return entries


def table(entries: list[dict]) -> str:
    rows = [
        [
            e["info"]["label"],
            f"{1000 * e['step_time_s']:.1f}",
            f"{e['images_per_sec']:.0f}",
            f"{e['throughput_ratio_to_none']:.2f}",
        ]
        for e in entries
    ]
    headers = ["norm", "step time (ms, median)", "images/s", "throughput / no norm"]
    return grid.markdown_table(headers, rows)


def plot(entries: list[dict], path: str) -> None:
    fig, axes = grid.new_figure(width=7.0, height=4.5)
    ax = axes[0][0]
    labels = [e["info"]["label"] for e in entries]
    ax.barh(labels, [e["throughput_ratio_to_none"] for e in entries], color="C0")
    ax.axvline(1.0, c="k", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("training throughput relative to no normalization")
    ax.set_title("Cost of each norm (tiny ResNet-18 v2, batch 128, 1 CPU device)")
    grid.save_figure(fig, path)


EXPERIMENT = grid.Experiment(
    name="cost",
    description=grid.describe(__doc__),
    cells=cells,
    table=table,
    plot=plot,
    run_cells=run_cells,
)

if __name__ == "__main__":
    grid.main(EXPERIMENT, sys.argv[1:])
