"""NF-ResNets: normalizer-free pre-activation bottleneck ResNets (Brock et al., 2021a).

Stem: 7x7 stride-2 WS conv to ``stem_width`` (64) + 3x3 stride-2 max pool (the
``small`` stem is one 3x3 stride-1 WS conv, no pool). Stages: bottleneck blocks,
widths :data:`NF_RESNET_WIDTHS`, depths from :data:`NF_RESNET_DEPTHS`, strides
(1, 2, 2, 2). Block (output width W, mid ``W / 4``)::

    a = act(h) * beta
    f = conv1x1(W/4) -> act -> conv3x3(W/4, stride) -> act -> conv1x1(W)
    f = 2 * se(f) * f                      # only when se_ratio > 0
    shortcut = h, or conv1x1(a, stride) on a stage's first block
    out = shortcut + alpha * skip_gain * stochastic_depth(f)

``act`` is gamma-scaled ReLU (published gamma), ``alpha = 0.2``, ``beta`` from
:func:`nfnets.layers.nf_betas`, ``skip_gain`` (SkipInit) a scalar initialised to 0.
Head: act, global average pool, dropout, dense ``"head"`` N(0, 0.01).
NF-ResNet-50 has 25.56M parameters (every WS conv's gain+bias replaces the
BN scale+bias of the normalized ResNet-50, plus one skip gain per block).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nfnets.activations import scaled_activation
from nfnets.layers import (
    MinImageSize,
    NFBlock,
    WSConv2D,
    check_stages,
    check_stem_stride,
    classifier_head,
    nf_block_plan,
)

NF_RESNET_WIDTHS = (256, 512, 1024, 2048)
NF_RESNET_DEPTHS: dict[int, tuple[int, int, int, int]] = {
    26: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}


class NFResNetBlock(NFBlock):
    """Pre-activation NF bottleneck block; (N, H, W, C_in) -> (N, H/stride, W/stride, W).

    Fields: :class:`nfnets.layers.NFBlock`.
    """

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        act = scaled_activation(self.activation)
        conv = lambda *a, **k: WSConv2D(*a, dtype=self.dtype, **k)
        out = self.preactivate(x)
        if self.stride > 1 or x.shape[-1] != self.features:
            shortcut = conv(self.features, 1, strides=self.stride, name="conv_shortcut")(out)
        else:
            shortcut = x
        f = conv(self.mid, 1, name="conv0")(out)
        f = conv(self.mid, 3, strides=self.stride, name="conv1")(act(f))
        f = conv(self.features, 1, name="conv2")(act(f))
        return self.residual_output(shortcut, f, train=train)


def check_nf_resnet_config(model: NFResNet) -> None:
    """Validates widths/depths; errors name the offending values."""
    check_stages("NFResNet", model.widths, model.depths)
    check_stem_stride("NFResNet", model.small, model.stem_stride)
    for width in model.widths:
        if int(width * model.bottleneck_ratio) < 1:
            raise ValueError(
                f"NFResNet: stage width {width} x bottleneck_ratio {model.bottleneck_ratio} "
                "leaves no channels"
            )


class NFResNet(MinImageSize, nn.Module):
    """NF-ResNet (module docstring). ``__call__(images (N,H,W,C), *, train) -> (N, classes)``.

    Logits float32 whatever the compute ``dtype``; params float32. Stochastic depth
    (default 0.1 max rate, as in the reference) and dropout use the ``"dropout"``
    rng stream.
    """

    num_classes: int = 1000
    depths: Sequence[int] = NF_RESNET_DEPTHS[50]
    widths: Sequence[int] = NF_RESNET_WIDTHS
    stem_width: int = 64
    bottleneck_ratio: float = 0.25
    se_ratio: float = 0.0
    alpha: float = 0.2
    activation: str = "relu"
    stochastic_depth: float = 0.1
    dropout: float = 0.0
    small: bool = False
    stem_stride: int = 1  # small stem only: 2 halves the resolution (~4x less compute)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        check_nf_resnet_config(self)
        self.check_input(x)
        act = scaled_activation(self.activation)
        x = x.astype(self.dtype)
        if self.small:
            h = WSConv2D(
                self.stem_width, 3, strides=self.stem_stride, dtype=self.dtype, name="stem_conv"
            )(x)
        else:
            h = WSConv2D(self.stem_width, 7, strides=2, dtype=self.dtype, name="stem_conv")(x)
            h = nn.max_pool(h, (3, 3), strides=(2, 2), padding="SAME")

        for p in nf_block_plan(self.depths, self.alpha, self.stochastic_depth):
            width = self.widths[p.stage]
            h = NFResNetBlock(
                features=width,
                mid=int(width * self.bottleneck_ratio),
                stride=p.stride,
                beta=p.beta,
                alpha=self.alpha,
                se_ratio=self.se_ratio,
                stochastic_depth=p.drop_rate,
                activation=self.activation,
                dtype=self.dtype,
                name=f"stage{p.stage}_block{p.block}",
            )(h, train=train)

        return classifier_head(
            act(h),
            num_classes=self.num_classes,
            dropout=self.dropout,
            dtype=self.dtype,
            train=train,
        )
