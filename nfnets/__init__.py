"""Normalizer-free ResNets/NFNets, normalized ResNet baselines and their building blocks."""

from nfnets.activations import (
    ACTIVATIONS,
    PUBLISHED_GAMMAS,
    activation_gamma,
    scaled_activation,
)
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
    "create_model",
    "scaled_activation",
]
