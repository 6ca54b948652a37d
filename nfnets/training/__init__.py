"""The training library, one module per step of the data path.

``plan`` (config checks, derived values) -> ``datasets`` (sources, IDX files) ->
``pipeline`` (iterators, sharding, prefetch) -> ``augment`` -> ``step`` (train
state, train step; ``losses``, ``optim``) -> ``evaluation`` -> ``checkpoints`` /
``outputs`` (metrics, TensorBoard, progress, plots, summary), driven by ``loop``
and its periodic ``actions``; ``preflight`` checks the config and the workdir
before anything is read or written, ``health`` decides when a run diverged.
``train(config, workdir)`` is the entry point.
"""

from nfnets.training.loop import Trainer, maybe_initialize_distributed, run, train
from nfnets.training.optim import default_optimizer_config, ema_decay_nfnet, make_optimizer
from nfnets.training.plan import ConfigError, Plan, make_plan

__all__ = [
    "ConfigError",
    "Plan",
    "Trainer",
    "default_optimizer_config",
    "ema_decay_nfnet",
    "make_optimizer",
    "make_plan",
    "maybe_initialize_distributed",
    "run",
    "train",
]
