"""Normalized ResNet baselines whose norm layer is a config string, and SkipInit ResNets.

``version="v1"`` is ResNet v1.5 (He et al., 2016a, with the stride on the 3x3 conv
of the bottleneck, as in torchvision and the flax ImageNet example): post-
activation, ``out = act(shortcut + f)``, every conv followed by a norm, projection
shortcut conv1x1(stride) + norm on a stage's first block.

``version="v2"`` is the pre-activation ResNet (He et al., 2016b)::

    a = act(norm(h));  shortcut = h, or conv1x1(a, stride) on a stage's first block
    f = conv(a) -> norm -> act -> conv ... ;  out = shortcut + f

with a final norm + act before pooling, and a stem without norm.

The norm is any name of :func:`norms.linen.make` (``norm``), configured by
``norm_kwargs`` (e.g. ``{"axis_name": "batch"}`` for synchronized batch norm under
pmap, ``{"num_groups": 8}`` for group norm); ``ws_conv=True`` standardizes every
conv kernel (:class:`nfnets.layers.StdConv2D`, GN+WS). Norm layers are called as
``norm(x, train=train)``. With ``norm="none"`` convs get biases; ``skip_init=True``
multiplies each residual branch by a scalar gain initialised to 0 (De & Smith,
2020), which is what the unnormalized ``resnet*_skipinit`` models use (v2 layout).

Stem: 7x7 stride-2 conv + 3x3 stride-2 max pool; ``small=True``: 3x3 stride-1 conv,
no pool. Head: global average pool, dropout, dense ``"head"``.
Basic blocks for depths 18/34 (widths 64..512), bottlenecks for 50/101
(widths 256..2048, mid = width / 4). With batch norm, v1 has torchvision's counts
(ResNet-18 11.69M, -34 21.80M, -50 25.56M, -101 44.55M parameters).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nfnets.activations import ACTIVATIONS
from nfnets.layers import (
    STAGE_STRIDES,
    MinImageSize,
    StdConv2D,
    check_stages,
    check_stem_stride,
    classifier_head,
)
from norms import linen as norms_linen

BASIC_WIDTHS = (64, 128, 256, 512)
BOTTLENECK_WIDTHS = (256, 512, 1024, 2048)
# depth -> (block type, stage depths)
RESNET_DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
BLOCK_TYPES = ("basic", "bottleneck")
VERSIONS = ("v1", "v2")
_KERNEL_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class _Layers(nn.Module):
    """Shared factory settings; subclasses call ``self.conv``/``self.norm_layer``."""

    norm: str = "batch_norm"
    norm_kwargs: Mapping[str, Any] | None = None
    ws_conv: bool = False
    dtype: Any = jnp.float32

    def conv(self, features: int, kernel: int, strides: int, name: str) -> nn.Module:
        use_bias = self.norm == "none"
        if self.ws_conv:
            return StdConv2D(
                features, kernel, strides, use_bias=use_bias, dtype=self.dtype, name=name
            )
        return nn.Conv(
            features,
            (kernel, kernel),
            (strides, strides),
            padding="SAME",
            use_bias=use_bias,
            kernel_init=_KERNEL_INIT,
            dtype=self.dtype,
            name=name,
        )

    def norm_layer(self, name: str) -> nn.Module:
        return norms_linen.make(self.norm, name=name, **dict(self.norm_kwargs or {}))


class ResNetBlock(_Layers):
    """Basic or bottleneck block, v1.5 or v2; (N,H,W,C_in) -> (N,H/stride,W/stride,features)."""

    features: int = 64
    mid: int = 64
    stride: int = 1
    block: str = "bottleneck"
    version: str = "v1"
    skip_init: bool = False
    activation: str = "relu"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        project = self.stride > 1 or x.shape[-1] != self.features
        if self.block == "basic":
            convs = [(self.features, 3, self.stride), (self.features, 3, 1)]
        else:
            convs = [(self.mid, 1, 1), (self.mid, 3, self.stride), (self.features, 1, 1)]

        if self.version == "v1":
            f = x
            for i, (feat, k, s) in enumerate(convs):
                f = self.conv(feat, k, s, f"conv{i}")(f)
                f = self.norm_layer(f"norm{i}")(f, train=train)
                if i < len(convs) - 1:
                    f = act(f)
            shortcut = x
            if project:
                shortcut = self.conv(self.features, 1, self.stride, "conv_shortcut")(x)
                shortcut = self.norm_layer("norm_shortcut")(shortcut, train=train)
        else:
            a = act(self.norm_layer("norm_in")(x, train=train))
            shortcut = (
                self.conv(self.features, 1, self.stride, "conv_shortcut")(a) if project else x
            )
            f = a
            for i, (feat, k, s) in enumerate(convs):
                if i > 0:
                    f = act(self.norm_layer(f"norm{i - 1}")(f, train=train))
                f = self.conv(feat, k, s, f"conv{i}")(f)

        self.sow("intermediates", "branch_out", f)
        if self.skip_init:
            gain = self.param("skip_gain", nn.initializers.zeros, (), jnp.float32)
            f = gain.astype(f.dtype) * f
        out = shortcut + f
        if self.version == "v1":
            out = act(out)
        self.sow("intermediates", "block_out", out)
        return out


def check_resnet_config(model: ResNet) -> None:
    """Validates the config; errors name the bad value and the valid ones."""
    if model.block not in BLOCK_TYPES:
        raise ValueError(f"ResNet: block {model.block!r} is not one of {BLOCK_TYPES}")
    if model.version not in VERSIONS:
        raise ValueError(f"ResNet: version {model.version!r} is not one of {VERSIONS}")
    if model.activation not in ACTIVATIONS:
        raise ValueError(
            f"ResNet: unknown activation {model.activation!r}; valid: {sorted(ACTIVATIONS)}"
        )
    check_stages("ResNet", model.widths, model.depths)
    check_stem_stride("ResNet", model.small, model.stem_stride)


class ResNet(MinImageSize, _Layers):
    """ResNet baseline (module docstring). ``__call__(images, *, train) -> (N, classes)`` f32.

    Stateful norms keep their running statistics in the ``"batch_stats"``
    collection: apply with ``mutable=["batch_stats"]`` when ``train=True``.
    """

    num_classes: int = 1000
    depths: Sequence[int] = RESNET_DEPTHS[50][1]
    widths: Sequence[int] = BOTTLENECK_WIDTHS
    block: str = "bottleneck"
    version: str = "v1"
    stem_width: int = 64
    bottleneck_ratio: float = 0.25
    skip_init: bool = False
    activation: str = "relu"
    dropout: float = 0.0
    small: bool = False
    stem_stride: int = 1  # small stem only, as in NFResNet: 2 halves the resolution

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        check_resnet_config(self)
        self.check_input(x)
        act = ACTIVATIONS[self.activation]
        h = x.astype(self.dtype)
        if self.small:
            h = self.conv(self.stem_width, 3, self.stem_stride, "stem_conv")(h)
        else:
            h = self.conv(self.stem_width, 7, 2, "stem_conv")(h)
        if self.version == "v1":
            h = act(self.norm_layer("stem_norm")(h, train=train))
        if not self.small:
            h = nn.max_pool(h, (3, 3), strides=(2, 2), padding="SAME")

        for stage, (width, depth) in enumerate(zip(self.widths, self.depths, strict=True)):
            for block in range(depth):
                h = ResNetBlock(
                    norm=self.norm,
                    norm_kwargs=self.norm_kwargs,
                    ws_conv=self.ws_conv,
                    dtype=self.dtype,
                    features=width,
                    mid=max(1, int(width * self.bottleneck_ratio)),
                    stride=STAGE_STRIDES[stage] if block == 0 else 1,
                    block=self.block,
                    version=self.version,
                    skip_init=self.skip_init,
                    activation=self.activation,
                    name=f"stage{stage}_block{block}",
                )(h, train=train)

        if self.version == "v2":
            h = act(self.norm_layer("final_norm")(h, train=train))
        return classifier_head(
            h, num_classes=self.num_classes, dropout=self.dropout, dtype=self.dtype, train=train
        )
