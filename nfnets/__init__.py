"""Normalizer-free ResNets/NFNets, normalized ResNet baselines and their building blocks."""

from nfnets.activations import (
    ACTIVATIONS,
    PUBLISHED_GAMMAS,
    activation_gamma,
    scaled_activation,
)
from nfnets.layers import SqueezeExcite, StdConv2D, StochasticDepth, WSConv2D
from nfnets.optim import (
    adaptive_grad_clip,
    agc_mask,
    ema_decay_nfnet,
    make_optimizer,
    smoothed_cross_entropy,
    update_ema,
    weight_decay_mask,
)
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
    "ema_decay_nfnet",
    "make_optimizer",
    "scaled_activation",
    "smoothed_cross_entropy",
    "update_ema",
    "weight_decay_mask",
]
