"""How far running statistics are from the population statistics, layer by layer.

Batch norm evaluates with running averages of the batch moments; PreciseBN
(:func:`norms.recompute_batch_stats`) re-estimates the population moments with the
final weights. When the two disagree, eval-mode outputs shift and validation
accuracy drops. Per channel ``c`` of a layer::

    mean_shift[c] = |mu_run[c] - mu_pop[c]| / sqrt(var_pop[c] + eps)
    var_log_ratio[c] = |log((var_run[c] + eps) / (var_pop[c] + eps))|

``mean_shift`` is the error of the running mean in units of the population
standard deviation (a shift of 1 moves every normalized activation by one sigma);
``var_log_ratio`` is 0 for equal variances and ``log 2 = 0.69`` when one is twice
the other. Both are reported as the max and the mean over the layer's channels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from norms.running_stats import has_stats_field, stats_field


def _field(node: Any, key: str) -> Any:
    """``node``'s entry ``key``, or None when the node has none (e.g. no running mean)."""
    return stats_field(node, key) if has_stats_field(node, key) else None


def _is_node(node: Any) -> bool:
    """A (mean, var) node: a mapping or NamedTuple with ``var`` (``mean`` optional)."""
    if isinstance(node, Mapping):
        return "var" in node and not isinstance(node["var"], Mapping)
    return isinstance(node, tuple) and "var" in getattr(node, "_fields", ())


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Maps 'a/b/c' layer paths to their (mean, var) nodes."""
    if _is_node(tree):
        return {prefix: tree}
    if isinstance(tree, Mapping):
        items = tree.items()
    elif isinstance(tree, list | tuple):
        items = enumerate(tree)
    else:
        raise TypeError(
            f"compare_batch_stats: {prefix or '<root>'} holds a {type(tree).__name__}, "
            "expected nested mappings of {'mean', 'var'} nodes"
        )
    out = {}
    for key, sub in items:
        out.update(_flatten(sub, f"{prefix}/{key}" if prefix else str(key)))
    return out


def _layer_report(run: Any, pop: Any, eps: float, name: str) -> dict[str, float | int | None]:
    var_run = np.asarray(_field(run, "var"), np.float64)
    var_pop = np.asarray(_field(pop, "var"), np.float64)
    if var_run.shape != var_pop.shape:
        raise ValueError(
            f"compare_batch_stats: {name} has var of shape {var_run.shape} in `running` "
            f"but {var_pop.shape} in `population`"
        )
    ratio = np.abs(np.log((var_run + eps) / (var_pop + eps)))
    report: dict[str, float | int | None] = {
        "mean_shift_max": None,
        "mean_shift_mean": None,
        "var_log_ratio_max": float(ratio.max()),
        "var_log_ratio_mean": float(ratio.mean()),
        "channels": int(var_run.size),
    }
    mu_run, mu_pop = _field(run, "mean"), _field(pop, "mean")
    if mu_run is not None and mu_pop is not None:
        shift = np.abs(np.asarray(mu_run, np.float64) - np.asarray(mu_pop, np.float64))
        shift = shift / np.sqrt(var_pop + eps)
        report["mean_shift_max"] = float(shift.max())
        report["mean_shift_mean"] = float(shift.mean())
    return report


def compare_batch_stats(
    running: Any, population: Any, eps: float = 1e-5
) -> dict[str, dict[str, float | int | None]]:
    """Per-layer distance between running and population statistics.

    Args:
      running: a pytree of stats nodes (mappings or NamedTuples with ``var`` of
        shape (C,) and usually ``mean`` of shape (C,)), e.g. a flax
        ``"batch_stats"`` collection or a tree of :class:`norms.BatchNormState`.
      population: the same structure (extra entries such as ``count`` are
        ignored), e.g. the output of :func:`norms.recompute_batch_stats`. Layers
        of ``running`` that ``population`` lacks are an error; layers only in
        ``population`` are ignored.
      eps: added to both variances, as in the normalization itself.

    Returns:
      ``{layer_path: {"mean_shift_max", "mean_shift_mean", "var_log_ratio_max",
      "var_log_ratio_mean", "channels"}}`` with paths like ``"stage1/bn2"``, in
      the order of ``running``, as Python floats computed in float64. The mean
      shift entries are ``None`` for layers without a mean in either tree (e.g.
      EvoNorm-B0, which keeps only a running variance).
    """
    if not eps >= 0:
        raise ValueError(f"compare_batch_stats: eps must be >= 0, got {eps!r}")
    run_nodes, pop_nodes = _flatten(running), _flatten(population)
    missing = [name for name in run_nodes if name not in pop_nodes]
    if missing:
        raise ValueError(
            f"compare_batch_stats: no population statistics for {missing}; "
            f"`population` has {sorted(pop_nodes)}"
        )
    return {
        name: _layer_report(node, pop_nodes[name], eps, name) for name, node in run_nodes.items()
    }


__all__ = ["compare_batch_stats"]
