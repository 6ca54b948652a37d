"""Building blocks of normalizer-free networks (flax.linen), channels-last (NHWC).

* :class:`WSConv2D`: convolution with scaled weight standardization (NF nets).
* :class:`StdConv2D`: convolution with plain weight standardization (GN+WS baselines).
* :class:`SqueezeExcite`: channel gate in (0, 1), shape ``(N, 1, 1, C)``.
* :class:`StochasticDepth`: per-example residual-branch drop.
* :class:`NFBlock`: fields and residual tail shared by the NF residual blocks.

The formulas live in :mod:`norms.weight_standardization`; these modules only hold
parameters and call them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

import norms
from nfnets.activations import scaled_activation

Dtype = Any
IntPair = int | Sequence[int]


def _pair(value: IntPair, what: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"{what} must be an int or a pair of ints, got {value}")
    return value


def _check_groups(in_features: int, features: int, groups: int, who: str) -> None:
    if groups < 1:
        raise ValueError(f"{who}: feature_group_count must be >= 1, got {groups}")
    if in_features % groups:
        raise ValueError(
            f"{who}: feature_group_count {groups} does not divide the {in_features} input "
            "channels; choose a group count that divides both channel counts"
        )
    if features % groups:
        raise ValueError(
            f"{who}: feature_group_count {groups} does not divide the {features} output "
            "channels; choose a group count that divides both channel counts"
        )


def _conv(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    strides: IntPair,
    padding: str | Sequence[tuple[int, int]],
    groups: int,
    dtype: Dtype | None,
) -> jax.Array:
    """NHWC x HWIO convolution in the promoted compute dtype, plus optional bias."""
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=dtype)
    y = jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=_pair(strides, "strides"),
        padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )
    if bias is not None:
        y = y + bias
    return y


class _StandardizedConv(nn.Module):
    """Fields, params and convolution shared by :class:`WSConv2D` and :class:`StdConv2D`.

    Subclasses set the defaults of ``use_bias``, ``eps`` and ``kernel_init`` and say
    how the kernel is standardized.
    """

    features: int
    kernel_size: IntPair = 3
    strides: IntPair = 1
    padding: str | Sequence[tuple[int, int]] = "SAME"
    feature_group_count: int = 1
    use_bias: bool = True
    eps: float = 1e-4
    kernel_init: Any = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def make_params(
        self, x: jax.Array, *, with_gain: bool
    ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
        """Checks groups and creates ``kernel`` (HWIO, per-group input count), then
        ``gain`` (features,) init 1 if ``with_gain``, then ``bias`` (features,) init 0
        if ``use_bias``. Call from the subclass's ``@nn.compact`` ``__call__``."""
        groups = self.feature_group_count
        _check_groups(x.shape[-1], self.features, groups, type(self).__name__)
        kh, kw = _pair(self.kernel_size, "kernel_size")
        shape = (kh, kw, x.shape[-1] // groups, self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        pshape = (self.features,)
        gain = (
            self.param("gain", nn.initializers.ones, pshape, self.param_dtype)
            if with_gain
            else None
        )
        bias = (
            self.param("bias", nn.initializers.zeros, pshape, self.param_dtype)
            if self.use_bias
            else None
        )
        return kernel, gain, bias

    def conv(self, x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
        """``x`` convolved with the (standardized) ``kernel``, plus ``bias``."""
        return _conv(
            x, kernel, bias, self.strides, self.padding, self.feature_group_count, self.dtype
        )


class WSConv2D(_StandardizedConv):
    """2D convolution with scaled weight standardization (Brock et al., 2021).

    ``w_hat = gain * (w - mean) * rsqrt(max(var * fan_in, eps))`` per output channel,
    mean/var over the HWIO kernel's (H, W, I) axes, ``fan_in = H * W * I`` where
    ``I`` is the per-group input count for grouped convolutions
    (``feature_group_count``). Statistics are float32 whatever ``dtype``; the
    standardized kernel is then cast to the compute dtype.

    Input ``(N, H, W, C_in)``, output ``(N, H', W', features)``.

    Params: ``kernel`` (kh, kw, C_in / groups, features), raw, initialised
    ``variance_scaling(1, fan_in, normal)``; ``gain`` (features,) init 1;
    ``bias`` (features,) init 0 when ``use_bias``.

    Fields: ``features``, ``kernel_size=3``, ``strides=1``, ``padding="SAME"``,
    ``feature_group_count=1``, ``use_bias=True``, ``eps=1e-4``, ``kernel_init``,
    ``dtype=None`` (compute), ``param_dtype=float32``.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, gain, bias = self.make_params(x, with_gain=True)
        w = norms.scaled_weight_standardize(
            kernel.astype(jnp.float32), gain.astype(jnp.float32), eps=self.eps
        )
        return self.conv(x, w, bias)


class StdConv2D(_StandardizedConv):
    """2D convolution with weight standardization (Qiao et al., 2019), for GN+WS.

    ``w_hat = (w - mean) * rsqrt(var + eps)`` per output channel over (H, W, I);
    statistics float32. No gain (the following norm layer carries the affine).
    Params: ``kernel`` (HWIO) and optional ``bias``.

    Fields as :class:`WSConv2D`, with defaults ``use_bias=False``, ``eps=1e-5``,
    ``kernel_init=variance_scaling(2, fan_in, normal)``.
    """

    use_bias: bool = False
    eps: float = 1e-5
    kernel_init: Any = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, _, bias = self.make_params(x, with_gain=False)
        w = norms.weight_standardize(kernel.astype(jnp.float32), eps=self.eps)
        return self.conv(x, w, bias)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excite gate (Hu et al., 2018) as in the NFNet reference.

    ``gate = sigmoid(fc1(relu(fc0(mean_{H,W}(x)))))`` with ``fc0: C -> max(1,
    int(ratio * C))`` and ``fc1: -> C``, both with biases. Returns the gate of shape
    ``(N, 1, 1, C)``; the caller multiplies (NF blocks use ``2 * gate * x`` so the
    gate's 0.5 expectation at init keeps the signal's scale). The pooled mean is
    taken in float32.
    """

    ratio: float = 0.5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.ratio > 0:
            raise ValueError(f"SqueezeExcite: ratio must be > 0, got {self.ratio}")
        channels = x.shape[-1]
        hidden = max(1, int(self.ratio * channels))
        dtype = self.dtype or x.dtype
        h = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(dtype)
        h = nn.Dense(hidden, dtype=dtype, param_dtype=self.param_dtype, name="fc0")(h)
        h = nn.relu(h)
        h = nn.Dense(channels, dtype=dtype, param_dtype=self.param_dtype, name="fc1")(h)
        return jax.nn.sigmoid(h)[:, None, None, :]


class StochasticDepth(nn.Module):
    """Stochastic depth (Huang et al., 2016): drops the whole residual branch per example.

    In training each example's branch is kept with probability ``1 - rate`` (a mask
    of shape ``(N, 1, ..., 1)`` drawn from the ``"dropout"`` rng stream); in eval
    the input is returned unchanged.

    Rescaling: with ``scale_by_keep=False`` (the default, as in DeepMind's NFNet
    reference ``StochDepth``) kept branches are *not* divided by ``1 - rate``, so the
    branch's expected training output is ``(1 - rate)`` times its eval output.
    ``scale_by_keep=True`` gives the inverted-dropout convention (timm's
    ``DropPath``), whose expectation matches eval.
    """

    rate: float
    scale_by_keep: bool = False
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"StochasticDepth: rate must be in [0, 1), got {self.rate}")
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        key = self.make_rng(self.rng_collection)
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(key, keep, shape).astype(x.dtype)
        if self.scale_by_keep:
            x = x / jnp.asarray(keep, x.dtype)
        return x * mask


# --- helpers shared by the model families -------------------------------------------

STAGE_STRIDES = (1, 2, 2, 2)  # stride of each stage's first block (all model families)


class NFBlock(nn.Module):
    """Fields and the pre-activation/residual tail shared by NF residual blocks.

    Subclasses (:class:`nfnets.nf_resnet.NFResNetBlock`,
    :class:`nfnets.nfnet.NFNetBlock`) build the shortcut and branch ``f`` in their
    ``@nn.compact`` ``__call__`` from :meth:`preactivate` and return
    :meth:`residual_output`. ``features``: output width W; ``mid``: bottleneck width;
    ``stride`` of the block; ``beta``: input scale ``1 / expected_std``; ``alpha``:
    residual scale; ``se_ratio`` (0 = no SE); ``stochastic_depth``: branch drop rate;
    ``activation``: name for :func:`nfnets.activations.scaled_activation`;
    ``dtype``: compute dtype.
    """

    features: int
    mid: int
    stride: int
    beta: float
    alpha: float
    se_ratio: float
    stochastic_depth: float
    activation: str
    dtype: Any = jnp.float32

    def preactivate(self, x: jax.Array) -> jax.Array:
        """``act(x) * beta``: the input of the branch (and of a projection shortcut)."""
        return scaled_activation(self.activation)(x) * jnp.asarray(self.beta, x.dtype)

    def residual_output(self, shortcut: jax.Array, f: jax.Array, *, train: bool) -> jax.Array:
        """``shortcut + alpha * skip_gain * stochastic_depth(2 * se(f) * f)``.

        Call from the subclass's ``@nn.compact`` ``__call__``; creates, in the block's
        scope, submodule ``"se"`` (only when ``se_ratio > 0``), ``"stochastic_depth"``
        (no params) and scalar param ``"skip_gain"`` (init 0, float32), and sows
        ``intermediates`` ``"branch_out"`` (``f`` after SE, before stochastic depth and
        the gains) and ``"block_out"`` (the returned output). ``shortcut`` and ``f``:
        same shape (N, H, W, W_out).
        """
        if self.se_ratio > 0:
            f = 2.0 * SqueezeExcite(self.se_ratio, dtype=self.dtype, name="se")(f) * f
        self.sow("intermediates", "branch_out", f)
        f = StochasticDepth(self.stochastic_depth, name="stochastic_depth")(f, train=train)
        gain = self.param("skip_gain", nn.initializers.zeros, (), jnp.float32)
        out = shortcut + (self.alpha * gain).astype(f.dtype) * f
        self.sow("intermediates", "block_out", out)
        return out


def check_stages(who: str, widths: Sequence[int], depths: Sequence[int]) -> None:
    """Validates per-stage ``widths``/``depths``: equal lengths, at most
    ``len(STAGE_STRIDES)`` stages, every depth >= 1. Errors name ``who`` and the values."""
    if len(widths) != len(depths):
        raise ValueError(
            f"{who}: widths {tuple(widths)} and depths {tuple(depths)} must "
            "have one entry per stage"
        )
    if len(depths) > len(STAGE_STRIDES):
        raise ValueError(f"{who}: at most {len(STAGE_STRIDES)} stages, got {len(depths)}")
    if any(d < 1 for d in depths):
        raise ValueError(f"{who}: every stage depth must be >= 1, got {tuple(depths)}")


def check_stem_stride(who: str, small: bool, stem_stride: int) -> None:
    """``stem_stride`` is a positive int, and only the ``_small`` 3x3 stem takes one
    (the full stem's 7x7 conv + max pool have the published stride 4)."""
    if not isinstance(stem_stride, int) or isinstance(stem_stride, bool) or stem_stride < 1:
        raise ValueError(f"{who}: stem_stride must be a positive int, got {stem_stride!r}")
    if stem_stride != 1 and not small:
        raise ValueError(
            f"{who}: stem_stride {stem_stride} applies to the small 3x3 stem only; "
            "use the model's _small variant or leave stem_stride at 1"
        )


def total_stride(stem_stride: int, num_stages: int) -> int:
    """Total stride of a stem (``stem_stride``) and the first ``num_stages`` stages:
    the smallest H and W a model accepts."""
    stride = stem_stride
    for s in STAGE_STRIDES[:num_stages]:
        stride *= s
    return stride


def classifier_head(
    features: jax.Array, *, num_classes: int, dropout: float, dtype: Dtype, train: bool
) -> jax.Array:
    """Global average pool (float32) -> dropout -> dense ``"head"`` N(0, 0.01) -> f32 logits.

    ``features`` (N, H, W, C) -> logits (N, num_classes) float32. Call from inside the
    model's ``@nn.compact`` method, so the Dense is the model's top-level ``"head"``
    (AGC excludes it by that path). Dropout uses the ``"dropout"`` rng stream.
    """
    pooled = jnp.mean(features.astype(jnp.float32), axis=(1, 2))
    pooled = nn.Dropout(dropout)(pooled, deterministic=not train)
    logits = nn.Dense(
        num_classes,
        kernel_init=nn.initializers.normal(0.01),
        dtype=dtype,
        name="head",
    )(pooled.astype(dtype))
    return logits.astype(jnp.float32)


def nf_betas(depths: Sequence[int], alpha: float) -> list[float]:
    """Per-block input scalings ``beta_i = 1 / expected_std_i`` of an NF network.

    Block ``i`` computes ``h + alpha * f(act(h) * beta_i)``. ``expected_std`` starts
    at 1 and grows to ``sqrt(expected_std^2 + alpha^2)`` after every block; after a
    stage's first (transition) block, whose shortcut re-normalizes the signal, it is
    reset to 1 before that growth, so the next block sees ``1 + alpha^2``.
    """
    betas = []
    expected_std = 1.0
    for depth in depths:
        for index in range(depth):
            betas.append(1.0 / expected_std)
            if index == 0:
                expected_std = 1.0
            expected_std = (expected_std**2 + alpha**2) ** 0.5
    return betas


class BlockPlan(NamedTuple):
    """Where one residual block sits and how it is scaled (see :func:`nf_block_plan`)."""

    stage: int
    block: int  # index within the stage
    stride: int
    beta: float
    drop_rate: float


def nf_block_plan(depths: Sequence[int], alpha: float, stochastic_depth: float) -> list[BlockPlan]:
    """One :class:`BlockPlan` per block of an NF network, in order.

    ``stride`` is ``STAGE_STRIDES[stage]`` for a stage's first block, else 1; ``beta``
    from :func:`nf_betas`; the stochastic-depth rate of block ``i`` (counting over all
    stages) is ``stochastic_depth * i / num_blocks``.
    """
    betas = nf_betas(depths, alpha)
    num_blocks = sum(depths)
    plan = []
    for stage, depth in enumerate(depths):
        for block in range(depth):
            index = len(plan)
            plan.append(
                BlockPlan(
                    stage=stage,
                    block=block,
                    stride=STAGE_STRIDES[stage] if block == 0 else 1,
                    beta=betas[index],
                    drop_rate=stochastic_depth * index / num_blocks,
                )
            )
    return plan


def check_image(x: jax.Array, min_size: int, who: str) -> None:
    """Trace-time check that ``x`` is NHWC and at least ``min_size`` in H and W."""
    if x.ndim != 4:
        raise ValueError(f"{who}: expected NHWC images (N, H, W, C), got shape {x.shape}")
    height, width = x.shape[1], x.shape[2]
    if height < min_size or width < min_size:
        raise ValueError(
            f"{who}: input {height}x{width} is too small for the model's stride pattern "
            f"(total stride {min_size}); the minimum image size is {min_size}x{min_size}. "
            "Use larger images or a '_small' variant (3x3 stride-1 stem, no max pool)."
        )


class MinImageSize:
    """Mixin of the models: ``min_image_size`` and the input check from the stride pattern.

    The full stem has total stride 4; the ``_small`` stem has stride ``stem_stride``
    (a field of NF-ResNet; 1 for models without it). The model needs ``small`` and
    ``depths`` fields.
    """

    @property
    def min_image_size(self) -> int:
        """Total stride of stem and stages: the smallest H and W the model accepts."""
        stem = getattr(self, "stem_stride", 1) if self.small else 4
        return total_stride(stem, len(self.depths))

    def check_input(self, x: jax.Array) -> None:
        """Trace-time check of the NHWC input against ``min_image_size``."""
        check_image(x, self.min_image_size, type(self).__name__)
