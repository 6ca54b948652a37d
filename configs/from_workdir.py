"""The config a workdir was trained with: ``--config configs/from_workdir.py:WORKDIR``.

Reads ``WORKDIR/config.json`` (written by every run once its checks passed, so it
is the config of the workdir's checkpoints) over ``configs/common.py``'s schema.
Use it to resume or extend a run exactly as it was configured, e.g.
``python train.py --config configs/from_workdir.py:runs/x --workdir runs/x
--extend --config.num_epochs=16``.
"""

import json
import os

import ml_collections

from configs.common import base_config


def _tuples(value):
    """JSON lists back to the tuples configs use (widths, depths, agc_exclude, ...)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def get_config(workdir: str = ""):
    if not workdir:
        raise ValueError("name the workdir: --config configs/from_workdir.py:WORKDIR")
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist; WORKDIR must be a run's --workdir")
    with open(path) as f:
        saved = json.load(f)
    c = base_config()
    for key, value in saved.items():
        value = _tuples(value)
        c[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    return c
