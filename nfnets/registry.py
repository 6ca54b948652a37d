"""Model registry: ``create_model(name, num_classes=1000, **overrides) -> nn.Module``.

Every model is applied as ``model.apply(variables, images, train=bool,
rngs={"dropout": key})`` (one rng stream serves dropout and stochastic depth) and
initialised with ``model.init({"params": key}, images, train=False)``; logits are
``(N, num_classes)`` float32. Normalized ResNets with stateful norms also carry a
``"batch_stats"`` collection (``mutable=["batch_stats"]`` in training).

Names (see :data:`MODEL_NAMES`): ``nfnet_f0`` .. ``nfnet_f7``, ``nfnet_f0_plus`` ..
``nfnet_f7_plus``, ``nf_resnet{26,50,101,152,200}``, ``resnet{18,34,50,101}_v1``
(v1.5), ``resnet{18,34,50,101}_v2`` (pre-activation), ``resnet{18,34,50,101}_skipinit``
(unnormalized, SkipInit, v2 layout), each also with suffix ``_small`` (3x3
stride-1 stem, no max pool; for 28x28 / 32x32 images).

Overrides are the model's fields (e.g. ``widths``, ``depths``, ``stem_width``,
``alpha``, ``se_ratio``, ``stochastic_depth``, ``dropout``, ``activation``,
``dtype``; ResNets: ``norm``, ``norm_kwargs``, ``ws_conv``); anything else is
rejected with the list of valid keys.

Flax NNX: ``create_model(name, ..., api="nnx", rngs=nnx.Rngs(params=0, dropout=1),
input_shape=(1, 32, 32, 3))`` wraps the same linen model in
``flax.nnx.bridge.ToNNX`` and initialises it on zeros of ``input_shape``. Its
``nnx.Param``/``nnx.BatchStat`` trees are the linen ``params``/``batch_stats``
trees (same paths, same shapes). Call it as ``model(images, train=False)`` or,
training, ``model(images, train=True, mutable=["batch_stats"])`` (the update is
written back into the module); dropout keys come from the ``dropout`` stream of
``rngs``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax.numpy as jnp
from flax import nnx

from nfnets.activations import PUBLISHED_GAMMAS
from nfnets.nf_resnet import NF_RESNET_DEPTHS, NFResNet, check_nf_resnet_config
from nfnets.nfnet import NFNET_PLUS_WIDTHS, NFNET_VARIANTS, NFNET_WIDTHS, NFNet, check_nfnet_config
from nfnets.resnet import (
    BASIC_WIDTHS,
    BOTTLENECK_WIDTHS,
    RESNET_DEPTHS,
    ResNet,
    check_resnet_config,
)
from norms import linen as norms_linen


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registry row: the module class, its default fields, and its config check."""

    cls: type[nn.Module]
    defaults: Mapping[str, Any]
    check: Callable[[Any], None]


def _build_specs() -> dict[str, ModelSpec]:
    specs: dict[str, ModelSpec] = {}
    for variant, row in NFNET_VARIANTS.items():
        base = {"depths": row.depths, "dropout": row.dropout}
        specs[f"nfnet_{variant}"] = ModelSpec(
            NFNet, {**base, "widths": NFNET_WIDTHS}, check_nfnet_config
        )
        specs[f"nfnet_{variant}_plus"] = ModelSpec(
            NFNet, {**base, "widths": NFNET_PLUS_WIDTHS}, check_nfnet_config
        )
    for depth, depths in NF_RESNET_DEPTHS.items():
        specs[f"nf_resnet{depth}"] = ModelSpec(NFResNet, {"depths": depths}, check_nf_resnet_config)
    for depth, (block, depths) in RESNET_DEPTHS.items():
        widths = BASIC_WIDTHS if block == "basic" else BOTTLENECK_WIDTHS
        base = {"depths": depths, "widths": widths, "block": block}
        specs[f"resnet{depth}_v1"] = ModelSpec(
            ResNet, {**base, "version": "v1"}, check_resnet_config
        )
        specs[f"resnet{depth}_v2"] = ModelSpec(
            ResNet, {**base, "version": "v2"}, check_resnet_config
        )
        specs[f"resnet{depth}_skipinit"] = ModelSpec(
            ResNet,
            {**base, "version": "v2", "norm": "none", "skip_init": True},
            check_resnet_config,
        )
    for name, spec in list(specs.items()):
        specs[f"{name}_small"] = ModelSpec(spec.cls, {**spec.defaults, "small": True}, spec.check)
    return specs


_SPECS = _build_specs()
MODEL_NAMES: tuple[str, ...] = tuple(_SPECS)


def override_keys(name: str) -> tuple[str, ...]:
    """The override keys ``create_model(name, ...)`` accepts (the model's fields)."""
    spec = _spec(name)
    skip = {"parent", "name", "num_classes"}
    return tuple(f.name for f in dataclasses.fields(spec.cls) if f.init and f.name not in skip)


def _spec(name: str) -> ModelSpec:
    if name not in _SPECS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    return _SPECS[name]


def _normalize(key: str, value: Any) -> Any:
    """Makes override values hashable module fields (tuples, FrozenDict)."""
    if key in ("widths", "depths"):
        return tuple(int(v) for v in value)
    if key == "norm_kwargs":
        return flax.core.FrozenDict(value or {})
    return value


APIS = ("linen", "nnx")


def create_model(
    name: str,
    num_classes: int = 1000,
    *,
    api: str = "linen",
    rngs: nnx.Rngs | None = None,
    input_shape: tuple[int, ...] | None = None,
    **overrides: Any,
) -> nn.Module | nnx.Module:
    """Builds model ``name`` with ``num_classes`` outputs and field ``overrides``.

    ``api="nnx"`` (needs ``rngs`` and an ``(N, H, W, C)`` ``input_shape``) returns
    the linen model wrapped by ``flax.nnx.bridge.ToNNX`` (see the module docstring).

    Raises ValueError for an unknown name (listing the valid names), an unknown
    override (listing the valid keys), an unknown norm or activation name, and
    inconsistent widths/depths/group widths (naming the numbers). Image sizes are
    checked when the model is traced (the error gives the minimum size).
    """
    spec = _spec(name)
    if api not in APIS:
        raise ValueError(f"api must be one of {APIS}, got {api!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    valid = override_keys(name)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown override(s) {unknown} for model {name!r}; valid keys: {', '.join(valid)}"
        )
    fields = {**spec.defaults, **overrides}
    fields = {k: _normalize(k, v) for k, v in fields.items()}
    if spec.cls is ResNet:
        norm = fields.get("norm", "batch_norm")
        if norm not in norms_linen.NORM_NAMES:
            raise ValueError(
                f"unknown norm {norm!r} for model {name!r}; valid norms: "
                f"{', '.join(norms_linen.NORM_NAMES)}"
            )
        # Builds (unbound) once so unknown norm_kwargs fail here, listing valid fields.
        norms_linen.make(norm, **dict(fields.get("norm_kwargs", {})))
    if spec.cls is not ResNet and fields.get("activation", "relu") not in PUBLISHED_GAMMAS:
        raise ValueError(
            f"unknown activation {fields['activation']!r} for model {name!r}; valid: "
            f"{', '.join(sorted(PUBLISHED_GAMMAS))}"
        )
    model = spec.cls(num_classes=num_classes, **fields)
    spec.check(model)
    return model if api == "linen" else _to_nnx(model, rngs, input_shape)


def _to_nnx(model: nn.Module, rngs: Any, input_shape: Any) -> nnx.Module:
    if not isinstance(rngs, nnx.Rngs):
        raise ValueError(f"api='nnx' needs rngs=nnx.Rngs(params=..., dropout=...), got {rngs!r}")
    if input_shape is None or len(input_shape) != 4:
        raise ValueError(
            f"api='nnx' needs input_shape=(N, H, W, C) to initialise on, got {input_shape!r}"
        )
    wrapped = nnx.bridge.ToNNX(model, rngs=rngs)
    return wrapped.lazy_init(jnp.zeros(input_shape, jnp.float32), train=False)
