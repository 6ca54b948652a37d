"""The trainer's two data-parallel paths: ``jax.pmap`` and ``jax.jit(jax.shard_map(...))``.

``config.parallelism`` picks one; both run the same per-device functions (the
train step, the eval step, SyncBN merges) with the same axis name ``"batch"``, so
``lax.psum`` / ``all_gather`` / ``axis_index_groups`` inside them mean the same
thing and the two paths compute the same numbers.

Every argument and result of a mapped function has a *kind* (a string, given per
argument as a pytree prefix):

- ``REPLICATED``: the same value on every device (parameters, optimizer state,
  metric sums, the base rng key);
- ``PER_DEVICE``: one value per device that may differ between devices (running
  batch statistics: with ``sync_batch_stats`` "none" or "groups" they do);
- ``BATCH``: a global batch split over the devices along its first axis.

Layouts on the devices:

- :class:`Pmap`: every non-batch leaf has a leading local-device axis (one copy per
  device), batches are ``(local devices, B / D, ...)``; the arrays are placed with
  the ``NamedSharding`` pmap's own outputs have, so a step never reshards.
- :class:`ShardMap`: global ``jax.Array``\\ s on ``Mesh(jax.devices(), ("batch",))``.
  ``REPLICATED`` leaves have their host shape and ``NamedSharding(mesh, P())``;
  ``PER_DEVICE`` leaves get a leading axis of length ``jax.device_count()``
  sharded over ``"batch"`` (each device holds exactly its own copy, as under
  pmap); batches are ``(B, ...)`` sharded over ``"batch"``, built from each
  process's rows with ``jax.make_array_from_process_local_data``.

shard_map runs with ``check_vma=False``, i.e. with pmap's collective semantics
(JAX's own pmap is ``jit(shard_map(..., check_vma=False))``). With the checker on,
``lax.psum(..., axis_index_groups=...)`` raises NotImplementedError (JAX 0.10),
which would rule out SyncBN groups with the constant-size psum merge, and the
gradient of a replicated parameter would already be summed over devices (an
implicit psum in the transpose), so the step body would differ from pmap's. The
replicated results are equal on every device by construction (gradients, loss and
the finite flag are ``pmean``/``pmin``-ed before use); what may differ, the batch
statistics, is ``PER_DEVICE``. tests/nfnets/training/test_parallel.py checks the
two paths against each other.

Reading back (``host``): the first local device's copy, via
``x.addressable_data(0)``. Indexing a mapped array (``x[0]``) would run a
gather computation across the devices instead (see JAX's "Migrating to the new
jax.pmap" guide).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nfnets.training.pipeline import shard_for_pmap

PyTree = Any
REPLICATED, PER_DEVICE, BATCH = "replicated", "per_device", "batch"
KINDS = (REPLICATED, PER_DEVICE, BATCH)
PARALLELISMS = ("pmap", "shard_map")


def state_kinds(state_cls: type) -> PyTree:
    """Kinds of a ``TrainState`` (the class): ``batch_stats`` PER_DEVICE, the rest REPLICATED."""
    kinds = {f.name: REPLICATED for f in dataclasses.fields(state_cls)}
    return state_cls(**{**kinds, "batch_stats": PER_DEVICE})


def variable_kinds(variables: dict) -> dict:
    """Kinds of model variables ``{"params": ..., "batch_stats": ...}``."""
    return {k: PER_DEVICE if k == "batch_stats" else REPLICATED for k in variables}


def _by_kind(kinds: PyTree, tree: PyTree, fn: Callable[[str, Any], Any]) -> PyTree:
    """``fn(kind, leaf)`` for every leaf of ``tree``; ``kinds`` is a prefix of ``tree``."""

    def sub(kind, subtree):
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; use one of {KINDS}")
        return jax.tree.map(lambda x: fn(kind, x), subtree)

    return jax.tree.map(sub, kinds, tree)


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _host_copy(x) -> np.ndarray:
    """The first addressable shard of ``x`` as numpy (no cross-device computation)."""
    if isinstance(x, jax.Array):
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


class Pmap:
    """``jax.pmap`` over this process's devices (the axis spans all processes' devices)."""

    name = "pmap"

    def __init__(self, axis_name: str = "batch"):
        self.axis_name = axis_name
        self.num_local = jax.local_device_count()
        self._stacked = NamedSharding(Mesh(np.asarray(jax.local_devices()), ("d",)), P("d"))

    def map(
        self,
        fn: Callable,
        in_kinds: Sequence[PyTree],
        out_kinds: PyTree,
        donate_argnums: tuple[int, ...] = (),
    ) -> Callable:
        """``jax.pmap(fn)``: every argument and result has the local-device axis.

        Replicated arguments are placed once (``put``) rather than broadcast by
        ``in_axes=None``, which would send them to every device at every call.
        """
        del in_kinds, out_kinds
        return jax.pmap(fn, axis_name=self.axis_name, donate_argnums=donate_argnums)

    def put(self, tree: PyTree, kinds: PyTree) -> PyTree:
        """Host pytree -> device layout (BATCH: this process's rows, split over its devices)."""

        def place(kind, x):
            if kind == BATCH:
                return jax.device_put(shard_for_pmap({"x": x}, self.num_local)["x"], self._stacked)
            if _is_key(x):
                return jax.device_put(
                    jnp.broadcast_to(x, (self.num_local, *x.shape)), self._stacked
                )
            # A host view with stride 0: each device receives its copy straight from
            # the host, no device ever holds all of them.
            x = np.asarray(x)
            return jax.device_put(np.broadcast_to(x, (self.num_local, *x.shape)), self._stacked)

        return _by_kind(kinds, tree, place)

    def host(self, tree: PyTree, kinds: PyTree) -> PyTree:
        """The first local device's copy of every leaf, as numpy."""
        return _by_kind(kinds, tree, lambda k, x: _host_copy(x)[0])


class ShardMap:
    """``jax.jit(jax.shard_map(fn, mesh=Mesh(jax.devices(), (axis_name,))))`` over global arrays."""

    name = "shard_map"

    def __init__(self, axis_name: str = "batch"):
        self.axis_name = axis_name
        self.mesh = Mesh(np.asarray(jax.devices()), (axis_name,))
        self.num_devices = self.mesh.size
        self._specs = {
            REPLICATED: P(),
            PER_DEVICE: P(axis_name),
            BATCH: P(axis_name),
        }

    def sharding(self, kind: str) -> NamedSharding:
        return NamedSharding(self.mesh, self._specs[kind])

    def map(
        self,
        fn: Callable,
        in_kinds: Sequence[PyTree],
        out_kinds: PyTree,
        donate_argnums: tuple[int, ...] = (),
    ) -> Callable:
        """``jit(shard_map(fn))``; PER_DEVICE blocks ``(1, ...)`` are squeezed around ``fn``."""
        squeeze = lambda k, x: x[0] if k == PER_DEVICE else x
        expand = lambda k, x: x[None] if k == PER_DEVICE else x

        def body(*args):
            args = tuple(_by_kind(k, a, squeeze) for k, a in zip(in_kinds, args, strict=True))
            return _by_kind(out_kinds, fn(*args), expand)

        spec = lambda kinds: jax.tree.map(lambda k: self._specs[k], kinds)
        mapped = jax.shard_map(
            body,
            mesh=self.mesh,
            in_specs=tuple(spec(k) for k in in_kinds),
            out_specs=spec(out_kinds),
            check_vma=False,
        )
        return jax.jit(mapped, donate_argnums=donate_argnums)

    def put(self, tree: PyTree, kinds: PyTree) -> PyTree:
        """Host pytree (the same on every process; BATCH: this process's rows) -> global arrays."""

        def place(kind, x):
            sharding = self.sharding(kind)
            if kind == BATCH:
                return jax.make_array_from_process_local_data(sharding, np.asarray(x))
            if _is_key(x):
                data = place(kind, np.asarray(jax.random.key_data(x)))
                return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
            x = np.asarray(x)
            if kind == PER_DEVICE:
                x = np.broadcast_to(x, (self.num_devices, *x.shape))
            return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

        return _by_kind(kinds, tree, place)

    def host(self, tree: PyTree, kinds: PyTree) -> PyTree:
        """The first local device's copy of every leaf, as numpy."""
        first = lambda k, x: _host_copy(x)[0] if k == PER_DEVICE else _host_copy(x)
        return _by_kind(kinds, tree, first)


def make_parallel(name: str, axis_name: str = "batch") -> Pmap | ShardMap:
    """The path ``config.parallelism`` names: "pmap" or "shard_map"."""
    if name == "pmap":
        return Pmap(axis_name)
    if name == "shard_map":
        return ShardMap(axis_name)
    raise ValueError(f"parallelism {name!r}: use one of {PARALLELISMS}")


def pack_metric_sums(sums: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(float32 vector of the sums in sorted key order, zeroed sums)``, inside the map.

    One small array leaves the device at a log step; the counts are exact in
    float32 below 2**24 steps per log window.
    """
    keys = sorted(sums)
    packed = jnp.stack([sums[k].astype(jnp.float32) for k in keys])
    return packed, jax.tree.map(jnp.zeros_like, sums)


def unpack_metric_sums(packed: np.ndarray, template: dict) -> dict[str, float]:
    """Host dict of the values ``pack_metric_sums`` packed (same sorted key order)."""
    return {k: float(v) for k, v in zip(sorted(template), np.asarray(packed), strict=True)}
