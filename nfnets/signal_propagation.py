"""Signal propagation plots (Brock, De & Smith, 2021, arXiv:2101.08692).

At initialization, feed a batch through a model and record, for every residual block
(in forward order), three statistics of channels-last activations `x` (N, H, W, C):

* `avg_sq_channel_mean`: `mean_c (mean_{N,H,W} x_c)^2` of the block output;
* `avg_channel_var`: `mean_c var_{N,H,W}(x_c)` of the block output (biased variance);
* `residual_var`: `mean_c var_{N,H,W}(f_c)` of the residual branch output `f`, before
  the alpha / SkipInit scaling.

The model must `sow` its activations into the "intermediates" collection: every block
calls `self.sow("intermediates", "block_out", h)` and `self.sow("intermediates",
"branch_out", f)`. Statistics go through `norms.moments` (float32).

For an NF-ResNet (alpha = 0.2) with its SkipInit gains set to 1 the block-output
variance follows `expected_std^2 = 1 + k * alpha^2` for the k-th block of a stage
(reset at each stage's transition block), the residual-branch variance stays near 1
and the squared channel mean stays small; an unnormalized ResNet's variance grows
with depth; a batch-normalized pre-activation ResNet's grows linearly within a stage.

Command line (writes a 3-panel PNG and prints progress):

    python -m nfnets.signal_propagation --models nf_resnet50,resnet50_v2 --out docs/spp.png

`docs/spp.png` (NF-ResNet-50 vs the batch-normalized pre-activation ResNet-50 vs the
unnormalized SkipInit ResNet-50) comes from `--models
nf_resnet50,resnet50_v2,resnet50_skipinit --batch 8 --size 128` (about a minute on two
CPU cores, mostly XLA compilation).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import norms
from nfnets.agc import path_names

METRICS = ("avg_sq_channel_mean", "avg_channel_var", "residual_var")
METRIC_TITLES = {
    "avg_sq_channel_mean": "average squared channel mean",
    "avg_channel_var": "average channel variance",
    "residual_var": "residual branch variance",
}
SKIPINIT_NAMES = ("skip_gain",)


def set_skipinit_gains(
    params: Any, value: float, names: Sequence[str] = SKIPINIT_NAMES
) -> tuple[Any, int]:
    """Returns `(params with every leaf named in `names` set to `value`, number set)`."""
    count = 0

    def visit(path, leaf):
        nonlocal count
        if path_names(path)[-1] in names:
            count += 1
            return jnp.full_like(leaf, value)
        return leaf

    return jax.tree_util.tree_map_with_path(visit, params), count


def count_skipinit_gains(variables: Mapping[str, Any], names: Sequence[str] = SKIPINIT_NAMES):
    """Number of SkipInit gain parameters (leaves named in `names`) in `variables`."""
    return set_skipinit_gains(variables.get("params", {}), 0.0, names)[1]


def _collect(tree: Mapping[str, Any], name: str, prefix: str = "") -> list[tuple[str, jax.Array]]:
    """(module path, value) for every sown `name`, in insertion (= forward call) order.

    Walks the nested dict itself: `jax.tree` flattening would sort the keys
    ("block10" before "block2").
    """
    found = []
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if key == name and isinstance(value, tuple):
            found.extend((path.rsplit("/", 1)[0], v) for v in value)
        elif isinstance(value, Mapping):
            found.extend(_collect(value, name, path))
    return found


def _channel_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean_c mean_c^2, mean_c var_c) over all but the last axis, via norms.moments."""
    mean, var, _ = norms.moments(x, tuple(range(x.ndim - 1)))
    return jnp.mean(jnp.square(mean)), jnp.mean(var)


def _prepare_variables(variables, skipinit_gain, skipinit_names) -> dict[str, Any]:
    """``variables`` without sown collections, SkipInit gains set when asked."""
    # flax's init returns what was sown during init; a second sow would append to it
    variables = {k: v for k, v in variables.items() if k not in ("intermediates", "batch_moments")}
    if skipinit_gain is not None:
        params, count = set_skipinit_gains(variables["params"], skipinit_gain, skipinit_names)
        if count == 0:
            raise ValueError(
                f"skipinit_gain={skipinit_gain} given but the model has no parameter named "
                f"{tuple(skipinit_names)}; pass skipinit_gain=None or the right skipinit_names"
            )
        variables["params"] = params
    return variables


def signal_propagation(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: jax.Array,
    *,
    skipinit_gain: float | None = None,
    skipinit_names: Sequence[str] = SKIPINIT_NAMES,
    train: bool | None = None,
    rng: jax.Array | None = None,
) -> dict[str, Any]:
    """Per-block signal propagation statistics of `model` on `images` (N, H, W, C).

    Args:
      model, variables: a flax model applied as `model.apply(variables, images,
        train=...)` whose residual blocks sow "block_out" and "branch_out".
      skipinit_gain: if given, every SkipInit gain (parameters named in
        `skipinit_names`) is set to this value first, e.g. 1.0 so the residual branches
        contribute (they are initialised to 0). A model without such gains is an error.
      train: mode of the forward pass. None (default) means True when `variables` has
        "batch_stats" (batch-normalized nets then use batch statistics, as in the first
        training step, not the untouched running averages) and False otherwise
        (deterministic: no dropout or stochastic depth).
      rng: key of the "dropout" stream when train=True (default `jax.random.key(0)`).

    Returns:
      dict with "blocks" (module paths, forward order), "shapes" (block output shapes)
      and float64 arrays of shape (num_blocks,) for each name in `METRICS`.
    """
    if jnp.ndim(images) != 4:
        raise ValueError(f"images must be NHWC (N, H, W, C), got shape {jnp.shape(images)}")
    variables = _prepare_variables(variables, skipinit_gain, skipinit_names)
    if train is None:
        train = "batch_stats" in variables
    mutable = ["intermediates"] + (["batch_stats", "batch_moments"] if train else [])
    rng = jax.random.key(0) if rng is None else rng
    meta: dict[str, list] = {}

    def stats(variables, images, rng):  # one jit: the forward pass and every statistic
        _, state = model.apply(
            variables, images, train=train, mutable=mutable, rngs={"dropout": rng}
        )
        inter = state.get("intermediates", {})
        block_out, branch_out = _collect(inter, "block_out"), _collect(inter, "branch_out")
        meta["blocks"] = [p for p, _ in block_out]
        meta["branches"] = [p for p, _ in branch_out]
        meta["shapes"] = [tuple(h.shape) for _, h in block_out]
        rows = [
            (*_channel_stats(h), _channel_stats(f)[1])
            for (_, h), (_, f) in zip(block_out, branch_out, strict=False)
        ]
        return jnp.asarray(rows, jnp.float32).reshape(len(rows), 3)

    table = np.asarray(jax.jit(stats)(variables, images, rng), np.float64)
    if not meta["blocks"]:
        raise ValueError(
            f"{type(model).__name__} sowed no 'block_out' intermediates; its residual blocks "
            "must call self.sow('intermediates', 'block_out', h) and ('branch_out', f)"
        )
    if meta["blocks"] != meta["branches"]:
        raise ValueError(
            "every block that sows 'block_out' must also sow 'branch_out'; got blocks "
            f"{meta['blocks']} and branches {meta['branches']}"
        )
    return {
        "blocks": meta["blocks"],
        "shapes": meta["shapes"],
        "avg_sq_channel_mean": table[:, 0],
        "avg_channel_var": table[:, 1],
        "residual_var": table[:, 2],
    }


def plot_signal_propagation(
    results: Mapping[str, Mapping[str, Any]], out_path: str, *, title: str | None = None
) -> None:
    """Three panels (squared channel mean, channel variance, residual variance) vs block.

    `results` maps a label (e.g. the model name) to `signal_propagation`'s output. The
    y axes are logarithmic (unnormalized nets grow exponentially); dotted vertical lines
    mark the first model's transition blocks (where the output shape changes).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("results is empty: nothing to plot")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    first = next(iter(results.values()))
    shapes = first["shapes"]
    transitions = [i for i in range(1, len(shapes)) if shapes[i] != shapes[i - 1]]
    for ax, metric in zip(axes, METRICS, strict=True):
        for label, res in results.items():
            y = np.asarray(res[metric])
            ax.plot(np.arange(len(y)), y, marker="o", markersize=3, label=label)
        for t in transitions:
            ax.axvline(t, color="gray", linestyle=":", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("residual block")
        ax.set_title(METRIC_TITLES[metric])
        ax.grid(True, which="major", alpha=0.3)
    axes[0].legend(fontsize=9)
    if title:
        fig.suptitle(title)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def run(
    model_names: Sequence[str],
    *,
    batch: int = 8,
    size: int = 64,
    seed: int = 0,
    skipinit_gain: float | None = 1.0,
    num_classes: int = 10,
    log=print,
) -> dict[str, dict[str, Any]]:
    """Initializes each registry model and measures it on N(0, 1) images (batch, size, size, 3).

    `skipinit_gain` is applied to the models that have SkipInit gains (the NF-ResNets
    and the unnormalized SkipInit ResNets), so their residual branches contribute.
    """
    from nfnets.registry import create_model

    # Parameters are drawn with the "rbg" generator: XLA compiles a full model's init
    # ~10x faster with it than with threefry on CPU; the statistics do not depend on it.
    key_params = jax.random.key(seed, impl="rbg")
    images = jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)
    results = {}
    for i, name in enumerate(model_names):
        t0 = time.perf_counter()
        log(f"[{i + 1}/{len(model_names)}] {name}: init ...")
        model = create_model(name, num_classes=num_classes)
        variables = jax.jit(lambda k, x, m=model: m.init({"params": k}, x, train=False))(
            key_params, images
        )
        gain = skipinit_gain if count_skipinit_gains(variables) else None
        res = signal_propagation(model, variables, images, skipinit_gain=gain)
        results[name] = res
        log(
            f"    {len(res['blocks'])} blocks, skipinit gains "
            f"{'set to ' + str(gain) if gain is not None else 'none'}; block-output variance "
            f"{res['avg_channel_var'][0]:.3g} -> {res['avg_channel_var'][-1]:.3g}, "
            f"residual variance {res['residual_var'][0]:.3g} -> {res['residual_var'][-1]:.3g} "
            f"({time.perf_counter() - t0:.1f} s)"
        )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nfnets.signal_propagation", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--models", required=True, help="comma-separated registry names")
    parser.add_argument("--out", required=True, help="output PNG path")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--skipinit-gain",
        type=float,
        default=1.0,
        help="value for SkipInit gains of models that have them (default 1.0)",
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if not names:
        parser.error("--models is empty; give e.g. nf_resnet50,resnet50_v2")
    if args.batch < 2 or args.size < 1:
        parser.error(f"--batch must be >= 2 and --size >= 1, got {args.batch} and {args.size}")
    from nfnets.registry import MODEL_NAMES

    unknown = [n for n in names if n not in MODEL_NAMES]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; valid names: {', '.join(MODEL_NAMES)}")
    results = run(
        names, batch=args.batch, size=args.size, seed=args.seed, skipinit_gain=args.skipinit_gain
    )
    plot_signal_propagation(
        results,
        args.out,
        title=f"Signal propagation at init: N(0,1) inputs, batch {args.batch}, "
        f"{args.size}x{args.size}; SkipInit gains set to {args.skipinit_gain} where present; "
        "batch norm uses batch statistics",
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
