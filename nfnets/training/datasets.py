"""Datasets: the supported sources, loaded into random-access splits (numpy only).

Typical use::

    train = load_dataset("fashion_mnist", split="train", data_dir=config.data_dir)
    images, labels = train.read(np.arange(8))   # uint8 (8, 28, 28, 1), int32 (8,)

Sources: Fashion-MNIST from IDX files (gzipped or not): `data_dir`, else
`/usr/share/datasets/fashion-mnist` (Debian's `dataset-fashion-mnist`), else
TFDS `fashion_mnist` prepared in the default TFDS directory. CIFAR-10 and
ImageNet from TFDS data prepared in `data_dir` (or the default TFDS directory)
with the array_record file format, read through `tfds.data_source`; no
TensorFlow needed (images decoded with PIL). A missing dataset raises
`DatasetNotFoundError` whose message holds the command that prepares it.

IDX files (the MNIST / Fashion-MNIST format) are read and written here with
numpy only. Layout (big-endian): two zero bytes, one dtype byte, one byte with
the number of dimensions `ndim`, then `ndim` uint32 sizes, then the values in C
order. The magic number is the first four bytes read as one big-endian int32,
e.g. 2051 (0x00000803) for 3-d uint8 images and 2049 (0x00000801) for 1-d uint8
labels. Files ending in ``.gz`` are gzip-compressed. No pickle, no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not prepared where we looked; the message says how to prepare it."""


class DataError(ValueError):
    """A data file is corrupt or inconsistent; the message names the file and the fix."""


# How to get a damaged Fashion-MNIST file back (named in every IDX error).
RESTORE_HINT = (
    "restore it: `sudo apt-get install --reinstall dataset-fashion-mnist`, or download it "
    "again from https://github.com/zalandoresearch/fashion-mnist"
)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Static facts about a supported dataset.

    `splits` maps our split names to the TFDS split; `mean`/`std` are per channel
    on the [0, 1] scale; `image_shape` is the native shape (fixed-size datasets)
    or the default output resolution (ImageNet: images vary in size).
    """

    name: str
    tfds_name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    splits: dict[str, str]
    fixed_size: bool


DATASETS: dict[str, DatasetSpec] = {
    # Mean/std: Fashion-MNIST and CIFAR-10 are the training-split pixel statistics;
    # ImageNet uses the customary torchvision constants.
    "fashion_mnist": DatasetSpec(
        "fashion_mnist", "fashion_mnist", 10, (28, 28, 1), (0.2860,), (0.3530,),
        {"train": "train", "test": "test"}, fixed_size=True,
    ),
    "cifar10": DatasetSpec(
        "cifar10", "cifar10", 10, (32, 32, 3), (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616), {"train": "train", "test": "test"}, fixed_size=True,
    ),
    "imagenet2012": DatasetSpec(
        "imagenet2012", "imagenet2012", 1000, (224, 224, 3), (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225), {"train": "train", "test": "validation"}, fixed_size=False,
    ),
}  # fmt: skip
DATASET_NAMES = tuple(DATASETS)


def get_spec(name: str) -> DatasetSpec:
    """The `DatasetSpec` for `name`; unknown names raise a ValueError listing the valid ones."""
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {DATASET_NAMES}.")
    return DATASETS[name]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a loaded split is: sizes, classes, normalization and where it came from.

    `fixed_size`: every image has `image_shape`; otherwise (ImageNet) sizes vary
    and `image_shape` is the default output resolution after cropping.
    """

    name: str
    split: str
    num_examples: int
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    fixed_size: bool = True


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """A split held in memory: `images` uint8 (N, H, W, C), `labels` int32 (N,)."""

    images: np.ndarray
    labels: np.ndarray
    info: DatasetInfo

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 (N, H, W, C), got {self.images.dtype} {self.images.shape}."
            )
        if self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"{len(self.images)} images but labels of shape {self.labels.shape}.")

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images (B, H, W, C) and int32 labels (B,) at `indices`."""
        return self.images[indices], self.labels[indices]


@dataclasses.dataclass(frozen=True)
class SourceDataset:
    """A TFDS random-access source (array_record) decoded per example with PIL.

    `read` returns uint8 images, stacked (B, H, W, C) when `info.fixed_size`, else a
    list of (h_i, w_i, C) arrays, and int32 labels (B,). One JPEG decode per
    example in the calling process: training spreads this over grain worker
    processes (`nfnets.training.grain_pipeline`); evaluation reads it in-process.
    """

    source: Any
    info: DatasetInfo

    def __len__(self) -> int:
        return len(self.source)

    def read(self, indices: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        records = self.source.__getitems__([int(i) for i in indices])
        images = [np.asarray(r["image"], np.uint8) for r in records]
        if self.info.fixed_size:
            images = np.stack(images).reshape((-1, *self.info.image_shape))
        return images, np.asarray([r["label"] for r in records], np.int32)


Dataset = ArrayDataset | SourceDataset

# The validation split is the same for every run whatever ``config.seed`` is, so that
# every arm and every seed of an experiment is chosen on the same held-out images.
VALIDATION_SEED = 20_260_601


@dataclasses.dataclass(frozen=True)
class _IndexedSource:
    """A random-access source restricted to ``indices`` (picklable for grain workers)."""

    source: Any
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.source[int(self.indices[i])]

    def __getitems__(self, ids):
        return self.source.__getitems__([int(self.indices[i]) for i in ids])


def split_validation(
    dataset: Dataset, num_examples: int, *, seed: int = VALIDATION_SEED
) -> tuple[Dataset, Dataset | None]:
    """``(train, validation)``: ``num_examples`` examples of a training split held out.

    The held-out examples are a fixed random subset (``seed``, independent of the
    run's seed), so every run with the same ``num_examples`` trains on the same
    ``len(dataset) - num_examples`` examples and is chosen on the same validation
    set. Both parts keep the original order of their examples. ``num_examples=0``
    returns ``(dataset, None)``. Raises ``ValueError`` when ``num_examples`` is not
    in ``[0, len(dataset))``.
    """
    n = len(dataset)
    if not isinstance(num_examples, int | np.integer) or not 0 <= num_examples < n:
        raise ValueError(
            f"validation_examples={num_examples!r}: give 0 (no validation split) or an "
            f"integer below the {n} training examples, e.g. 5000"
        )
    if num_examples == 0:
        return dataset, None
    held_out = np.zeros(n, bool)
    held_out[np.random.default_rng(seed).permutation(n)[:num_examples]] = True
    parts = []
    for name, indices in (
        ("train", np.flatnonzero(~held_out)),
        ("validation", np.flatnonzero(held_out)),
    ):
        info = dataclasses.replace(dataset.info, split=name, num_examples=len(indices))
        if isinstance(dataset, ArrayDataset):
            parts.append(ArrayDataset(dataset.images[indices], dataset.labels[indices], info))
        else:
            parts.append(SourceDataset(_IndexedSource(dataset.source, indices), info))
    return parts[0], parts[1]


# --------------------------------------------------------------------------- loading


def load_dataset(
    name: str,
    *,
    split: str,
    data_dir: str | os.PathLike | None = None,
    in_memory: bool | None = None,
) -> Dataset:
    """Load split "train" or "test" of `name` in `DATASET_NAMES`.

    "test" is ImageNet's labelled "validation" split. For the TFDS datasets any
    other TFDS split string (e.g. "train[:1000]") is passed through.

    Fashion-MNIST: the four IDX files (`*-idx?-ubyte` or `.gz`) in `data_dir` (or
    its `fashion-mnist/` subfolder); without `data_dir`,
    `/usr/share/datasets/fashion-mnist`, else TFDS `fashion_mnist` in the default
    TFDS directory. CIFAR-10 / ImageNet: TFDS array_record data in `data_dir`
    (default: `$TFDS_DATA_DIR` or `~/tensorflow_datasets`).

    `in_memory` (TFDS datasets): decode the whole split once into an
    `ArrayDataset` (default True for fixed-size images, False for ImageNet).
    `data_dir` None or "" means the default place. Raises `DatasetNotFoundError`
    with the command that prepares missing data.
    """
    spec = get_spec(name)
    data_dir = data_dir or None  # "" (a config's "unset") means the default place
    if name == "fashion_mnist":
        if split not in FASHION_MNIST_FILES:
            raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}.")
        idx_dir = _find_fashion_mnist_idx(data_dir)
        if idx_dir is not None:
            return _load_fashion_mnist_idx(idx_dir, split)
    return _load_tfds(spec, split, data_dir, spec.fixed_size if in_memory is None else in_memory)


def _idx_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _has_fashion_mnist(directory: Path) -> bool:
    stems = [s for pair in FASHION_MNIST_FILES.values() for s in pair]
    return all(_idx_file(directory, s) is not None for s in stems)


def _find_fashion_mnist_idx(data_dir) -> Path | None:
    if data_dir is not None:
        data_dir = Path(data_dir).expanduser()
        candidates = [data_dir, data_dir / "fashion-mnist", data_dir / "fashion_mnist"]
    else:
        candidates = [FASHION_MNIST_SYSTEM_DIR]
    found = next((d for d in candidates if _has_fashion_mnist(d)), None)
    if found is None:
        _raise_if_partial(candidates)
    return found


def _raise_if_partial(directories: list[Path]) -> None:
    """A folder holding some but not all of the four IDX files: name the missing ones."""
    stems = [s for pair in FASHION_MNIST_FILES.values() for s in pair]
    for d in directories:
        missing = [s for s in stems if _idx_file(d, s) is None]
        if 0 < len(missing) < len(stems):
            raise DatasetNotFoundError(
                f"{d} holds only some Fashion-MNIST IDX files; missing: "
                f"{', '.join(f'{m}.gz' for m in missing)} (or without .gz). Copy them there "
                f"from the same download, or {RESTORE_HINT}."
            )


def _load_fashion_mnist_idx(directory: Path, split: str) -> ArrayDataset:
    spec = DATASETS["fashion_mnist"]
    image_stem, label_stem = FASHION_MNIST_FILES[split]
    image_path, label_path = _idx_file(directory, image_stem), _idx_file(directory, label_stem)
    images = read_idx(image_path, expected_magic=idx_magic(np.uint8, 3))
    labels = read_idx(label_path, expected_magic=idx_magic(np.uint8, 1))
    if images.shape[1:] != spec.image_shape[:2]:
        raise DataError(f"{image_path}: images of shape {images.shape[1:]}, expected (28, 28).")
    if len(images) != len(labels):
        raise DataError(
            f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels."
        )
    if len(labels) and labels.max() >= spec.num_classes:
        raise DataError(f"{label_path}: label {labels.max()} >= {spec.num_classes} classes.")
    return ArrayDataset(
        images[..., None], labels.astype(np.int32), _info(spec, split, len(labels), str(directory))
    )


def _info(spec: DatasetSpec, split: str, n: int, source: str) -> DatasetInfo:
    return DatasetInfo(
        spec.name,
        split,
        n,
        spec.num_classes,
        spec.image_shape,
        spec.mean,
        spec.std,
        source,
        spec.fixed_size,
    )


def _prepare_hint(spec: DatasetSpec, data_dir, default_tfds_dir: str) -> str:
    target = data_dir if data_dir is not None else default_tfds_dir
    build = f"tfds build {spec.tfds_name} --data_dir {target} --file_format array_record"
    if spec.name == "fashion_mnist":
        searched = FASHION_MNIST_SYSTEM_DIR if data_dir is None else data_dir
        return (
            f"Fashion-MNIST IDX files not found in {searched} (nor TFDS data in {target}). "
            "Install them with `sudo apt-get install dataset-fashion-mnist` (puts them in "
            f"{FASHION_MNIST_SYSTEM_DIR}) or `make data`, or pass --config.data_dir=DIR with "
            "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
            "t10k-labels-idx1-ubyte.gz (https://github.com/zalandoresearch/fashion-mnist), "
            f"or prepare TFDS: `{build}`."
        )
    manual = ""
    if spec.name == "imagenet2012":
        manual = (
            " ImageNet needs the ILSVRC2012 tar files placed by hand first in "
            f"{target}/downloads/manual (see the TFDS imagenet2012 page)."
        )
    return (
        f"{spec.name} is not prepared in {target}. Prepare it with `{build}` "
        f"(needs TensorFlow only while building), then pass --config.data_dir={target}."
        f"{manual}"
    )


def _load_tfds(spec: DatasetSpec, split: str, data_dir, in_memory: bool) -> Dataset:
    import tensorflow_datasets as tfds

    tfds_split = spec.splits.get(split, split)
    directory = None if data_dir is None else os.fspath(Path(data_dir).expanduser())
    builder = tfds.builder(spec.tfds_name, data_dir=directory)
    default_dir = tfds.core.constants.DATA_DIR
    if not builder.is_prepared():
        raise DatasetNotFoundError(_prepare_hint(spec, data_dir, default_dir))
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    if file_format != "array_record":
        raise DatasetNotFoundError(
            f"{spec.name} in {builder.data_dir} uses file format {file_format!r}; random access "
            f"without TensorFlow needs array_record. {_prepare_hint(spec, data_dir, default_dir)}"
        )
    source = tfds.data_source(spec.tfds_name, split=tfds_split, data_dir=directory, download=False)
    info = _info(spec, split, len(source), f"tfds:{builder.data_dir}")
    if not in_memory:
        return SourceDataset(source, info)
    if not spec.fixed_size:
        raise ValueError(f"{spec.name} images vary in size; load it with in_memory=False.")
    records = source.__getitems__(list(range(len(source))))
    images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
    labels = np.asarray([r["label"] for r in records], np.int32)
    return ArrayDataset(images.reshape((-1, *spec.image_shape)), labels, info)


# ---------------------------------------------------------------------- IDX files

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
    header exactly. Every failure raises `DataError` (a ValueError) naming the file;
    an unreadable file (e.g. corrupt gzip data) also says how to restore it.
    """
    path = Path(path)
    try:
        with _open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(
            f"{path}: cannot read IDX file ({e}); the file is damaged, {RESTORE_HINT}."
        ) from None
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes is too short for an IDX header (4 bytes).")
    magic = int.from_bytes(raw[:4], "big")
    zeros, code, ndim = raw[:2], raw[2], raw[3]
    if zeros != b"\x00\x00" or code not in IDX_DTYPES or ndim == 0:
        raise DataError(
            f"{path}: bad IDX magic number {magic} (0x{magic:08x}); expected two zero bytes, a "
            f"dtype byte in {[hex(c) for c in IDX_DTYPES]} and ndim >= 1. Not an IDX file, or "
            "a gzipped file without the .gz suffix."
        )
    if expected_magic is not None and magic != expected_magic:
        raise DataError(
            f"{path}: IDX magic number {magic} (0x{magic:08x}), expected {expected_magic} "
            f"(0x{expected_magic:08x}); wrong file (images vs labels?)."
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} of {header} bytes).")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header
    if found != expected:
        raise DataError(
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
