"""Thin Flax NNX modules over the pure norms, and ``make(name, num_features, *, rngs)``.

The same functions, names, fields, parameters and state as :mod:`norms.linen`
(read it for the conventions); only the container differs:

- Construction: ``Cls(num_features, *, rngs=nnx.Rngs(0), **fields)``; the channel
  count is given up front (NNX creates parameters eagerly).
- Params: ``nnx.Param`` attributes named as linen's ``params`` (``scale``,
  ``bias``; FRN ``tau``/``eps``; EvoNorm ``v``; SwitchableNorm
  ``mean_logits``/``var_logits``; DynamicTanh ``alpha``; Derf ``alpha``/``shift``);
  an absent one is ``None``.
- State: ``nnx.BatchStat`` attributes ``mean`` (C,) f32, ``var`` (C,) f32,
  ``count`` () int32 and, for BatchRenorm, ``step`` () int32: linen's
  ``batch_stats``. Training updates them in place (``nnx.jit`` carries the
  update out of the trace).
- Mode (stateful norms): the ``use_running_average`` attribute, False at
  construction as in ``nnx.BatchNorm``, so ``model.train()``/``model.eval()`` set
  it recursively and ``nnx.view(model, use_running_average=True)`` gives an eval
  view sharing the arrays. A call-time ``train=True/False`` overrides it (the
  explicit style of the linen modules); ``train=False`` is also frozen BN.
- Cross-device: ``axis_name``, ``axis_index_groups`` and ``mask`` go to the pure
  function unchanged, so SyncBN is exact and count-weighted with one collective
  (``nnx.BatchNorm`` averages per-device means instead). Use it inside
  ``jax.shard_map``/``jax.pmap`` over ``nnx.split``/``nnx.merge``.
- PreciseBN's ``batch_moments`` sowing exists only in :mod:`norms.linen`.

Example::

    from flax import nnx
    from norms import nnx as norms_nnx

    bn = norms_nnx.make("batch_norm", 64, rngs=nnx.Rngs(0), momentum=0.9)
    y = bn(x)                 # train mode: batch statistics, running stats updated
    bn.eval(); y = bn(x)      # running statistics, nothing updated
    y = bn(x, train=True)     # explicit override of the mode
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from norms.batch_norm import batch_norm
from norms.batch_renorm import BatchRenormState, batch_renorm, init_batch_renorm_state
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
from norms.registry import NORM_NAMES, call_stateful, resolve
from norms.rms_norm import rms_norm
from norms.running_stats import BatchNormState, init_batch_norm_state
from norms.switchable_norm import switchable_norm

Initializer = Callable[..., jax.Array]
Dtype = Any
ones, zeros = nnx.initializers.ones, nnx.initializers.zeros


def _get(v: nnx.Variable | None) -> jax.Array | None:
    return None if v is None else v[...]


class _Scaled(nnx.Module):
    """An optional per-channel ``scale`` param and the output dtype."""

    def __init__(
        self,
        num_features: int,
        *,
        use_scale: bool = True,
        scale_init: Initializer = ones,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(
                f"{type(self).__name__}: num_features must be a positive int (the channel "
                f"count), got {num_features!r}"
            )
        self.num_features = num_features
        self.dtype, self.param_dtype = dtype, param_dtype
        self.scale = self.channel_param(scale_init, rngs) if use_scale else nnx.data(None)

    def channel_param(self, init: Initializer, rngs: nnx.Rngs, shape=None) -> nnx.Param:
        shape = (self.num_features,) if shape is None else shape
        return nnx.Param(init(rngs.params(), shape, self.param_dtype))

    def out(self, y: jax.Array) -> jax.Array:
        return y if self.dtype is None else y.astype(self.dtype)


class _Affine(_Scaled):
    """Optional per-channel ``scale``/``bias`` params and the output dtype."""

    def __init__(
        self,
        num_features: int,
        *,
        use_bias: bool = True,
        bias_init: Initializer = zeros,
        rngs: nnx.Rngs,
        **scaled: Any,
    ):
        super().__init__(num_features, rngs=rngs, **scaled)
        self.bias = self.channel_param(bias_init, rngs) if use_bias else nnx.data(None)


def _check_mode(who: str, use_running_average) -> bool:
    if not isinstance(use_running_average, bool):
        raise ValueError(
            f"{who}: use_running_average must be True or False (or call .train()/.eval()), "
            f"got {use_running_average!r}"
        )
    return use_running_average


class _Stateful(_Affine):
    """Running statistics as ``nnx.BatchStat`` and the NNX train/eval mode."""

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool = False,
        momentum: float = 0.9,
        eps: float = 1e-5,
        axis: int = -1,
        axis_name: str | tuple[str, ...] | None = None,
        axis_index_groups: Sequence[Sequence[int]] | None = None,
        on_stale: str = "warn",
        rngs: nnx.Rngs,
        **affine: Any,
    ):
        super().__init__(num_features, rngs=rngs, **affine)
        self.use_running_average = _check_mode(type(self).__name__, use_running_average)
        self.momentum, self.eps, self.axis = momentum, eps, axis
        self.axis_name = axis_name
        # Static attributes must be hashable: nested lists become tuples.
        groups = axis_index_groups
        self.axis_index_groups = None if groups is None else tuple(map(tuple, groups))
        self.on_stale = on_stale
        for name, value in self.init_state(num_features)._asdict().items():
            setattr(self, name, nnx.BatchStat(value))

    State, init_state = BatchNormState, staticmethod(init_batch_norm_state)

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view``: ``use_running_average=True`` is eval mode."""
        if use_running_average is not None:
            self.use_running_average = _check_mode(type(self).__name__, use_running_average)

    def apply_norm(self, fn, x, *extra, train: bool | None, mask, **kwargs) -> jax.Array:
        """Runs ``fn(x, state, scale, bias, *extra, train=..., ...)``; writes the new state."""
        if train is None:
            train = not self.use_running_average
        if not isinstance(train, bool):
            raise ValueError(
                f"{type(self).__name__}: train must be True, False or None (None: the "
                f"module's mode, set by .train()/.eval()), got {train!r}"
            )
        stats = [getattr(self, n) for n in self.State._fields]
        state = self.State(*(v[...] for v in stats))
        params = (_get(p) for p in (self.scale, self.bias, *extra))
        y, new_state = call_stateful(
            fn, self, x, state, *params, train=train, mask=mask, on_stale=self.on_stale, **kwargs
        )
        if train:
            for v, value in zip(stats, new_state, strict=True):
                v[...] = value
        return self.out(y)


class BatchNorm(_Stateful):
    """Batch norm (:func:`norms.batch_norm`); ``momentum`` is the weight on the old value."""

    def __init__(
        self,
        num_features: int,
        *,
        ghost_batch_size: int | None = None,
        unbiased_running_var: bool = False,
        zero_debias: bool = False,
        rngs: nnx.Rngs,
        **fields: Any,
    ):
        super().__init__(num_features, rngs=rngs, **fields)
        self.ghost_batch_size = ghost_batch_size
        self.unbiased_running_var, self.zero_debias = unbiased_running_var, zero_debias

    def __call__(self, x: jax.Array, *, train: bool | None = None, mask=None) -> jax.Array:
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
    """Batch renorm (:func:`norms.batch_renorm`); schedules read the ``step`` BatchStat."""

    State, init_state = BatchRenormState, staticmethod(init_batch_renorm_state)

    def __init__(
        self,
        num_features: int,
        *,
        r_max: float | Callable[[jax.Array], jax.Array] = 3.0,
        d_max: float | Callable[[jax.Array], jax.Array] = 5.0,
        momentum: float = 0.99,
        rngs: nnx.Rngs,
        **fields: Any,
    ):
        super().__init__(num_features, momentum=momentum, rngs=rngs, **fields)
        self.r_max, self.d_max = r_max, d_max

    def __call__(self, x: jax.Array, *, train: bool | None = None, mask=None) -> jax.Array:
        return self.apply_norm(
            batch_renorm, x, train=train, mask=mask, r_max=self.r_max, d_max=self.d_max
        )


class SwitchableNorm(_Stateful):
    """Switchable norm (:func:`norms.switchable_norm`); (3,) logits over (IN, LN, BN)."""

    def __init__(self, num_features: int, *, rngs: nnx.Rngs, **fields: Any):
        super().__init__(num_features, rngs=rngs, **fields)
        self.mean_logits = self.channel_param(zeros, rngs, (3,))  # zeros: equal weights
        self.var_logits = self.channel_param(zeros, rngs, (3,))

    def __call__(self, x: jax.Array, *, train: bool | None = None, mask=None) -> jax.Array:
        extra = (self.mean_logits, self.var_logits)
        return self.apply_norm(switchable_norm, x, *extra, train=train, mask=mask)


class EvoNormB0(_Stateful):
    """EvoNorm-B0 (:func:`norms.evonorm_b0`); per-channel ``v`` (init 1), running var."""

    def __init__(
        self,
        num_features: int,
        *,
        unbiased_running_var: bool = False,
        rngs: nnx.Rngs,
        **fields: Any,
    ):
        super().__init__(num_features, rngs=rngs, **fields)
        self.v = self.channel_param(ones, rngs)
        self.unbiased_running_var = unbiased_running_var

    def __call__(self, x: jax.Array, *, train: bool | None = None, mask=None) -> jax.Array:
        unbiased = self.unbiased_running_var
        return self.apply_norm(
            evonorm_b0, x, self.v, train=train, mask=mask, unbiased_running_var=unbiased
        )


class GroupNorm(_Affine):
    """Group norm (:func:`norms.group_norm`); ``train`` accepted and ignored."""

    def __init__(
        self,
        num_features: int,
        *,
        num_groups: int | None = None,
        group_size: int | None = None,
        eps: float = 1e-5,
        axis: int = -1,
        rngs: nnx.Rngs,
        **affine: Any,
    ):
        super().__init__(num_features, rngs=rngs, **affine)
        self.num_groups, self.group_size, self.eps, self.axis = num_groups, group_size, eps, axis

    def __call__(self, x: jax.Array, *, train: bool | None = None, mask=None) -> jax.Array:
        del train  # batch-independent: accepted only for a uniform call signature
        y = group_norm(
            x,
            _get(self.scale),
            _get(self.bias),
            num_groups=self.num_groups,
            group_size=self.group_size,
            eps=self.eps,
            axis=self.axis,
            mask=mask,
        )
        return self.out(y)


class _PerExampleNorm(_Affine):
    """Shared body of LayerNorm and InstanceNorm: ``norm(x, scale, bias, eps, axis, mask)``."""

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        axis: int = -1,
        rngs: nnx.Rngs,
        **affine: Any,
    ):
        super().__init__(num_features, rngs=rngs, **affine)
        self.eps, self.axis = eps, axis

    def __call__(self, x: jax.Array, *, train: bool | None = None, mask=None) -> jax.Array:
        del train  # batch-independent: accepted only for a uniform call signature
        scale, bias = _get(self.scale), _get(self.bias)
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

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-6,
        use_tau: bool = True,
        learned_eps: bool = False,
        learned_eps_init: float = 1e-4,
        axis: int = -1,
        rngs: nnx.Rngs,
        **affine: Any,
    ):
        super().__init__(num_features, rngs=rngs, **affine)
        self.eps_value, self.axis = eps, axis  # `eps` is the learned param, as in linen
        self.tau = self.channel_param(zeros, rngs) if use_tau else nnx.data(None)
        init = nnx.initializers.constant(learned_eps_init)
        self.eps = self.channel_param(init, rngs) if learned_eps else nnx.data(None)

    def __call__(self, x: jax.Array, *, train: bool | None = None, mask=None) -> jax.Array:
        del train  # batch-independent: accepted only for a uniform call signature
        y = filter_response_norm(
            x,
            _get(self.scale),
            _get(self.bias),
            _get(self.tau),
            eps=self.eps_value,
            learned_eps=_get(self.eps),
            axis=self.axis,
            mask=mask,
        )
        return self.out(y)


class EvoNormS0(_Affine):
    """EvoNorm-S0 (:func:`norms.evonorm_s0`); per-channel ``v`` (init 1); ``train`` ignored."""

    def __init__(
        self,
        num_features: int,
        *,
        num_groups: int = 32,
        eps: float = 1e-5,
        axis: int = -1,
        rngs: nnx.Rngs,
        **affine: Any,
    ):
        super().__init__(num_features, rngs=rngs, **affine)
        self.num_groups, self.eps, self.axis = num_groups, eps, axis
        self.v = self.channel_param(ones, rngs)

    def __call__(self, x: jax.Array, *, train: bool | None = None, mask=None) -> jax.Array:
        del train  # batch-independent: accepted only for a uniform call signature
        scale, bias, v = _get(self.scale), _get(self.bias), _get(self.v)
        g, eps = self.num_groups, self.eps
        y = evonorm_s0(x, scale, bias, v, num_groups=g, eps=eps, axis=self.axis, mask=mask)
        return self.out(y)


class RMSNorm(_Scaled):
    """RMSNorm (:func:`norms.rms_norm`), flax's formula: ``scale`` (C,) only; ``train`` ignored."""

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-6,
        axis: int = -1,
        rngs: nnx.Rngs,
        **scaled: Any,
    ):
        super().__init__(num_features, rngs=rngs, **scaled)
        self.eps, self.axis = eps, axis

    def __call__(self, x: jax.Array, *, train: bool | None = None, mask=None) -> jax.Array:
        del train  # batch-independent: accepted only for a uniform call signature
        y = rms_norm(x, _get(self.scale), axis=self.axis, eps=self.eps, mask=mask)
        return self.out(y)


class _Pointwise(_Affine):
    """DyT's and Derf's ``alpha`` (and ``shift``): scalars, or (C,) if ``per_channel``."""

    def __init__(
        self,
        num_features: int,
        *,
        per_channel: bool = False,
        axis: int = -1,
        rngs: nnx.Rngs,
        **affine: Any,
    ):
        super().__init__(num_features, rngs=rngs, **affine)
        self.per_channel, self.axis = per_channel, axis

    def pre_param(self, value: float, rngs: nnx.Rngs) -> nnx.Param:
        shape = (self.num_features,) if self.per_channel else ()
        return self.channel_param(nnx.initializers.constant(value), rngs, shape)


class DynamicTanh(_Pointwise):
    """DyT (:func:`norms.dynamic_tanh`); ``alpha`` init 0.5; ``train``/``mask`` ignored."""

    def __init__(
        self,
        num_features: int,
        *,
        alpha_init: float = DYT_ALPHA_INIT,
        rngs: nnx.Rngs,
        **fields: Any,
    ):
        super().__init__(num_features, rngs=rngs, **fields)
        self.alpha = self.pre_param(alpha_init, rngs)

    def __call__(self, x: jax.Array, *, train: bool | None = None, mask=None) -> jax.Array:
        del train, mask  # pointwise: no statistics, nothing to mask
        y = dynamic_tanh(x, self.alpha[...], _get(self.scale), _get(self.bias), axis=self.axis)
        return self.out(y)


class Derf(_Pointwise):
    """Derf (:func:`norms.derf`); ``alpha`` (init 0.5), ``shift`` (0); train, mask ignored."""

    def __init__(
        self,
        num_features: int,
        *,
        alpha_init: float = DERF_ALPHA_INIT,
        shift_init: float = DERF_SHIFT_INIT,
        rngs: nnx.Rngs,
        **fields: Any,
    ):
        super().__init__(num_features, rngs=rngs, **fields)
        self.alpha = self.pre_param(alpha_init, rngs)
        self.shift = self.pre_param(shift_init, rngs)

    def __call__(self, x: jax.Array, *, train: bool | None = None, mask=None) -> jax.Array:
        del train, mask  # pointwise: no statistics, nothing to mask
        a, s = self.alpha[...], self.shift[...]
        y = derf(x, a, s, _get(self.scale), _get(self.bias), axis=self.axis)
        return self.out(y)


class Identity(nnx.Module):
    """No normalization (``make("none", C, rngs=...)``); ``train``/``mask`` ignored."""

    def __init__(self, num_features: int, *, rngs: nnx.Rngs):
        del num_features, rngs  # accepted only for a uniform constructor

    def __call__(self, x: jax.Array, *, train: bool | None = None, mask=None) -> jax.Array:
        del train, mask
        return x


def module_fields(cls: type[nnx.Module]) -> tuple[str, ...]:
    """Keyword arguments ``make`` accepts for a class: its and its bases' ``__init__``'s."""
    names: list[str] = []
    for base in cls.__mro__:
        if base is nnx.Module or "__init__" not in vars(base):
            continue
        for p in inspect.signature(base.__init__).parameters.values():
            keyword = p.kind is inspect.Parameter.KEYWORD_ONLY
            if keyword and p.name != "rngs" and p.name not in names:
                names.append(p.name)
    return tuple(names)


def make(name: str, num_features: int, *, rngs: nnx.Rngs, **kwargs: Any) -> nnx.Module:
    """The NNX norm registered as ``name`` (one of :data:`NORM_NAMES`) over ``num_features``.

    ``kwargs`` are the module's fields (``momentum``, ``eps``, ``axis_name``,
    ``use_running_average``, ...); unknown names or fields raise ValueError
    listing the valid ones (the names are shared with :func:`norms.linen.make`).
    """
    cls = resolve(name, globals(), module_fields, kwargs)
    return cls(num_features, rngs=rngs, **kwargs)


__all__ = [
    "NORM_NAMES",
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
