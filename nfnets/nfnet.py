"""NFNet-F0..F7 and the wider ``+`` variants (Brock et al., 2021, arXiv:2102.06171).

Variants are rows of :data:`NFNET_VARIANTS` (depths, train/test resolution,
dropout); adding one is one line. Every variant uses

* stem: WS convs 3x3 to 16 (stride 2), 32, 64, ``width0 / 2`` (stride 2), each but
  the last followed by the gamma-scaled activation (the first block applies it);
* four stages of NF blocks, stage strides (1, 2, 2, 2), widths
  :data:`NFNET_WIDTHS` (``+``: :data:`NFNET_PLUS_WIDTHS`);
* head: 1x1 WS conv to ``2 * width3``, activation, global average pool, dropout,
  dense ``"head"`` initialised N(0, 0.01).

NF block (block width W, mid ``M = 0.5 W`` rounded down to a multiple of the group
width 128, ``M / 128`` groups)::

    a = act(h) * beta
    f = conv1x1(M) -> act -> gconv3x3(M, stride) -> act -> gconv3x3(M) -> act -> conv1x1(W)
    f = 2 * se(f) * f                      # SE ratio 0.5
    shortcut = h, or conv1x1(avgpool2x2(a)) / conv1x1(a) on a stage's first block
    out = shortcut + alpha * skip_gain * stochastic_depth(f)

``act`` is gamma-scaled GELU (published gamma), ``alpha = 0.2``, ``beta`` from
:func:`nfnets.layers.nf_betas`, ``skip_gain`` a scalar initialised to 0, the
stochastic-depth rate of block ``i`` is ``0.25 * i / num_blocks``.
"""

from __future__ import annotations

import dataclasses
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
    classifier_head,
    nf_block_plan,
)

NFNET_WIDTHS = (256, 512, 1536, 1536)
NFNET_PLUS_WIDTHS = (384, 768, 2048, 2048)


@dataclasses.dataclass(frozen=True)
class NFNetVariant:
    """One row of the variant table: stage depths, train/test resolution, dropout."""

    depths: tuple[int, int, int, int]
    train_res: int
    test_res: int
    dropout: float


NFNET_VARIANTS: dict[str, NFNetVariant] = {
    "f0": NFNetVariant((1, 2, 6, 3), 192, 256, 0.2),
    "f1": NFNetVariant((2, 4, 12, 6), 224, 320, 0.3),
    "f2": NFNetVariant((3, 6, 18, 9), 256, 352, 0.4),
    "f3": NFNetVariant((4, 8, 24, 12), 320, 416, 0.4),
    "f4": NFNetVariant((5, 10, 30, 15), 384, 512, 0.5),
    "f5": NFNetVariant((6, 12, 36, 18), 416, 544, 0.5),
    "f6": NFNetVariant((7, 14, 42, 21), 448, 576, 0.5),
    "f7": NFNetVariant((8, 16, 48, 24), 480, 608, 0.5),
}


class NFNetBlock(NFBlock):
    """One NFNet bottleneck block; input (N, H, W, C_in), output (N, H/stride, W/stride, W).

    Fields: :class:`nfnets.layers.NFBlock`, plus ``groups`` of the 3x3 convs.
    """

    groups: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        act = scaled_activation(self.activation)
        conv = lambda *a, **k: WSConv2D(*a, dtype=self.dtype, **k)
        out = self.preactivate(x)
        if self.stride > 1:
            pooled = nn.avg_pool(
                out,
                (self.stride, self.stride),
                strides=(self.stride, self.stride),
                padding="SAME",
                count_include_pad=False,
            )
            shortcut = conv(self.features, 1, name="conv_shortcut")(pooled)
        elif x.shape[-1] != self.features:
            shortcut = conv(self.features, 1, name="conv_shortcut")(out)
        else:
            shortcut = x
        f = conv(self.mid, 1, name="conv0")(out)
        f = conv(self.mid, 3, strides=self.stride, feature_group_count=self.groups, name="conv1")(
            act(f)
        )
        f = conv(self.mid, 3, feature_group_count=self.groups, name="conv1b")(act(f))
        f = conv(self.features, 1, name="conv2")(act(f))
        return self.residual_output(shortcut, f, train=train)


def check_nfnet_config(model: NFNet) -> None:
    """Validates widths/depths/group width; errors name the offending numbers."""
    check_stages("NFNet", model.widths, model.depths)
    for width in model.widths:
        if width % model.group_width:
            raise ValueError(
                f"NFNet: group width {model.group_width} does not divide the stage width "
                f"{width}; choose stage widths that are multiples of group_width, or change "
                "group_width"
            )
        if bottleneck_width(width, model.bottleneck_ratio, model.group_width) < 1:
            raise ValueError(
                f"NFNet: bottleneck width {model.bottleneck_ratio} x {width} is smaller than "
                f"the group width {model.group_width}; lower group_width"
            )


def bottleneck_width(width: int, ratio: float, group_width: int) -> int:
    """Mid width ``int(ratio * width)`` rounded down to a multiple of ``group_width``.

    As in the reference code: for the ``+`` variants' first stage (width 384) the mid
    width 192 becomes 128 (one group). All other published stages divide exactly.
    """
    return group_width * (int(width * ratio) // group_width)


class NFNet(MinImageSize, nn.Module):
    """NFNet (see module docstring). ``__call__(images (N, H, W, C), *, train) -> (N, classes)``.

    Logits are float32 whatever ``dtype`` (the compute dtype; params stay float32).
    ``small=True`` swaps the stem for one 3x3 stride-1 WS conv (for 28x28 / 32x32).
    """

    num_classes: int = 1000
    depths: Sequence[int] = NFNET_VARIANTS["f0"].depths
    widths: Sequence[int] = NFNET_WIDTHS
    stem_width: int | None = None
    group_width: int = 128
    bottleneck_ratio: float = 0.5
    se_ratio: float = 0.5
    alpha: float = 0.2
    activation: str = "gelu"
    stochastic_depth: float = 0.25
    dropout: float = 0.2
    final_conv_mult: float = 2.0
    small: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        check_nfnet_config(self)
        self.check_input(x)
        act = scaled_activation(self.activation)
        conv = lambda *a, **k: WSConv2D(*a, dtype=self.dtype, **k)
        x = x.astype(self.dtype)
        ch = self.stem_width or self.widths[0] // 2
        if self.small:
            h = conv(ch, 3, name="stem_conv")(x)
        else:
            h = act(conv(16, 3, strides=2, name="stem_conv0")(x))
            h = act(conv(32, 3, name="stem_conv1")(h))
            h = act(conv(64, 3, name="stem_conv2")(h))
            h = conv(ch, 3, strides=2, name="stem_conv3")(h)

        for p in nf_block_plan(self.depths, self.alpha, self.stochastic_depth):
            width = self.widths[p.stage]
            mid = bottleneck_width(width, self.bottleneck_ratio, self.group_width)
            h = NFNetBlock(
                features=width,
                mid=mid,
                groups=mid // self.group_width,
                stride=p.stride,
                beta=p.beta,
                alpha=self.alpha,
                se_ratio=self.se_ratio,
                stochastic_depth=p.drop_rate,
                activation=self.activation,
                dtype=self.dtype,
                name=f"stage{p.stage}_block{p.block}",
            )(h, train=train)

        h = act(conv(int(self.final_conv_mult * self.widths[-1]), 1, name="final_conv")(h))
        return classifier_head(
            h, num_classes=self.num_classes, dropout=self.dropout, dtype=self.dtype, train=train
        )
