"""The one table of norm names a config may use, shared by ``norms.linen`` and ``norms.nnx``.

Each name maps to a class name; ``norms.linen.make`` and ``norms.nnx.make`` look
that class up in their own module, so both APIs accept exactly the same names
and a new norm is registered once, here. :func:`call_stateful` is the one call
of a pure stateful norm with a module's fields, also shared by both APIs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

NORM_CLASSES: dict[str, str] = {
    "batch_norm": "BatchNorm",
    "batch_renorm": "BatchRenorm",
    "group_norm": "GroupNorm",
    "layer_norm": "LayerNorm",
    "instance_norm": "InstanceNorm",
    "rms_norm": "RMSNorm",
    "dyt": "DynamicTanh",
    "derf": "Derf",
    "frn": "FilterResponseNorm",
    "switchable_norm": "SwitchableNorm",
    "evonorm_b0": "EvoNormB0",
    "evonorm_s0": "EvoNormS0",
    "none": "Identity",
}

NORM_NAMES: tuple[str, ...] = tuple(NORM_CLASSES)


def resolve(
    name: str,
    classes: Mapping[str, type],
    fields: Callable[[type], tuple[str, ...]],
    kwargs: Mapping[str, Any],
) -> type:
    """The class registered as ``name`` in ``classes`` (a module's namespace).

    ``fields(cls)`` lists the keyword arguments the class accepts; unknown names
    or keywords raise ValueError listing the valid ones.
    """
    if name not in NORM_CLASSES:
        raise ValueError(f"unknown norm {name!r}; choose one of {', '.join(NORM_NAMES)}")
    cls = classes[NORM_CLASSES[name]]
    valid = fields(cls)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(
            f"norm {name!r} ({cls.__name__}) has no field(s) {unknown}; valid fields: "
            f"{', '.join(valid)}"
        )
    return cls


def call_stateful(
    fn: Callable[..., Any],
    module: Any,
    x: Any,
    state: Any,
    *params: Any,
    train: bool,
    mask: Any,
    on_stale: str,
    **kwargs: Any,
) -> Any:
    """``fn(x, state, *params, train, momentum, eps, axis, axis_name, ...)`` for a module.

    ``params`` are ``(scale, bias, *extra)``; the module's (linen or NNX) attributes
    ``momentum``, ``eps``, ``axis``, ``axis_name`` and ``axis_index_groups`` are
    passed by name with ``train``, ``mask``, ``on_stale`` and ``kwargs``. Returns
    what ``fn`` returns (``(y, new_state)``, plus the batch moments when asked).
    """
    return fn(
        x,
        state,
        *params,
        train=train,
        momentum=module.momentum,
        eps=module.eps,
        axis=module.axis,
        axis_name=module.axis_name,
        axis_index_groups=module.axis_index_groups,
        mask=mask,
        on_stale=on_stale,
        **kwargs,
    )


__all__ = ["NORM_CLASSES", "NORM_NAMES", "call_stateful", "resolve"]
