"""Batch renormalization (Ioffe, 2017) as a pure function with explicit state.

Train mode normalizes with the batch statistics and corrects towards the running
ones, the corrections being constants for the gradient::

    sigma_B = sqrt(var_B + eps),  sigma = sqrt(running_var + eps)
    r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
    d = stop_gradient(clip((mu_B - running_mean) / sigma, -d_max, d_max))
    y = ((x - mu_B) / sigma_B * r + d) * scale + bias

With ``r_max = 1`` and ``d_max = 0`` this is batch norm exactly. Eval uses the
running statistics, like batch norm. The running mean/variance are updated as in
:func:`norms.batch_norm` (``new = momentum * old + (1 - momentum) * batch``, momentum
is the weight on the old value; non-finite batches skipped), and ``sigma`` is
derived from the running variance. ``r_max``/``d_max`` may be numbers or callables
of the training step, which lives in the state (so it is checkpointed) and
advances by one per training call whose batch was not skipped as non-finite.
:func:`paper_r_max`/:func:`paper_d_max` are the paper's ImageNet schedules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from norms.batch_norm import batch_statistics, normalize, normalize_with_running_stats
from norms.checks import prepare
from norms.running_stats import init_batch_norm_state, update_running_stats

Schedule = float | Callable[[jax.Array], jax.Array]

# Paper schedule (ImageNet, Sec. 4): r_max 1 -> 3 and d_max 0 -> 5, ramping linearly
# after 5k steps; r_max reaches 3 at 40k steps, d_max reaches 5 at 25k steps.
RAMP_START = 5_000
R_MAX_END, R_MAX_FINAL = 40_000, 3.0
D_MAX_END, D_MAX_FINAL = 25_000, 5.0


class BatchRenormState(NamedTuple):
    """Running statistics of a batch renorm layer.

    Attributes:
      mean: (C,) running mean (float32 unless created with another ``dtype``).
      var: (C,) running (biased) variance, same dtype; ``sigma = sqrt(var + eps)``.
      count: () int32 number of running updates applied (non-finite batches skipped).
      step: () int32 number of training calls whose batch statistics were applied
        (a skipped non-finite batch advances neither ``count`` nor ``step``); the
        argument of r_max/d_max schedules.
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array
    step: jax.Array


def init_batch_renorm_state(num_features: int, dtype=jnp.float32) -> BatchRenormState:
    """Fresh state: mean 0, var 1 ((C,), ``dtype``), count 0 and step 0 (int32).

    The batch-norm fields come from :func:`norms.running_stats.init_batch_norm_state`."""
    state = init_batch_norm_state(num_features, dtype)
    return BatchRenormState(*state, step=jnp.zeros((), jnp.int32))


def _ramp(step, end: int, start_value: float, final_value: float) -> jax.Array:
    frac = (jnp.asarray(step, jnp.float32) - RAMP_START) / (end - RAMP_START)
    return start_value + (final_value - start_value) * jnp.clip(frac, 0.0, 1.0)


def paper_r_max(step) -> jax.Array:
    """r_max of the paper: 1 until step 5k, then linearly to 3 at step 40k, then 3."""
    return _ramp(step, R_MAX_END, 1.0, R_MAX_FINAL)


def paper_d_max(step) -> jax.Array:
    """d_max of the paper: 0 until step 5k, then linearly to 5 at step 25k, then 5."""
    return _ramp(step, D_MAX_END, 0.0, D_MAX_FINAL)


def _limit(value: Schedule, step, name: str, lowest: float, who: str) -> jax.Array:
    if callable(value):
        return jnp.asarray(value(step), jnp.float32)
    if isinstance(value, int | float) and value < lowest:
        raise ValueError(
            f"{who}: {name}={value} must be >= {lowest} ({name}={lowest} disables the "
            "correction, giving plain batch norm)"
        )
    return jnp.asarray(value, jnp.float32)


def batch_renorm(
    x: jax.Array,
    state: BatchRenormState,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    train: bool,
    r_max: Schedule = 3.0,
    d_max: Schedule = 5.0,
    momentum=0.99,
    eps: float = 1e-5,
    axis: int = -1,
    axis_name: str | tuple[str, ...] | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: jax.Array | None = None,
    on_stale: str = "warn",
    return_batch_stats: bool = False,
) -> tuple[jax.Array, BatchRenormState]:
    """Batch renormalization of ``x`` of shape (N, ..., C) (channel axis ``axis``).

    Args:
      x: input, any real dtype; statistics float32, output in ``x``'s dtype
        (float32 for integer inputs).
      state: :class:`BatchRenormState`.
      scale, bias: optional (C,) affine parameters.
      train: required; eval (``False``) normalizes with the running statistics and
        returns ``state`` unchanged (frozen: gradients still flow).
      r_max: bound of ``r`` (>= 1), a number or a callable of ``state.step``
        (e.g. :func:`paper_r_max`).
      d_max: bound of ``|d|`` (>= 0), a number or a callable of ``state.step``
        (e.g. :func:`paper_d_max`).
      momentum: weight on the OLD running value (PyTorch 0.01 == 0.99 here).
      eps, axis, axis_name, axis_index_groups, mask, on_stale, return_batch_stats:
        as in :func:`norms.batch_norm`.

    Returns:
      ``(y, new_state)`` (plus the batch moments with ``return_batch_stats``); in
      train mode ``new_state.step = state.step + 1`` and the
      running statistics are updated once (the correction uses the running
      statistics from BEFORE this update). A batch whose statistics are not
      finite (or that is entirely masked) is skipped: the whole state, ``step``
      included, comes back unchanged, so a schedule does not advance on steps the
      optimizer skips.
    """
    who = "batch_renorm"
    x, ax, scale, bias = prepare(
        x, state, scale, bias, axis=axis, momentum=momentum, eps=eps, on_stale=on_stale, who=who
    )
    if not train:
        y = normalize_with_running_stats(
            x, state, scale, bias, eps=eps, axis=ax, on_stale=on_stale, who=who
        )
        return (y, state, None) if return_batch_stats else (y, state)
    rmax = _limit(r_max, state.step, "r_max", 1.0, who)
    dmax = _limit(d_max, state.step, "d_max", 0.0, who)
    stats = batch_statistics(
        x, axis=ax, axis_name=axis_name, axis_index_groups=axis_index_groups, mask=mask, who=who
    )
    cdt = stats.mean.dtype
    run_mean = state.mean.astype(cdt).reshape(stats.mean.shape)
    run_sigma = jnp.sqrt(state.var.astype(cdt).reshape(stats.mean.shape) + eps)
    batch_sigma = jnp.sqrt(stats.var + eps)
    r = jax.lax.stop_gradient(jnp.clip(batch_sigma / run_sigma, 1.0 / rmax, rmax))
    d = jax.lax.stop_gradient(jnp.clip((stats.mean - run_mean) / run_sigma, -dmax, dmax))
    y = normalize(
        x, stats.mean, stats.var, scale, bias, eps=eps, axis=ax, out_dtype=x.dtype, r=r, d=d
    )
    new_state = update_running_stats(
        state,
        jax.lax.stop_gradient(stats.run_mean),
        jax.lax.stop_gradient(stats.run_var),
        jax.lax.stop_gradient(stats.run_count),
        momentum=momentum,
    )
    # update_running_stats advances count only for a batch it did not skip.
    applied = new_state.count != state.count
    step = jnp.asarray(state.step)
    new_state = new_state._replace(step=jnp.where(applied, step + 1, step).astype(step.dtype))
    if return_batch_stats:
        return y, new_state, jax.tree.map(jax.lax.stop_gradient, stats.moments())
    return y, new_state


__all__ = [
    "BatchRenormState",
    "batch_renorm",
    "init_batch_renorm_state",
    "paper_d_max",
    "paper_r_max",
]
