"""A restricted unpickler for pickled dicts of numpy arrays (DeepMind's weight files).

In the spirit of ``torch.load(weights_only=True)`` and the "Restricting Globals"
recipe of the Python ``pickle`` docs: ``find_class`` is the only way a pickle can
name a callable, and here it admits only

* plain containers and numbers (``dict``, ``list``, ``tuple``, ``str``, ``bytes``,
  ``int``, ``float``, ``bool``, ``None`` need no global; ``set``, ``frozenset``,
  ``bytearray``, ``complex`` and ``collections.OrderedDict`` are admitted by name);
* numpy's array and scalar reconstruction (``ndarray``, ``dtype``,
  ``multiarray._reconstruct``, ``multiarray.scalar``, ``numeric._frombuffer``,
  under both ``numpy.core`` and ``numpy._core``);
* ``_codecs.encode(text, "latin1")``, which protocol-2 pickles use for bytes.

Any other global is refused when the pickle names it, so it is never called:
nothing in the file beyond the admitted constructors is executed. Arrays of
dtype ``object`` are refused after loading (their elements went through the same
restrictions). Persistent ids are refused.
"""

from __future__ import annotations

import _codecs
import collections
import io
import pickle
from typing import Any

import numpy as np

try:  # numpy >= 2 moved numpy.core to numpy._core; pickles name either
    from numpy._core import multiarray, numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray, numeric


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside the allowlist (nothing was executed)."""


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    if encoding != "latin1":
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r} is not admitted")
    return _codecs.encode(text, "latin1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = multiarray._reconstruct
    _ALLOWED[(f"{_core}.multiarray", "scalar")] = multiarray.scalar
    _ALLOWED[(f"{_core}.numeric", "_frombuffer")] = numeric._frombuffer


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refused global {module}.{name}: only numpy arrays and plain containers "
                "are admitted (nothing was executed)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refused a persistent id: only in-band data is admitted")


def _check_no_objects(tree: Any) -> None:
    if isinstance(tree, dict):
        for value in tree.values():
            _check_no_objects(value)
    elif isinstance(tree, list | tuple):
        for value in tree:
            _check_no_objects(value)
    elif isinstance(tree, np.ndarray) and tree.dtype.hasobject:
        raise UnsafePickleError("refused an array of dtype object: only numeric arrays")


def safe_load(data: bytes) -> Any:
    """Unpickles ``data`` admitting only plain containers and numpy arrays (see module doc).

    Raises :class:`UnsafePickleError` naming the first refused global.
    """
    tree = _RestrictedUnpickler(io.BytesIO(data)).load()
    _check_no_objects(tree)
    return tree
