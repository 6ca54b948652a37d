"""IDX files (the MNIST / Fashion-MNIST format) read and written with numpy only.

Layout (big-endian): two zero bytes, one dtype byte, one byte with the number of
dimensions `ndim`, then `ndim` uint32 sizes, then the values in C order. The
magic number is the first four bytes read as one big-endian int32, e.g. 2051
(0x00000803) for 3-d uint8 images and 2049 (0x00000801) for 1-d uint8 labels.
Files ending in ``.gz`` are gzip-compressed. No pickle, no TensorFlow.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

# IDX dtype byte -> big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dtype.newbyteorder("="): code for code, dtype in IDX_DTYPES.items()}


def idx_magic(dtype: np.dtype | type, ndim: int) -> int:
    """The IDX magic number for arrays of `dtype` with `ndim` dimensions (uint8, 3 -> 2051)."""
    return _dtype_code(np.dtype(dtype)) * 256 + ndim


def _dtype_code(dtype: np.dtype) -> int:
    code = _CODES.get(dtype.newbyteorder("="))
    if code is None:
        names = sorted(str(d) for d in _CODES)
        raise ValueError(f"IDX cannot store dtype {dtype}; use one of {names}.")
    return code


def _open(path: Path, mode: str):
    return gzip.open(path, mode) if path.suffix == ".gz" else open(path, mode)


def read_idx(path: str | os.PathLike, *, expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (gzipped when the name ends in ``.gz``) into a native-endian array.

    Validates the header (two zero bytes, a known dtype byte, at least one
    dimension), `expected_magic` when given, and that the data size matches the
    header exactly. Every failure raises `ValueError` naming the file.
    """
    path = Path(path)
    try:
        with _open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot read IDX file ({e}).") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: {len(raw)} bytes is too short for an IDX header (4 bytes).")
    magic = int.from_bytes(raw[:4], "big")
    zeros, code, ndim = raw[:2], raw[2], raw[3]
    if zeros != b"\x00\x00" or code not in IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path}: bad IDX magic number {magic} (0x{magic:08x}); expected two zero bytes, a "
            f"dtype byte in {[hex(c) for c in IDX_DTYPES]} and ndim >= 1. Not an IDX file, or "
            "a gzipped file without the .gz suffix."
        )
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(
            f"{path}: IDX magic number {magic} (0x{magic:08x}), expected {expected_magic} "
            f"(0x{expected_magic:08x}); wrong file (images vs labels?)."
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} of {header} bytes).")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header
    if found != expected:
        raise ValueError(
            f"{path}: IDX header says shape {shape} of {dtype.newbyteorder('=')} "
            f"({expected} data bytes) but the file holds {found} data bytes "
            f"({'truncated' if found < expected else 'trailing bytes'})."
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write `array` as an IDX file (gzip-compressed when `path` ends in ``.gz``); returns the path.

    Supported dtypes: uint8, int8, int16, int32, float32, float64; 1 to 255 dims.
    """
    path = Path(path)
    array = np.asarray(array)
    code = _dtype_code(array.dtype)
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"IDX needs 1 to 255 dimensions, got shape {array.shape}.")
    header = bytes([0, 0, code, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    data = np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _open(path, "wb") as f:
        f.write(header + data)
    return path
