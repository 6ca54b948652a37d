"""Training state, its device placement and the data-parallel train step (pmap).

The step is written for ``jax.pmap(..., axis_name=axis_name)``: every device holds
a replica of the state and its slice of the global batch. Per step:

1. forward/backward in train mode; norm layers built with ``axis_name`` (SyncBN)
   compute their statistics across devices themselves;
2. loss and gradients averaged over the axis (``lax.pmean``), so every device
   applies the same update;
3. non-finite guard: ``finite = all(isfinite(loss), isfinite(grads))`` on the
   averaged values (then ``pmin``-ed, so every device agrees); when False the step
   changes nothing (parameters, optimizer state, batch statistics, EMA), only the
   step counter advances and the skip is counted;
4. optional parameter EMA.

The state carries running sums of the train metrics since the last log
(``metric_sums``) so a checkpoint restores them and a resumed run logs the same
numbers as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nfnets.training.losses import accuracy, smoothed_cross_entropy
from nfnets.training.optim import update_ema

PyTree = Any


def zero_metric_sums() -> dict[str, jax.Array]:
    """Running sums since the last log: loss and accuracy summed over good steps, counts."""
    return {
        "loss": jnp.zeros((), jnp.float32),
        "accuracy": jnp.zeros((), jnp.float32),
        "steps": jnp.zeros((), jnp.int32),
        "skipped": jnp.zeros((), jnp.int32),
    }


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes (a pytree; checkpointed as is).

    Attributes:
      step: () int32, steps attempted so far (skipped ones included): the data position.
      params: model parameters.
      batch_stats: the model's "batch_stats" collection ({} for normalizer-free models).
      opt_state: optax state.
      ema_params: EMA of the parameters, or None when EMA is off.
      metric_sums: see ``zero_metric_sums``; reset by the loop after each log.
      num_skipped: () int32, non-finite steps skipped in the whole run.
      skip_streak: () int32, non-finite steps skipped in a row up to this step.
      longest_skip_streak: () int32, the longest such run so far (the loop stops a
        diverged run when it reaches ``config.max_consecutive_skipped_steps``).
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    ema_params: PyTree
    metric_sums: dict[str, jax.Array]
    num_skipped: jax.Array
    skip_streak: jax.Array = 0
    longest_skip_streak: jax.Array = 0


def init_variables(
    model: nn.Module, rng: jax.Array, images: jax.Array, axis_name: str | None = "batch"
) -> PyTree:
    """``model.init`` in eval mode with ``axis_name`` bound (a size-1 vmap axis).

    Norms built with ``axis_name`` (SyncBN) may check at trace time that the axis
    exists; binding it lets the same model be initialised outside pmap.
    Not jitted (call it under ``jax.jit`` or ``jax.eval_shape``).
    """
    init = lambda: model.init({"params": rng}, images, train=False)
    if axis_name is None:
        return init()
    batched = jax.vmap(lambda _: init(), axis_name=axis_name)(jnp.zeros((1,)))
    return jax.tree.map(lambda x: x[0], batched)


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    image_shape: tuple[int, ...],
    *,
    use_ema: bool = False,
    axis_name: str | None = "batch",
) -> TrainState:
    """Initialises parameters on one example of shape ``image_shape`` (H, W, C), unreplicated."""
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    variables = jax.jit(lambda k: init_variables(model, k, dummy, axis_name))(rng)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
        metric_sums=zero_metric_sums(),
        num_skipped=jnp.zeros((), jnp.int32),
        skip_streak=jnp.zeros((), jnp.int32),
        longest_skip_streak=jnp.zeros((), jnp.int32),
    )


def tree_all_finite(tree: PyTree) -> jax.Array:
    """() bool: every element of every floating leaf is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _select(pred: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def model_variables(params: PyTree, batch_stats: PyTree) -> dict[str, PyTree]:
    """``{"params": ..., "batch_stats": ...}`` for ``model.apply``; no "batch_stats" when empty.

    Normalizer-free models have no running statistics; flax rejects an empty
    collection in ``mutable``, so it is left out.
    """
    if not jax.tree.leaves(batch_stats):
        return {"params": params}
    return {"params": params, "batch_stats": batch_stats}


def _loss_and_stats(model, params, batch_stats, images, labels, rng, label_smoothing):
    """Mean training loss and ``(logits, new batch_stats)`` of one forward pass."""
    variables = model_variables(params, batch_stats)
    rngs = {"dropout": rng}
    if "batch_stats" in variables:
        logits, mutated = model.apply(
            variables, images, train=True, rngs=rngs, mutable=["batch_stats"]
        )
        new_stats = mutated["batch_stats"]
    else:
        logits, new_stats = model.apply(variables, images, train=True, rngs=rngs), batch_stats
    loss = jnp.mean(smoothed_cross_entropy(logits, labels, label_smoothing))
    return loss, (logits, new_stats)


def _add_metrics(sums: dict, finite: jax.Array, loss: jax.Array, acc: jax.Array) -> dict:
    """``metric_sums`` after one step: loss/accuracy only from finite steps, both counts."""
    ok = finite.astype(jnp.int32)
    return {
        "loss": sums["loss"] + jnp.where(finite, loss, 0.0),
        "accuracy": sums["accuracy"] + finite.astype(jnp.float32) * acc,
        "steps": sums["steps"] + ok,
        "skipped": sums["skipped"] + (1 - ok),
    }


def training_targets(batch: dict) -> jax.Array:
    """What the loss trains on: the mixed soft labels (n, K) of MixUp/CutMix when the
    batch has them ("label_probs"), else the class ids "label" (n,)."""
    return batch.get("label_probs", batch["label"])


def _streaks(state: TrainState, finite: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(skip_streak, longest_skip_streak)`` after a step: a skipped step extends the run."""
    streak = jnp.where(finite, 0, jnp.asarray(state.skip_streak, jnp.int32) + 1)
    return streak, jnp.maximum(jnp.asarray(state.longest_skip_streak, jnp.int32), streak)


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    label_smoothing: float = 0.0,
    ema_decay_fn: Callable[[jax.Array], jax.Array] | None = None,
    axis_name: str = "batch",
) -> Callable[[TrainState, dict, jax.Array], TrainState]:
    """The per-device step ``(state, batch, rng) -> state`` to wrap in pmap.

    Args:
      model: flax module applied as ``model.apply(vars, images, train=True, rngs=...)``.
      tx: optax transformation (``tx.update(grads, opt_state, params)``).
      label_smoothing: for ``smoothed_cross_entropy``.
      ema_decay_fn: decay at a step for the parameter EMA; None when EMA is off.
      axis_name: the pmap axis name the step averages over.

    ``batch`` holds "image" (n, H, W, C) and "label" (n,) int or (n, K) soft labels
    for this device, and with MixUp/CutMix "label_probs" (n, K): the loss then uses
    "label_probs" and the accuracy "label" (see ``training_targets``). ``rng`` is the
    run's base key (the same on every device): the step folds in the step number and
    the device index, so dropout / stochastic depth noise depends only on (seed,
    step, device), which makes resuming exact.
    The step's device-averaged loss and accuracy are added to ``metric_sums`` (a
    skipped step adds to its ``skipped`` count instead).
    """

    def step_fn(state: TrainState, batch: dict, rng: jax.Array) -> TrainState:
        images, labels, targets = batch["image"], batch["label"], training_targets(batch)
        rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), jax.lax.axis_index(axis_name))
        (loss, (logits, new_stats)), grads = jax.value_and_grad(_loss_and_stats, 1, has_aux=True)(
            model, state.params, state.batch_stats, images, targets, rng, label_smoothing
        )
        grads = jax.lax.pmean(grads, axis_name)
        loss = jax.lax.pmean(loss, axis_name)
        acc = jax.lax.pmean(jnp.mean(accuracy(logits, labels)), axis_name)
        finite = jnp.logical_and(jnp.isfinite(loss), tree_all_finite(grads))
        # All devices must take the same branch: grads are already averaged, but a
        # device whose own batch statistics went non-finite must veto too.
        finite = jnp.logical_and(finite, tree_all_finite(new_stats))
        finite = jax.lax.pmin(finite.astype(jnp.int32), axis_name).astype(bool)

        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        new_ema = state.ema_params
        streak, longest = _streaks(state, finite)
        if ema_decay_fn is not None:
            new_ema = update_ema(state.ema_params, new_params, ema_decay_fn(state.step))
        return state.replace(
            step=state.step + 1,
            params=_select(finite, new_params, state.params),
            batch_stats=_select(finite, new_stats, state.batch_stats),
            opt_state=_select(finite, new_opt_state, state.opt_state),
            ema_params=_select(finite, new_ema, state.ema_params),
            metric_sums=_add_metrics(state.metric_sums, finite, loss, acc),
            num_skipped=state.num_skipped + (1 - finite.astype(jnp.int32)),
            skip_streak=streak,
            longest_skip_streak=longest,
        )

    return step_fn


def make_pmapped_train_step(step_fn, axis_name: str = "batch"):
    """``jax.pmap`` of ``step_fn`` over local devices; state donated, rng broadcast."""
    return jax.pmap(step_fn, axis_name=axis_name, in_axes=(0, 0, None), donate_argnums=(0,))


def replicate(tree: PyTree, num_devices: int | None = None) -> PyTree:
    """Host pytree -> one copy per local device (leading axis = local devices), on device."""
    n = jax.local_device_count() if num_devices is None else num_devices
    stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), tree)
    return _identity_pmap(stacked)


_identity_pmap = jax.pmap(lambda x: x, axis_name="batch")


def unreplicate(tree: PyTree) -> PyTree:
    """The first local device's copy of a replicated pytree, as numpy (multi-host safe)."""

    def first(x):
        if isinstance(x, jax.Array):
            return np.asarray(x.addressable_data(0)).reshape(x.shape[1:])
        return np.asarray(x)[0]

    return jax.tree.map(first, tree)
