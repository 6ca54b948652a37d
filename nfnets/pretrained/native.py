"""Our own weight files (safetensors, our names), format detection, and merging
pretrained weights into a freshly initialised model.

A native file is a safetensors file whose tensor names are our variable paths
joined with ``/`` (``params/stage0_block0/conv0/kernel``), HWIO kernels, with
metadata ``{"format": "nfnets-norms", ...}``. safetensors holds only a JSON header
and raw little-endian buffers, so reading one never runs code.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from nfnets.pretrained.deepmind import load_deepmind
from nfnets.pretrained.timm import load_timm, read_safetensors

FORMAT = "nfnets-norms"
FORMATS = ("native", "deepmind", "timm")


def _flatten(variables: Mapping[str, Any]) -> dict[str, Any]:
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
    for path in flat:
        if any(not isinstance(p, str) or not p or "/" in p for p in path):
            raise ValueError(f"variable path {path} cannot be named: parts must be '/'-free str")
    return {"/".join(path): leaf for path, leaf in flat.items()}


def save(
    variables: Mapping[str, Any], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Writes ``variables`` (e.g. ``{"params": ...}``) to ``path`` as safetensors, our names.

    Leaves are copied to host numpy arrays; ``metadata`` (str -> str) is stored in
    the header beside ``format``. Raises ValueError for non-numeric leaves.
    """
    tensors = {}
    for name, leaf in _flatten(variables).items():
        array = np.asarray(jax.device_get(leaf))
        if array.dtype.kind not in "fiub":
            raise ValueError(f"cannot save {name}: dtype {array.dtype} is not numeric")
        tensors[name] = np.array(array, order="C")  # not ascontiguousarray: keeps 0-d shapes
    header = {"format": FORMAT, **{str(k): str(v) for k, v in (metadata or {}).items()}}
    safetensors.numpy.save_file(tensors, os.fspath(path), metadata=header)


def _safetensors_header(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON header of a safetensors file, None if ``path`` is not one."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return None
        (size,) = struct.unpack("<Q", prefix)
        if size > 100_000_000:
            return None
        text = f.read(size)
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return header if isinstance(header, dict) else None


def file_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file ({} when it has none)."""
    header = _safetensors_header(path) or {}
    return dict(header.get("__metadata__") or {})


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Variables written by :func:`save`: a nested dict of numpy arrays."""
    if (file_metadata(path)).get("format") != FORMAT:
        raise ValueError(
            f"{path} was not written by nfnets.pretrained.save (no format={FORMAT!r} in its "
            "metadata); use load_timm for timm's files or load_any to detect the format"
        )
    flat = read_safetensors(path)
    return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def detect_format(path: str | os.PathLike) -> str:
    """``"native"``, ``"deepmind"`` (a pickle) or ``"timm"`` (safetensors with timm names)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, "rb") as f:
        if f.read(1) == b"\x80":
            return "deepmind"
    header = _safetensors_header(path)
    if header is None:
        raise ValueError(
            f"{path} is neither a safetensors file nor a pickle; expected our own or timm's "
            "model.safetensors, or DeepMind's F*_haiku.npz"
        )
    if (header.get("__metadata__") or {}).get("format") == FORMAT:
        return "native"
    if any(key.startswith("stem.conv1.") for key in header):
        return "timm"
    raise ValueError(f"{path} is a safetensors file with neither our names nor timm's dm_nfnet")


def load_any(path: str | os.PathLike) -> dict[str, Any]:
    """Variables from a native, DeepMind or timm file (see :func:`detect_format`);
    the NFNet variant of DeepMind's and timm's files is inferred from the shapes."""
    loader = {"native": load, "deepmind": load_deepmind, "timm": load_timm}
    return loader[detect_format(path)](path)


def _excluded(path: str, patterns: Sequence[str]) -> str | None:
    """The pattern that excludes ``path`` (a '/'-prefix, with or without the collection)."""
    parts = path.split("/")
    for pattern in patterns:
        want = pattern.strip("/").split("/")
        if parts[: len(want)] == want or parts[1 : 1 + len(want)] == want:
            return pattern
    return None


def merge_pretrained(
    init_variables: Mapping[str, Any], loaded: Mapping[str, Any], exclude: Sequence[str] = ("head",)
) -> Any:
    """``init_variables`` with every leaf replaced by ``loaded``'s, except excluded ones.

    Args:
      init_variables: a fresh ``model.init(...)`` (the target structure and dtypes).
      loaded: variables from :func:`load_any` / :func:`load_deepmind` / :func:`load_timm`.
      exclude: '/'-separated path prefixes that keep the fresh init, with or without
        the collection (``"head"`` and ``"params/head"`` both match
        ``params/head/kernel``); e.g. the classifier when the class count differs.

    Returns the same container type as ``init_variables``, leaves cast to its dtypes.
    Raises ValueError naming every missing, extra or mis-shaped leaf (suggesting
    ``exclude``) and every exclude pattern that matches nothing.
    """
    if isinstance(exclude, str):
        exclude = (exclude,)
    if not all(isinstance(p, str) and p.strip("/") for p in exclude):
        raise ValueError(f"exclude must be non-empty '/'-separated path prefixes, got {exclude!r}")
    init_flat, loaded_flat = _flatten(init_variables), _flatten(loaded)
    unused = [p for p in exclude if not any(_excluded(k, [p]) for k in init_flat)]
    if unused:
        raise ValueError(f"exclude pattern(s) {unused} match no variable of the model")
    missing, bad, merged = [], [], {}
    for name, leaf in sorted(init_flat.items()):
        if _excluded(name, exclude):
            merged[name] = leaf
        elif name not in loaded_flat:
            missing.append(name)
        elif tuple(np.shape(loaded_flat[name])) != tuple(np.shape(leaf)):
            bad.append(f"{name} {np.shape(loaded_flat[name])} (model {np.shape(leaf)})")
        else:
            merged[name] = jnp.asarray(loaded_flat[name], dtype=jnp.asarray(leaf).dtype)
    extra = sorted(k for k in set(loaded_flat) - set(init_flat) if not _excluded(k, exclude))
    problems = [
        f"{label} {len(items)}: {', '.join(items)}"
        for label, items in (("missing", missing), ("extra", extra), ("mis-shaped", bad))
        if items
    ]
    if problems:
        raise ValueError(
            "pretrained weights do not fit the model: "
            + "; ".join(problems)
            + " (exclude= keeps the fresh init for those paths, e.g. exclude=('head',))"
        )
    tree = flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in merged.items()})
    return flax.core.freeze(tree) if isinstance(init_variables, flax.core.FrozenDict) else tree
