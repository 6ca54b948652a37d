"""Fine-tuning: start a run from pretrained weights (``config.init_from``).

``config.init_from`` names one of

* DeepMind's ``F*_haiku.npz`` (read by the restricted unpickler of
  :mod:`nfnets.pretrained`, never by ``pickle``/``dill``),
* timm's ``dm_nfnet_f*`` ``model.safetensors``,
* a file written by :func:`nfnets.pretrained.save` (or the converter CLI),
* a training workdir, its ``checkpoints/`` folder or one step folder of it (the
  newest checkpoint's ``params`` and ``batch_stats``; not the EMA parameters).

DeepMind's and timm's files are read into ``config.model``'s own architecture
with the file's class count, so a file of another variant fails with the names
of the leaves that differ. ``config.init_exclude`` lists '/'-separated path
prefixes (``head``, ``stem_conv0/kernel``; commas separate several in one
string) that keep the run's fresh initialisation, as in
:func:`nfnets.pretrained.merge_pretrained`: the default ``("head",)``
re-initialises the classifier, as needed when the class count differs. The
optimizer state is initialised from the loaded parameters and the EMA starts at
them. The loop applies this only when the workdir has no checkpoint: resuming
restores the checkpoint and never reads ``init_from`` again.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp

from nfnets.pretrained import deepmind_table, detect_format, load, merge_pretrained, timm_table
from nfnets.pretrained.deepmind import read_haiku_pickle
from nfnets.pretrained.names import convert, resolve_model
from nfnets.pretrained.timm import read_safetensors
from nfnets.training.plan import ConfigError
from nfnets.training.step import TrainState, model_variables

PyTree = Any

_FORMATS_HINT = (
    "give DeepMind's F*_haiku.npz, timm's model.safetensors, a file of "
    "nfnets.pretrained.save (python -m nfnets.pretrained convert ...) or a training workdir"
)
# The head's bias names the file's class count in each source format.
_HEADS = {"deepmind": "NFNet/~/linear/b", "timm": "head.fc.bias"}


def exclude_patterns(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """``config.init_exclude`` as a tuple of prefixes (a string or elements may hold commas)."""
    value = config.init_exclude
    items = (value,) if isinstance(value, str) else tuple(value or ())
    if not all(isinstance(item, str) for item in items):
        raise ConfigError(
            f"config.init_exclude={value!r}: give path prefixes as strings, e.g. "
            "--config.init_exclude=head or --config.init_exclude=head,stem_conv0"
        )
    return tuple(p.strip() for item in items for p in item.split(",") if p.strip())


def _checkpoint_item(path: str) -> str | None:
    """The ``state`` item of the newest checkpoint under a workdir / checkpoints / step folder.

    Orbax writes a step into a temporary folder and renames it to the step number
    when complete, so the numeric folders are the finished checkpoints.
    """
    if os.path.isdir(os.path.join(path, "state")):
        return os.path.join(path, "state")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    steps = [
        int(n)
        for n in os.listdir(path)
        if n.isdigit() and os.path.isdir(os.path.join(path, n, "state"))
    ]
    return os.path.join(path, str(max(steps)), "state") if steps else None


def check_init_from(config: ml_collections.ConfigDict) -> None:
    """Fails fast (before data and model are built) on an unusable ``init_from``.

    Checks that the path exists and is a recognised weight file or holds a
    checkpoint, and that ``init_exclude`` is well formed. Raises ConfigError with
    a one-line message naming the value and the fix.
    """
    exclude_patterns(config)
    path = config.init_from
    if not path:
        return
    if not isinstance(path, str):
        raise ConfigError(f"config.init_from={path!r}: give a path; {_FORMATS_HINT}")
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise ConfigError(f"config.init_from={path!r}: no such file or directory; {_FORMATS_HINT}")
    if os.path.isdir(path):
        if _checkpoint_item(path) is None:
            raise ConfigError(f"config.init_from={path!r}: the folder holds no checkpoint")
        return
    try:
        detect_format(path)
    except ValueError as err:
        raise ConfigError(f"config.init_from={path!r}: {err}") from None


def read_init_variables(path: str, model: nn.Module) -> dict[str, PyTree]:
    """The variables in ``path`` (see the module doc), as nested dicts of arrays.

    DeepMind's and timm's files are converted for ``model``'s architecture (an
    NFNet) with the class count of the file's own head.
    """
    if os.path.isdir(path):
        state = ocp.StandardCheckpointer().restore(os.path.abspath(_checkpoint_item(path)))
        return model_variables(state["params"], state.get("batch_stats") or {})
    kind = detect_format(path)
    if kind == "native":
        return load(path)
    arrays = read_haiku_pickle(path) if kind == "deepmind" else read_safetensors(path)
    head = arrays.get(_HEADS[kind])
    target = resolve_model(model)
    if head is not None:
        target = target.clone(num_classes=int(head.shape[0]))
    table = deepmind_table(target) if kind == "deepmind" else timm_table(target)
    return convert(table, arrays, f"{kind} file {path}")


def init_from_pretrained(
    state: TrainState,
    model: nn.Module,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
) -> tuple[TrainState, str | None]:
    """``state`` (fresh, step 0) with ``config.init_from``'s weights outside ``init_exclude``.

    Returns ``(state, message)``; the message (None when ``init_from`` is empty)
    says what was loaded. Parameters and batch statistics are replaced leaf by
    leaf (cast to the fresh state's dtypes); ``opt_state`` is ``tx.init`` of the
    new parameters and ``ema_params`` (when on) a copy of them. Raises
    ConfigError, one line, naming every missing, extra or mis-shaped leaf.
    """
    path = config.init_from
    if not path:
        return state, None
    check_init_from(config)
    path, exclude = os.path.expanduser(path), exclude_patterns(config)
    fresh = model_variables(state.params, state.batch_stats)
    try:
        loaded = read_init_variables(path, model)
    except ValueError as err:
        raise ConfigError(f"config.init_from={path!r}: {err}") from None
    try:
        merged = merge_pretrained(fresh, loaded, exclude=exclude)
    except ValueError as err:
        if "match no variable" in str(err):
            raise ConfigError(f"config.init_exclude={exclude}: {err}") from None
        # merge_pretrained's own hint names its keyword; point at the config key instead.
        details = str(err).split(" (exclude=")[0]
        raise ConfigError(
            f"config.init_from={path!r} does not fit config.model={config.model!r}: {details}; "
            f"add the paths to keep freshly initialised to --config.init_exclude (now {exclude}), "
            "e.g. --config.init_exclude=head,stem_conv0"
        ) from None
    params = merged["params"]
    state = state.replace(
        params=params,
        batch_stats=merged.get("batch_stats", state.batch_stats),
        opt_state=tx.init(params),
        ema_params=None if state.ema_params is None else jax.tree.map(jnp.copy, params),
    )
    kept = f", kept fresh: {', '.join(exclude)}" if exclude else ""
    return state, f"initialised from {path}{kept}"


__all__ = ["check_init_from", "exclude_patterns", "init_from_pretrained", "read_init_variables"]
