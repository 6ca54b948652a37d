"""The one table of norm names a config may use, shared by ``norms.linen`` and ``norms.nnx``.

Each name maps to a class name; ``norms.linen.make`` and ``norms.nnx.make`` look
that class up in their own module, so both APIs accept exactly the same names
and a new norm is registered once, here.
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


__all__ = ["NORM_CLASSES", "NORM_NAMES", "resolve"]
