"""Thin ``flax.linen`` modules over the pure norms, and ``make(name)`` for configs.

Each module owns its parameters and state and calls one pure function of
:mod:`norms`; the formulas, conventions and argument checks live there.

- Call: ``module(x, *, train=..., mask=None)``. ``train`` is a REQUIRED keyword for
  the stateful norms (BatchNorm, BatchRenorm, SwitchableNorm, EvoNormB0) and is
  never inferred from which collections are mutable. The batch-independent norms
  accept ``train=None`` (ignored) only so a model can call any norm the same way.
  Every module takes ``mask`` (a boolean broadcastable to ``x``; True values enter
  the statistics, every value is normalized), passed to its pure function;
  ``Identity`` and the statistics-free DynamicTanh and Derf ignore it.
- State: collection ``"batch_stats"`` with variables ``mean`` (C,) f32, ``var``
  (C,) f32, ``count`` () int32 (number of running updates), plus ``step`` for
  BatchRenorm. ``train=True`` needs ``mutable=["batch_stats"]`` in ``apply``.
  Initialization never updates the statistics (as in flax's BatchNorm) and never
  warns about them.
- Params: per-channel (C,) ``scale`` (init ``scale_init``, ones by default; zeros
  for a zero-initialized residual branch) and ``bias``; FRN adds ``tau`` and, with
  ``learned_eps=True``, ``eps`` (both (C,)); EvoNorm adds ``v`` (C,) (ones);
  SwitchableNorm adds ``mean_logits``/``var_logits`` (3,) (zeros: equal weights);
  RMSNorm has ``scale`` only (as flax's); DynamicTanh adds ``alpha`` and Derf
  ``alpha`` and ``shift``, scalars (the papers') or (C,) with ``per_channel=True``.
- Dtypes: statistics and running state in float32; parameters in ``param_dtype``;
  the output in ``dtype`` (``None``: the input's dtype).
- PreciseBN: in train mode the batch-norm-like modules ``sow`` their (C,) batch
  moments (``mean``, ``var``, ``count``) into the ``"batch_moments"`` collection,
  mirroring the ``"batch_stats"`` tree; only stored when that collection is
  mutable (see :mod:`norms.precise_bn`).

All modules are channels-last by default (``axis=-1``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from norms.batch_norm import batch_norm
from norms.batch_renorm import BatchRenormState, batch_renorm
from norms.evo_norm import evonorm_b0, evonorm_s0
from norms.filter_response_norm import filter_response_norm
from norms.group_norm import group_norm, instance_norm, layer_norm
from norms.pointwise import (
    DERF_ALPHA_INIT,
    DERF_SHIFT_INIT,
    DYT_ALPHA_INIT,
    derf,
    dynamic_tanh,
)
from norms.registry import NORM_CLASSES, NORM_NAMES, call_stateful, resolve
from norms.rms_norm import rms_norm
from norms.running_stats import BatchNormState, init_batch_norm_state
from norms.switchable_norm import switchable_norm

Initializer = Callable[..., jax.Array]
Dtype = Any


class _Scaled(nn.Module):
    """Shared fields: an optional per-channel scale and the dtypes."""

    use_scale: bool = True
    scale_init: Initializer = nn.initializers.ones
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def channel_param(self, name: str, init: Initializer, c: int) -> jax.Array:
        return self.param(name, init, (c,), self.param_dtype)

    def scale_param(self, c: int) -> jax.Array | None:
        return self.channel_param("scale", self.scale_init, c) if self.use_scale else None

    def out(self, y: jax.Array) -> jax.Array:
        return y if self.dtype is None else y.astype(self.dtype)


class _Affine(_Scaled):
    """Shared fields: optional per-channel scale/bias and the dtypes."""

    use_bias: bool = True
    bias_init: Initializer = nn.initializers.zeros

    def affine(self, c: int) -> tuple[jax.Array | None, jax.Array | None]:
        bias = self.channel_param("bias", self.bias_init, c) if self.use_bias else None
        return self.scale_param(c), bias


class _Stateful(_Affine):
    """Shared fields and plumbing of the norms with running statistics in ``batch_stats``."""

    momentum: float = 0.9
    eps: float = 1e-5
    axis: int = -1
    axis_name: str | tuple[str, ...] | None = None
    axis_index_groups: Sequence[Sequence[int]] | None = None
    on_stale: str = "warn"

    def running_state(self, c: int, *, with_step: bool = False):
        init = init_batch_norm_state(c)
        mean = self.variable("batch_stats", "mean", lambda: init.mean)
        var = self.variable("batch_stats", "var", lambda: init.var)
        count = self.variable("batch_stats", "count", lambda: init.count)
        vs = [mean, var, count]
        if with_step:
            vs.append(self.variable("batch_stats", "step", lambda: jnp.zeros((), jnp.int32)))
            return vs, BatchRenormState(*(v.value for v in vs))
        return vs, BatchNormState(*(v.value for v in vs))

    def check_train(self, train) -> None:
        if not isinstance(train, bool):
            raise ValueError(
                f"{type(self).__name__}: train must be True or False (given explicitly, "
                f"never inferred), got {train!r}"
            )
        if train and not self.is_initializing() and not self.is_mutable_collection("batch_stats"):
            raise ValueError(
                f"{type(self).__name__}: train=True updates the running statistics; call "
                "apply(..., mutable=['batch_stats']) (or pass train=False for eval/frozen)."
            )

    def apply_norm(self, fn, x, *, train, mask, extra=None, with_step=False, **kwargs):
        """Runs the pure stateful ``fn`` with this module's state, params and fields.

        ``fn(x, state, scale, bias, *extra(C), train=..., momentum, eps, axis,
        axis_name, axis_index_groups, mask, on_stale, return_batch_stats=True,
        **kwargs)``; ``extra`` creates further params from the channel count. In
        training (never during init) the new running state is written and the (C,)
        batch ``mean``/``var``/``count`` are sown into ``"batch_moments"`` (stored
        only when that collection is mutable). Returns the output in ``dtype``.
        """
        self.check_train(train)
        c = x.shape[self.axis]
        variables, state = self.running_state(c, with_step=with_step)
        scale, bias = self.affine(c)
        params = () if extra is None else extra(c)
        on_stale = "ignore" if self.is_initializing() else self.on_stale
        y, new_state, batch_moments = call_stateful(
            fn,
            self,
            x,
            state,
            scale,
            bias,
            *params,
            train=train,
            mask=mask,
            on_stale=on_stale,
            return_batch_stats=True,
            **kwargs,
        )
        if train and not self.is_initializing():
            for v, value in zip(variables, new_state, strict=True):
                v.value = value
            for key, value in zip(("mean", "var", "count"), batch_moments, strict=True):
                self.sow("batch_moments", key, value, init_fn=lambda: None, reduce_fn=_latest)
        return self.out(y)


def _latest(_, new):
    return new


class BatchNorm(_Stateful):
    """Batch norm (:func:`norms.batch_norm`); ``momentum`` is the weight on the old value.

    ``train=False`` is eval and also frozen BN for fine-tuning (running statistics
    used, not updated; gradients flow).
    """

    ghost_batch_size: int | None = None
    unbiased_running_var: bool = False
    zero_debias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        return self.apply_norm(
            batch_norm,
            x,
            train=train,
            mask=mask,
            ghost_batch_size=self.ghost_batch_size,
            unbiased_running_var=self.unbiased_running_var,
            zero_debias=self.zero_debias,
        )


class BatchRenorm(_Stateful):
    """Batch renorm (:func:`norms.batch_renorm`); ``r_max``/``d_max`` numbers or schedules.

    The schedules are called with the ``step`` kept in ``batch_stats``.
    """

    r_max: float | Callable[[jax.Array], jax.Array] = 3.0
    d_max: float | Callable[[jax.Array], jax.Array] = 5.0
    momentum: float = 0.99

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        return self.apply_norm(
            batch_renorm,
            x,
            train=train,
            mask=mask,
            with_step=True,
            r_max=self.r_max,
            d_max=self.d_max,
        )


class SwitchableNorm(_Stateful):
    """Switchable norm (:func:`norms.switchable_norm`); BN-branch state in ``batch_stats``."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        def logits(c):
            zeros = nn.initializers.zeros  # (3,) logits over (IN, LN, BN): equal weights
            names = ("mean_logits", "var_logits")
            return tuple(self.param(n, zeros, (3,), self.param_dtype) for n in names)

        return self.apply_norm(switchable_norm, x, train=train, mask=mask, extra=logits)


class EvoNormB0(_Stateful):
    """EvoNorm-B0 (:func:`norms.evonorm_b0`); per-channel ``v`` (init 1), running var."""

    unbiased_running_var: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        def v(c):
            return (self.channel_param("v", nn.initializers.ones, c),)

        unbiased = self.unbiased_running_var
        return self.apply_norm(
            evonorm_b0, x, train=train, mask=mask, extra=v, unbiased_running_var=unbiased
        )


class GroupNorm(_Affine):
    """Group norm (:func:`norms.group_norm`); ``train`` accepted and ignored."""

    num_groups: int | None = None
    group_size: int | None = None
    eps: float = 1e-5
    axis: int = -1

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool | None = None, mask=None) -> jax.Array:
        del train  # batch-independent: accepted only for a uniform call signature
        scale, bias = self.affine(x.shape[self.axis])
        y = group_norm(
            x,
            scale,
            bias,
            num_groups=self.num_groups,
            group_size=self.group_size,
            eps=self.eps,
            axis=self.axis,
            mask=mask,
        )
        return self.out(y)


class _PerExampleNorm(_Affine):
    """Shared body of LayerNorm and InstanceNorm: ``norm(x, scale, bias, eps, axis, mask)``."""

    eps: float = 1e-5
    axis: int = -1

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool | None = None, mask=None) -> jax.Array:
        del train  # batch-independent: accepted only for a uniform call signature
        scale, bias = self.affine(x.shape[self.axis])
        return self.out(self.norm(x, scale, bias, eps=self.eps, axis=self.axis, mask=mask))


class LayerNorm(_PerExampleNorm):
    """Layer norm over all non-batch axes (:func:`norms.layer_norm`); ``train`` ignored."""

    norm = staticmethod(layer_norm)


class InstanceNorm(_PerExampleNorm):
    """Instance norm (:func:`norms.instance_norm`); ``train`` ignored."""

    norm = staticmethod(instance_norm)


class FilterResponseNorm(_Affine):
    """FRN + TLU (:func:`norms.filter_response_norm`); ``train`` ignored.

    ``tau`` (C,) init 0 when ``use_tau``; ``learned_eps=True`` adds an ``eps`` (C,)
    param initialised to ``learned_eps_init`` (effective eps ``|eps| + |eps_l|``).
    """

    eps: float = 1e-6
    use_tau: bool = True
    learned_eps: bool = False
    learned_eps_init: float = 1e-4
    axis: int = -1

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool | None = None, mask=None) -> jax.Array:
        del train  # batch-independent: accepted only for a uniform call signature
        c = x.shape[self.axis]
        scale, bias = self.affine(c)
        tau = self.channel_param("tau", nn.initializers.zeros, c) if self.use_tau else None
        eps_l = (
            self.channel_param("eps", nn.initializers.constant(self.learned_eps_init), c)
            if self.learned_eps
            else None
        )
        y = filter_response_norm(
            x, scale, bias, tau, eps=self.eps, learned_eps=eps_l, axis=self.axis, mask=mask
        )
        return self.out(y)


class EvoNormS0(_Affine):
    """EvoNorm-S0 (:func:`norms.evonorm_s0`); per-channel ``v`` (init 1); ``train`` ignored."""

    num_groups: int = 32
    eps: float = 1e-5
    axis: int = -1

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool | None = None, mask=None) -> jax.Array:
        del train  # batch-independent: accepted only for a uniform call signature
        c = x.shape[self.axis]
        scale, bias = self.affine(c)
        v = self.channel_param("v", nn.initializers.ones, c)
        g, eps = self.num_groups, self.eps
        y = evonorm_s0(x, scale, bias, v, num_groups=g, eps=eps, axis=self.axis, mask=mask)
        return self.out(y)


class RMSNorm(_Scaled):
    """RMSNorm (:func:`norms.rms_norm`), flax's formula: ``scale`` (C,) only; ``train`` ignored."""

    eps: float = 1e-6
    axis: int = -1

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool | None = None, mask=None) -> jax.Array:
        del train  # batch-independent: accepted only for a uniform call signature
        scale = self.scale_param(x.shape[self.axis])
        return self.out(rms_norm(x, scale, axis=self.axis, eps=self.eps, mask=mask))


class _Pointwise(_Affine):
    """DyT's and Derf's fields: ``alpha`` (and ``shift``) scalars, or (C,) if ``per_channel``."""

    per_channel: bool = False
    axis: int = -1

    def pre_param(self, name: str, value: float, c: int) -> jax.Array:
        shape = (c,) if self.per_channel else ()
        return self.param(name, nn.initializers.constant(value), shape, self.param_dtype)


class DynamicTanh(_Pointwise):
    """DyT (:func:`norms.dynamic_tanh`): ``scale * tanh(alpha * x) + bias``, no statistics.

    ``alpha`` is a scalar param initialised to ``alpha_init`` (the paper's 0.5), or
    (C,) with ``per_channel=True``. ``train`` and ``mask`` are ignored (there is no
    statistic for a mask to leave values out of).
    """

    alpha_init: float = DYT_ALPHA_INIT

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool | None = None, mask=None) -> jax.Array:
        del train, mask  # pointwise: no statistics, nothing to mask
        c = x.shape[self.axis]
        scale, bias = self.affine(c)
        alpha = self.pre_param("alpha", self.alpha_init, c)
        return self.out(dynamic_tanh(x, alpha, scale, bias, axis=self.axis))


class Derf(_Pointwise):
    """Derf (:func:`norms.derf`): ``scale * erf(alpha * x + shift) + bias``, no statistics.

    ``alpha`` and ``shift`` are scalar params initialised to ``alpha_init`` (0.5)
    and ``shift_init`` (0), the reference code's values, or (C,) with
    ``per_channel=True``. ``train`` and ``mask`` are ignored.
    """

    alpha_init: float = DERF_ALPHA_INIT
    shift_init: float = DERF_SHIFT_INIT

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool | None = None, mask=None) -> jax.Array:
        del train, mask  # pointwise: no statistics, nothing to mask
        c = x.shape[self.axis]
        scale, bias = self.affine(c)
        alpha = self.pre_param("alpha", self.alpha_init, c)
        shift = self.pre_param("shift", self.shift_init, c)
        return self.out(derf(x, alpha, shift, scale, bias, axis=self.axis))


class Identity(nn.Module):
    """No normalization (``make("none")``); ``train`` and ``mask`` accepted and ignored."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool | None = None, mask=None) -> jax.Array:
        del train, mask
        return x


# The norms keeping running statistics in "batch_stats"; the only ones taking axis_name.
STATEFUL_NORM_NAMES: tuple[str, ...] = tuple(
    n for n, cls_name in NORM_CLASSES.items() if issubclass(globals()[cls_name], _Stateful)
)


def module_fields(cls: type[nn.Module]) -> tuple[str, ...]:
    """Keyword arguments ``make`` accepts for a module class (``name`` included)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.name != "parent")


def make(name: str, /, **kwargs) -> nn.Module:
    """The norm module registered as ``name`` (one of :data:`NORM_NAMES`).

    ``name`` is positional-only, so ``kwargs`` can carry the submodule's own
    ``name=``; the other ``kwargs`` are module fields (``momentum``, ``eps``,
    ``axis_name``, ...). Call it inside a parent's ``@nn.compact``.
    Unknown names or fields raise ValueError listing the valid ones (the names
    are those of :mod:`norms.registry`, shared with :mod:`norms.nnx`).
    """
    cls = resolve(name, globals(), module_fields, kwargs)
    return cls(**kwargs)


__all__ = [
    "NORM_NAMES",
    "STATEFUL_NORM_NAMES",
    "BatchNorm",
    "BatchRenorm",
    "Derf",
    "DynamicTanh",
    "EvoNormB0",
    "EvoNormS0",
    "FilterResponseNorm",
    "GroupNorm",
    "Identity",
    "InstanceNorm",
    "LayerNorm",
    "RMSNorm",
    "SwitchableNorm",
    "make",
    "module_fields",
]
