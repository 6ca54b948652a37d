"""Normalization layers as pure JAX functions (channels-last, NHWC by default).

Every function takes arrays and returns arrays; stateful norms take and return a
small state pytree and never mutate. Flax modules over these live in
``norms.linen`` (the only place flax is imported).
"""

from norms.moments import merge_moments, moments
from norms.weight_standardization import scaled_weight_standardize, weight_standardize

__all__ = [
    "merge_moments",
    "moments",
    "scaled_weight_standardize",
    "weight_standardize",
]
