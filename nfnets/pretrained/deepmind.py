"""DeepMind's released NFNet weights (``F{0..6}_haiku.npz``), read without running code.

Those files are not numpy archives: they are dill pickles of the haiku parameter
dict ``{module: {name: array}}`` (deepmind-research ``nfnets/utils.py``,
``load_haiku_file`` calls ``dill.load``, which runs whatever the file names). Here
they are read with :func:`nfnets.pretrained.safe_pickle.safe_load`, which admits only
plain containers and numpy arrays and refuses anything else before it runs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import numpy as np

from nfnets.nfnet import NFNet
from nfnets.pretrained.names import convert, deepmind_table, resolve_model, variant_name
from nfnets.pretrained.safe_pickle import safe_load

_DM_BLOCK = re.compile(r"^NFNet/~/nf_block(?:_(\d+))?/")


def read_haiku_pickle(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{"module/param": array}`` from a pickled haiku dict, safely (see module doc)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"PK":
        raise ValueError(
            f"{path} is a zip archive (a real .npz), not DeepMind's pickled haiku dict; "
            "DeepMind's F*_haiku.npz files are pickles despite their extension"
        )
    if data[:1] != b"\x80":
        raise ValueError(f"{path} is not a pickle (DeepMind's F*_haiku.npz files are pickles)")
    tree = safe_load(data)
    if not isinstance(tree, Mapping):
        raise ValueError(f"{path}: expected a dict of modules, got {type(tree).__name__}")
    flat = {}
    for module, params in tree.items():
        if not isinstance(module, str) or not isinstance(params, Mapping):
            raise ValueError(f"{path}: entry {module!r} is not a module name -> dict of arrays")
        for name, value in params.items():
            if not isinstance(value, np.ndarray | np.generic):
                raise ValueError(
                    f"{path}: {module}/{name} is a {type(value).__name__}, not a numpy array"
                )
            flat[f"{module}/{name}"] = np.asarray(value)
    return flat


def infer_deepmind_model(arrays: Mapping[str, np.ndarray]) -> NFNet:
    """The NFNet whose DeepMind names and shapes ``arrays`` holds.

    Blocks are numbered over all stages; a stage starts at each block with a
    ``conv_shortcut``. ``_plus`` when the first block is 384 wide; the class count
    comes from ``NFNet/~/linear/b``.
    """
    blocks, starts = set(), set()
    for key in arrays:
        if match := _DM_BLOCK.match(key):
            index = int(match[1] or 0)
            blocks.add(index)
            if "/~/conv_shortcut/" in key:
                starts.add(index)
    if not blocks:
        raise ValueError("no NFNet/~/nf_block* entries: not a DeepMind NFNet file")
    bounds = [*sorted(starts), max(blocks) + 1]
    depths = tuple(b - a for a, b in zip(bounds, bounds[1:], strict=False))
    width0 = arrays.get("NFNet/~/nf_block/~/conv2/w")
    head = arrays.get("NFNet/~/linear/b")
    name = variant_name(depths, None if width0 is None else width0.shape[-1])
    return resolve_model(name, num_classes=1000 if head is None else int(head.shape[0]))


def load_deepmind(
    path: str | os.PathLike, variant: str | nn.Module | None = None
) -> dict[str, Any]:
    """Our ``{"params": ...}`` variables from one of DeepMind's ``F*_haiku.npz`` files.

    Args:
      path: the file (a pickle of ``{module: {name: array}}``, HWIO kernels).
      variant: ``"f0"`` / ``"nfnet_f0"`` / ``"f1_plus"`` ..., or an
        :class:`nfnets.nfnet.NFNet` to fill; None infers it from the names and shapes.

    Returns float32 numpy arrays in the tree of ``create_model("nfnet_fK")`` (see
    :mod:`nfnets.pretrained.names`); our NFNet computes DeepMind's function, so these
    give DeepMind's model. Raises :class:`nfnets.pretrained.UnsafePickleError` when the
    file names any global but numpy's array reconstruction (nothing is executed),
    and ValueError naming every missing, extra or mis-shaped entry.
    """
    if not (variant is None or isinstance(variant, str | nn.Module)):
        raise ValueError(f"variant must be a name such as 'f0' or an NFNet, got {variant!r}")
    arrays = read_haiku_pickle(path)
    if variant is None:
        model = infer_deepmind_model(arrays)
    elif isinstance(variant, nn.Module):
        model = resolve_model(variant)
    else:
        head = arrays.get("NFNet/~/linear/b")
        model = resolve_model(variant, num_classes=1000 if head is None else int(head.shape[0]))
    return convert(deepmind_table(model), arrays, f"DeepMind file {path}")
