"""Normalizer-free ResNets/NFNets, normalized ResNet baselines, their layers and AGC.

The models live here; the training library is the ``training`` subpackage (no model imports it).
"""

from nfnets.activations import (
    ACTIVATIONS,
    PUBLISHED_GAMMAS,
    activation_gamma,
    scaled_activation,
)
from nfnets.agc import adaptive_grad_clip, agc_mask, weight_decay_mask
from nfnets.layers import SqueezeExcite, StdConv2D, StochasticDepth, WSConv2D
from nfnets.registry import MODEL_NAMES, create_model

__all__ = [
    "ACTIVATIONS",
    "MODEL_NAMES",
    "PUBLISHED_GAMMAS",
    "SqueezeExcite",
    "StdConv2D",
    "StochasticDepth",
    "WSConv2D",
    "activation_gamma",
    "adaptive_grad_clip",
    "agc_mask",
    "create_model",
    "scaled_activation",
    "weight_decay_mask",
]
