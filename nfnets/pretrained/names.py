"""Name and shape tables between our NFNet parameter tree and DeepMind's / timm's.

Our tree (flax, HWIO kernels)::

    params/stem_conv{0..3}/{kernel, gain, bias}
    params/stage{s}_block{b}/{conv0, conv1, conv1b, conv2, conv_shortcut}/{kernel, gain, bias}
    params/stage{s}_block{b}/se/{fc0, fc1}/{kernel, bias}
    params/stage{s}_block{b}/skip_gain
    params/final_conv/{kernel, gain, bias}
    params/head/{kernel, bias}

DeepMind's haiku dict (deepmind-research ``nfnets/``, HWIO, ``{module: {name: array}}``):
``NFNet/~/stem_conv{k}``, ``NFNet/~/nf_block{_i}`` (``i`` counts blocks over all
stages, the first has no suffix) with ``/~/conv0`` ... and
``/~/squeeze_excite/~/linear`` / ``linear_1`` holding ``{w, gain, bias}`` /
``{w, b}``, the block module itself holding ``skip_gain``; ``NFNet/~/final_conv``;
``NFNet/~/linear``. Only the names change; every array keeps its shape.

timm's ``dm_nfnet_f*`` state dict (PyTorch, OIHW): ``stem.conv{k+1}``,
``stages.{s}.{b}.{conv1, conv2, conv2b, conv3, downsample.conv}`` with
``weight`` (O, I, H, W), ``gain`` (O, 1, 1, 1), ``bias`` (O,);
``attn_last.fc1`` / ``fc2`` 1x1 convs (weight (O, I, 1, 1), bias);
``skipinit_gain`` (); ``final_conv``; ``head.fc`` (weight (O, I), bias).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
from collections.abc import Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nfnets.nfnet import NFNET_PLUS_WIDTHS, NFNET_VARIANTS, NFNet
from nfnets.registry import create_model

Path = tuple[str, ...]

_BLOCK = re.compile(r"^stage(\d+)_block(\d+)$")
_DM_CONV_PARAMS = {"kernel": "w", "gain": "gain", "bias": "bias"}
_DM_DENSE_PARAMS = {"kernel": "w", "bias": "b"}
_TIMM_CONVS = {
    "conv0": "conv1",
    "conv1": "conv2",
    "conv1b": "conv2b",
    "conv2": "conv3",
    "conv_shortcut": "downsample.conv",
}
_TIMM_PARAMS = {"kernel": "weight", "gain": "gain", "bias": "bias"}


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One parameter: our path and shape, the source's key and shape, and the
    function turning the source's array into ours."""

    path: Path
    shape: tuple[int, ...]
    key: str
    source_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]


def resolve_model(variant: str | nn.Module, num_classes: int = 1000) -> NFNet:
    """An :class:`NFNet` from a name (``"f0"``, ``"nfnet_f0"``, ``"f1_plus"``) or a module."""
    if isinstance(variant, NFNet):
        return variant
    if isinstance(variant, nn.Module):
        raise ValueError(
            f"pretrained weights exist only for NFNets, got a {type(variant).__name__}; "
            "pass an nfnets.nfnet.NFNet or a name such as 'nfnet_f0'"
        )
    if not isinstance(variant, str):
        raise ValueError(f"variant must be a name such as 'nfnet_f0' or an NFNet, got {variant!r}")
    name = variant if variant.startswith("nfnet_") else f"nfnet_{variant}"
    base = name.removeprefix("nfnet_").removesuffix("_plus")
    if base not in NFNET_VARIANTS or name.endswith("_small"):
        raise ValueError(
            f"unknown NFNet variant {variant!r}; valid: "
            + ", ".join(f"nfnet_{v}[_plus]" for v in NFNET_VARIANTS)
        )
    return create_model(name, num_classes=num_classes)


def variant_name(depths: tuple[int, ...], width0: int | None) -> str:
    """The registry name whose depths are ``depths`` (``_plus`` when stage 0 is 384 wide)."""
    for variant, row in NFNET_VARIANTS.items():
        if tuple(row.depths) == tuple(depths):
            return f"nfnet_{variant}" + ("_plus" if width0 == NFNET_PLUS_WIDTHS[0] else "")
    raise ValueError(
        f"the file's stage depths {tuple(depths)} match no NFNet variant (known: "
        + ", ".join(f"{v} {tuple(r.depths)}" for v, r in NFNET_VARIANTS.items())
        + "); pass variant= explicitly"
    )


def param_shapes(model: NFNet) -> dict[Path, tuple[int, ...]]:
    """Our ``{("params", ...): shape}`` for ``model``, traced with ``jax.eval_shape``
    (nothing is allocated); cached for hashable modules."""
    try:
        hash(model)
    except TypeError:  # e.g. list-valued fields
        return _param_shapes.__wrapped__(model)
    return _param_shapes(model)


@functools.lru_cache(maxsize=32)
def _param_shapes(model: NFNet) -> dict[Path, tuple[int, ...]]:
    size = model.min_image_size
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    init = functools.partial(model.init, train=False)
    tree = jax.eval_shape(init, jax.random.key(0), images)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def _block_index(shapes: Mapping[Path, tuple[int, ...]]) -> dict[str, tuple[int, int, int]]:
    """``{"stage{s}_block{b}": (s, b, i)}`` with ``i`` the block's index over all stages."""
    blocks = {m.group(0): (int(m[1]), int(m[2])) for p in shapes if (m := _BLOCK.match(p[1]))}
    ordered = sorted(blocks.items(), key=lambda kv: kv[1])
    return {name: (s, b, i) for i, (name, (s, b)) in enumerate(ordered)}


def _leaves(model: NFNet):
    """``(path, shape, top, rest, block)`` per leaf: ``path == ("params", top, *rest)``;
    ``block`` is ``(stage, block, index)`` from `_block_index`, None outside the blocks."""
    shapes = param_shapes(model)
    blocks = _block_index(shapes)
    for path, shape in shapes.items():
        _, top, *rest = path
        yield path, shape, top, rest, blocks.get(top)


def deepmind_table(model: NFNet) -> list[Leaf]:
    """Our leaves with their DeepMind keys ``"module/param"`` (all arrays keep their shape)."""
    table = []
    for path, shape, top, rest, block in _leaves(model):
        if block is not None:
            index = block[2]
            module = "NFNet/~/nf_block" + (f"_{index}" if index else "")
            if rest == ["skip_gain"]:
                key = f"{module}/skip_gain"
            elif rest[0] == "se":
                linear = {"fc0": "linear", "fc1": "linear_1"}[rest[1]]
                key = f"{module}/~/squeeze_excite/~/{linear}/{_DM_DENSE_PARAMS[rest[2]]}"
            else:
                key = f"{module}/~/{rest[0]}/{_DM_CONV_PARAMS[rest[1]]}"
        elif top == "head":
            key = f"NFNet/~/linear/{_DM_DENSE_PARAMS[rest[0]]}"
        else:
            key = f"NFNet/~/{top}/{_DM_CONV_PARAMS[rest[0]]}"
        table.append(Leaf(path, shape, key, shape, np.asarray))
    return _checked(table)


def _timm_leaf(path: Path, shape: tuple[int, ...], key: str, kind: str) -> Leaf:
    """A timm leaf; ``kind`` says how PyTorch lays the array out."""
    if kind == "conv" and len(shape) == 4:  # HWIO <- OIHW
        source, fn = (shape[3], shape[2], shape[0], shape[1]), lambda x: x.transpose(2, 3, 1, 0)
    elif kind == "conv" and path[-1] == "gain":  # (O,) <- (O, 1, 1, 1)
        source, fn = (*shape, 1, 1, 1), lambda x: x.reshape(x.shape[0])
    elif kind == "conv1x1" and len(shape) == 2:  # dense (I, O) <- 1x1 conv (O, I, 1, 1)
        source, fn = (shape[1], shape[0], 1, 1), lambda x: x[:, :, 0, 0].T
    elif kind == "linear" and len(shape) == 2:  # dense (I, O) <- nn.Linear (O, I)
        source, fn = (shape[1], shape[0]), lambda x: x.T
    else:  # biases, skip gains
        source, fn = shape, np.asarray
    return Leaf(path, shape, key, source, fn)


def timm_table(model: NFNet) -> list[Leaf]:
    """Our leaves with their timm ``dm_nfnet_*`` state-dict keys and PyTorch shapes."""
    table = []
    for path, shape, top, rest, block in _leaves(model):
        if block is not None:
            s, b, _ = block
            prefix = f"stages.{s}.{b}"
            if rest == ["skip_gain"]:
                leaf = _timm_leaf(path, shape, f"{prefix}.skipinit_gain", "scalar")
            elif rest[0] == "se":
                fc = {"fc0": "fc1", "fc1": "fc2"}[rest[1]]
                key = f"{prefix}.attn_last.{fc}.{_TIMM_PARAMS[rest[2]]}"
                leaf = _timm_leaf(path, shape, key, "conv1x1")
            else:
                key = f"{prefix}.{_TIMM_CONVS[rest[0]]}.{_TIMM_PARAMS[rest[1]]}"
                leaf = _timm_leaf(path, shape, key, "conv")
        elif top == "head":
            leaf = _timm_leaf(path, shape, f"head.fc.{_TIMM_PARAMS[rest[0]]}", "linear")
        elif top.startswith("stem_conv"):
            key = f"stem.conv{int(top[-1]) + 1}.{_TIMM_PARAMS[rest[0]]}"
            leaf = _timm_leaf(path, shape, key, "conv")
        else:
            leaf = _timm_leaf(path, shape, f"{top}.{_TIMM_PARAMS[rest[0]]}", "conv")
        table.append(leaf)
    return _checked(table)


def _checked(table: list[Leaf]) -> list[Leaf]:
    counts = collections.Counter(leaf.key for leaf in table)
    twice = sorted(key for key, n in counts.items() if n > 1)
    if twice:  # a naming rule mapped two of our leaves to one source key
        raise AssertionError(f"name table is not 1:1: {twice}")
    return table


def convert(table: list[Leaf], arrays: Mapping[str, np.ndarray], what: str) -> dict:
    """Fills every leaf of ``table`` from ``arrays`` (source key -> array), exactly once.

    Returns our nested ``{"params": ...}`` variables (float32 numpy arrays). Raises
    ValueError naming every missing, extra, mis-shaped or non-numeric entry.
    """
    expected = {leaf.key: leaf for leaf in table}
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    bad_shape, bad_dtype = [], []
    for key in sorted(set(expected) & set(arrays)):
        array = arrays[key]
        if tuple(array.shape) != expected[key].source_shape:
            bad_shape.append(f"{key} {tuple(array.shape)} (expected {expected[key].source_shape})")
        elif array.dtype.kind not in "fiu":
            bad_dtype.append(f"{key} ({array.dtype})")
    problems = [
        f"{label} {len(items)}: {', '.join(items)}"
        for label, items in (
            ("missing", missing),
            ("extra", extra),
            ("mis-shaped", bad_shape),
            ("non-numeric", bad_dtype),
        )
        if items
    ]
    if problems:
        raise ValueError(f"{what} does not fit the model: " + "; ".join(problems))
    flat = {
        leaf.path: np.asarray(leaf.to_ours(np.asarray(arrays[leaf.key])), np.float32)
        for leaf in table
    }
    return flax.traverse_util.unflatten_dict(flat)
