"""timm's ``dm_nfnet_f{0..6}`` weights (``model.safetensors`` on the Hugging Face hub).

timm's ``dm_nfnet_*`` hold DeepMind's trained weights, renamed and laid out for
PyTorch (OIHW); they are read with ``safetensors.numpy`` (no torch, no pickle).

timm's own forward differs slightly from DeepMind's by design: its scaled weight
standardization puts eps inside the variance (``rsqrt(var * fan_in + 1e-5)``, ours
and DeepMind's ``rsqrt(max(var * fan_in, 1e-4))``) and its GELU is exact (erf), not
DeepMind's tanh approximation. When the project's model was compared with timm's
on the same weights, the logits differed by about 3e-2 relative, and by 8e-7 with
both differences removed. Loaded here, the weights therefore reproduce DeepMind's
original model, not timm's outputs.

timm's ``nf_resnet*`` / ``nf_regnet*`` models are a different architecture
(symmetric padding, ResNet-D shortcuts, gamma folded into the convs, no skip gain)
and are refused.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import numpy as np
import safetensors.numpy

from nfnets.nfnet import NFNet
from nfnets.pretrained.names import convert, resolve_model, timm_table, variant_name

_TIMM_NAME = re.compile(r"^dm_nfnet_(f[0-6])$")
_TIMM_BLOCK = re.compile(r"^stages\.(\d+)\.(\d+)\.")


def timm_variant(name: str) -> str:
    """Our variant (``"nfnet_f0"``) for timm model ``name`` (``"dm_nfnet_f0"``, also
    ``"timm/dm_nfnet_f0.dm_in1k"``); ValueError for any other timm model."""
    base = name.removeprefix("timm/").split(".")[0]
    if base.startswith(("nf_resnet", "nf_regnet", "nf_seresnet", "nf_ecaresnet")):
        raise ValueError(
            f"timm model {name!r} is not supported: timm's nf_resnet*/nf_regnet* are a "
            "different architecture from nfnets' NF-ResNets (symmetric padding, ResNet-D "
            "shortcuts, gamma folded into the convs, no skip gain); only timm's "
            "dm_nfnet_f0..dm_nfnet_f6 (DeepMind's NFNet weights) can be loaded"
        )
    match = _TIMM_NAME.match(base)
    if match is None:
        raise ValueError(
            f"timm model {name!r} is not supported; only dm_nfnet_f0..dm_nfnet_f6 "
            "(DeepMind's NFNet weights) can be loaded"
        )
    return f"nfnet_{match[1]}"


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays; ValueError if it is not one."""
    try:
        return safetensors.numpy.load_file(os.fspath(path))
    except (safetensors.SafetensorError, ValueError, TypeError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from None


def infer_timm_model(arrays: Mapping[str, np.ndarray]) -> NFNet:
    """The NFNet whose timm names and shapes ``arrays`` holds (depths from
    ``stages.{s}.{b}``, ``_plus`` from a 384-wide first block, classes from ``head.fc``)."""
    if not any(key.startswith("stem.conv1.") for key in arrays):
        raise ValueError(
            "the file has no stem.conv1..4: not a timm dm_nfnet_* file (timm's nf_resnet*/"
            "nf_regnet* are a different architecture and are not supported)"
        )
    depths: dict[int, int] = {}
    for key in arrays:
        if match := _TIMM_BLOCK.match(key):
            stage, block = int(match[1]), int(match[2])
            depths[stage] = max(depths.get(stage, 0), block + 1)
    width0 = arrays.get("stages.0.0.conv3.weight")
    head = arrays.get("head.fc.bias")
    name = variant_name(
        tuple(depths[s] for s in sorted(depths)), None if width0 is None else width0.shape[0]
    )
    return resolve_model(name, num_classes=1000 if head is None else int(head.shape[0]))


def load_timm(path: str | os.PathLike, name: str | nn.Module | None = None) -> dict[str, Any]:
    """Our ``{"params": ...}`` variables from timm's ``dm_nfnet_f*`` ``model.safetensors``.

    Args:
      path: the safetensors file (timm state-dict names, OIHW kernels).
      name: the timm model (``"dm_nfnet_f0"``, ``"timm/dm_nfnet_f0.dm_in1k"``), or an
        :class:`nfnets.nfnet.NFNet` to fill; None infers the variant from the names
        and shapes. ``nf_resnet*`` is refused.

    Converts OIHW -> HWIO, ``(O, 1, 1, 1)`` gains -> ``(O,)``, 1x1-conv SE and linear
    head weights -> dense ``(I, O)``. Returns float32 numpy arrays; computes
    DeepMind's function (see module doc for how it differs from timm's). Raises
    ValueError naming every missing, extra or mis-shaped tensor.
    """
    variant = timm_variant(name) if isinstance(name, str) else None
    arrays = read_safetensors(path)
    if isinstance(name, nn.Module):
        target = resolve_model(name)
    elif variant is None:
        target = infer_timm_model(arrays)
    else:
        head = arrays.get("head.fc.bias")
        target = resolve_model(variant, num_classes=1000 if head is None else int(head.shape[0]))
    return convert(timm_table(target), arrays, f"timm file {path}")
