"""Pretrained NFNets: DeepMind's and timm's released weights, read safely, and our own
safetensors files.

* :func:`load_deepmind` reads DeepMind's ``F{0..6}_haiku.npz`` (pickles of a haiku
  dict) with a restricted unpickler that admits only numpy arrays and plain
  containers, so a file cannot run code.
* :func:`load_timm` reads timm's ``dm_nfnet_f{0..6}`` ``model.safetensors``.
* :func:`save` / :func:`load` write and read our own safetensors files;
  :func:`load_any` detects which of the three a file is.
* :func:`merge_pretrained` puts loaded weights into a fresh ``model.init`` (e.g.
  keeping a new classifier head) for fine-tuning.

Every loader checks that each parameter of the model is filled exactly once with
the right shape and names every missing, extra or mis-shaped entry. The project's
NFNet computes DeepMind's function, so either file gives DeepMind's model.
Command line: ``python -m nfnets.pretrained convert --from deepmind|timm IN --to OUT``.
"""

from nfnets.pretrained.deepmind import load_deepmind
from nfnets.pretrained.names import deepmind_table, param_shapes, timm_table
from nfnets.pretrained.native import (
    detect_format,
    file_metadata,
    load,
    load_any,
    merge_pretrained,
    save,
)
from nfnets.pretrained.safe_pickle import UnsafePickleError, safe_load
from nfnets.pretrained.timm import load_timm

__all__ = [
    "UnsafePickleError",
    "deepmind_table",
    "detect_format",
    "file_metadata",
    "load",
    "load_any",
    "load_deepmind",
    "load_timm",
    "merge_pretrained",
    "param_shapes",
    "safe_load",
    "save",
    "timm_table",
]
