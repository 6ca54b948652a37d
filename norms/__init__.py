"""Normalization layers as pure JAX functions (channels-last, NHWC by default).

Every function takes arrays and returns arrays; stateful norms take and return a
small state pytree and never mutate. Flax modules over these live in
``norms.linen`` and ``norms.nnx`` (Flax NNX), the only places flax is imported;
``norms.registry`` holds the norm names both accept.

Dtypes: statistics are computed in float32 (or wider for wider inputs) and the
output has the input's dtype. Integer and bool inputs (e.g. uint8 images) are
computed in float32 and return float32, as flax's norms do; complex inputs raise
ValueError. The pointwise layers (``dynamic_tanh``, ``derf``) have no statistics:
they compute in float32 and return the input's dtype the same way.
"""

from norms.batch_norm import batch_norm
from norms.batch_renorm import (
    BatchRenormState,
    batch_renorm,
    init_batch_renorm_state,
    paper_d_max,
    paper_r_max,
)
from norms.compare_stats import compare_batch_stats
from norms.evo_norm import evonorm_b0, evonorm_s0
from norms.filter_response_norm import filter_response_norm
from norms.group_norm import group_norm, instance_norm, layer_norm
from norms.moments import default_sync_strategy, merge_moments, moments
from norms.pointwise import derf, dynamic_tanh
from norms.precise_bn import apply_recomputed_stats, recompute_batch_stats
from norms.rms_norm import rms_norm
from norms.running_stats import (
    BatchNormState,
    init_batch_norm_state,
    sync_batch_stats,
    update_running_stats,
)
from norms.switchable_norm import switchable_norm
from norms.weight_standardization import scaled_weight_standardize, weight_standardize

__all__ = [
    "BatchNormState",
    "batch_norm",
    "init_batch_norm_state",
    "sync_batch_stats",
    "update_running_stats",
    "BatchRenormState",
    "batch_renorm",
    "init_batch_renorm_state",
    "paper_d_max",
    "paper_r_max",
    "apply_recomputed_stats",
    "compare_batch_stats",
    "recompute_batch_stats",
    "evonorm_b0",
    "evonorm_s0",
    "filter_response_norm",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "rms_norm",
    "derf",
    "dynamic_tanh",
    "default_sync_strategy",
    "merge_moments",
    "moments",
    "scaled_weight_standardize",
    "switchable_norm",
    "weight_standardize",
]
