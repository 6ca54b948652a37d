"""Datasets and deterministic, resumable, per-process batch iterators (numpy only).

Typical use::

    train = load_dataset("fashion_mnist", split="train", data_dir=config.data_dir)
    test = load_dataset("fashion_mnist", split="test", data_dir=config.data_dir)
    batches = train_iterator(train, global_batch_size=256, seed=0, start_step=step,
                             process_index=jax.process_index(),
                             process_count=jax.process_count(),
                             augment=default_augment("fashion_mnist"))
    for step, batch in zip(range(step, num_steps), batches):
        batch = shard_for_pmap(batch, jax.local_device_count())  # (D, B/D, ...)

Batches are dicts of numpy arrays: ``"image"`` float32 (N, H, W, C) normalized
as `(x / 255 - mean) / std` with the per-dataset mean/std in `DATASETS`;
``"label"`` int32 (N,); with MixUp/CutMix also ``"label_probs"`` float32
(N, num_classes) whose rows sum to 1 (train on it; "label" is then the
unmixed label of each example's own image, for accuracy only); eval batches
add ``"mask"`` bool (N,), True for real examples, False for padding.

Sources: Fashion-MNIST from IDX files (gzipped or not): `data_dir`, else
`/usr/share/datasets/fashion-mnist` (Debian's `dataset-fashion-mnist`), else
TFDS `fashion_mnist` prepared in the default TFDS directory. CIFAR-10 and
ImageNet from TFDS data prepared in `data_dir` (or the default TFDS directory)
with the array_record file format, read through `tfds.data_source`; no
TensorFlow needed (images decoded with PIL). A missing dataset raises
`DatasetNotFoundError` whose message holds the command that prepares it.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from nfnets import augment as aug
from nfnets.idx import idx_magic, read_idx, write_idx

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Seed-sequence domains so the shuffle and the augmentation never share a stream.
_SHUFFLE, _AUGMENT = 0, 1


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not prepared where we looked; the message says how to prepare it."""


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
    list of (h_i, w_i, C) arrays, and int32 labels (B,). Slow on CPU (one JPEG
    decode + resize per example in Python): fine for evaluation and small runs,
    not a fast ImageNet input pipeline.
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
    return next((d for d in candidates if _has_fashion_mnist(d)), None)


def _load_fashion_mnist_idx(directory: Path, split: str) -> ArrayDataset:
    spec = DATASETS["fashion_mnist"]
    image_stem, label_stem = FASHION_MNIST_FILES[split]
    image_path, label_path = _idx_file(directory, image_stem), _idx_file(directory, label_stem)
    images = read_idx(image_path, expected_magic=idx_magic(np.uint8, 3))
    labels = read_idx(label_path, expected_magic=idx_magic(np.uint8, 1))
    if images.shape[1:] != spec.image_shape[:2]:
        raise ValueError(f"{image_path}: images of shape {images.shape[1:]}, expected (28, 28).")
    if len(images) != len(labels):
        raise ValueError(
            f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels."
        )
    if len(labels) and labels.max() >= spec.num_classes:
        raise ValueError(f"{label_path}: label {labels.max()} >= {spec.num_classes} classes.")
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


# ---------------------------------------------------------------------- fake data


def write_fake_fashion_mnist(
    directory: str | os.PathLike,
    n_train: int = 64,
    n_test: int = 32,
    seed: int = 0,
    *,
    gzip: bool = True,
) -> Path:
    """Write the four Fashion-MNIST IDX files with random uint8 images and labels in [0, 10).

    For tests: `load_dataset("fashion_mnist", split=..., data_dir=directory)` reads
    them. Images are class-dependent (mean brightness grows with the label) so a
    tiny model can learn something. Returns `directory`.
    """
    directory = Path(directory)
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gzip else ""
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        noise = rng.integers(0, 128, (n, 28, 28))
        images = np.clip(noise + 12 * labels[:, None, None], 0, 255).astype(np.uint8)
        image_stem, label_stem = FASHION_MNIST_FILES[split]
        write_idx(directory / f"{image_stem}{suffix}", images)
        write_idx(directory / f"{label_stem}{suffix}", labels)
    return directory


# -------------------------------------------------------------------- iteration


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training augmentation; every field off gives plain normalized images.

    - `crop_padding`: pad-and-random-crop by this many pixels per side (0 = off;
      4 is the CIFAR convention for 32x32, 2 for 28x28). Fixed-size datasets.
    - `flip`: random horizontal flip with probability 1/2.
    - `inception_crop`: random-resized crop (area 8-100%, aspect 3/4-4/3) to the
      output size, for variable-size (ImageNet) images; otherwise those get the
      eval center crop.
    - `mixup_alpha`, `cutmix_alpha`: Beta(alpha, alpha) mixing with the local
      batch reversed; one lam per batch; both > 0 picks CutMix with probability
      `switch_prob` per batch. Adds "label_probs" to the batch.
    """

    crop_padding: int = 0
    flip: bool = False
    inception_crop: bool = False
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    switch_prob: float = 0.5

    def __post_init__(self):
        if self.crop_padding < 0 or self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError(f"crop_padding and alphas must be >= 0, got {self}.")
        if not 0 <= self.switch_prob <= 1:
            raise ValueError(f"switch_prob must lie in [0, 1], got {self.switch_prob}.")

    @property
    def mixing(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def default_augment(name: str, *, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0) -> Augment:
    """Standard augmentation: crop (pad 2 at 28x28, 4 at 32x32) + flip; Inception crop + flip."""
    spec = get_spec(name)
    if not spec.fixed_size:
        return Augment(
            flip=True, inception_crop=True, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha
        )
    return Augment(
        crop_padding=2 if spec.image_shape[0] <= 28 else 4,
        flip=True,
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
    )


def _output_shape(dataset: Dataset, image_size: int | None) -> tuple[int, int, int]:
    """(H, W, C) of the batches: native for fixed-size data, `image_size` squares otherwise."""
    shape = dataset.info.image_shape
    if dataset.info.fixed_size:
        if image_size not in (None, shape[0]):
            raise ValueError(
                f"{dataset.info.name} images are {shape[:2]}; image_size {image_size} is only "
                "for variable-size (ImageNet) data. Leave it unset."
            )
        return shape
    size = image_size or shape[0]
    return (size, size, shape[2])


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Training steps per epoch: full batches only (the last partial batch is dropped)."""
    return num_examples // global_batch_size


def _check_batching(global_batch_size: int, process_index: int, process_count: int) -> int:
    if not isinstance(global_batch_size, int | np.integer) or global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be a positive int, got {global_batch_size!r}.")
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index {process_index} must lie in [0, process_count {process_count})."
        )
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by process_count "
            f"{process_count}; use a multiple of {process_count}."
        )
    return global_batch_size // process_count


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of `epoch`: a permutation of range(N) fixed by (seed, epoch)."""
    return np.random.default_rng([seed, _SHUFFLE, epoch]).permutation(num_examples)


def train_iterator(
    dataset: Dataset,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    num_steps: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    augment: Augment | None = None,
    image_size: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield this process's part of the global training batch for steps start_step, ...

    Step s is epoch `s // steps_per_epoch`; each epoch visits the examples in
    `epoch_permutation(N, seed, epoch)` order in full global batches (the last
    partial batch is dropped). Process p takes rows [p * B/P, (p + 1) * B/P) of
    the global batch. Augmentation parameters come from a generator seeded with
    (seed, step), drawn for the whole global batch and then sliced, so the
    iterator's only state is the step: starting at `start_step` yields exactly
    what an uninterrupted iterator yields from that step on. Stops before
    `num_steps` (global step count) if given, else runs forever.

    Yields {"image": float32 (B/P, H, W, C), "label": int32 (B/P,)} plus
    "label_probs" float32 (B/P, num_classes) when `augment.mixing`.
    `image_size` sets the output resolution of variable-size datasets (default
    `info.image_shape[0]`).
    """
    local = _check_batching(global_batch_size, process_index, process_count)
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}.")
    n = len(dataset)
    per_epoch = steps_per_epoch(n, global_batch_size)
    if per_epoch == 0:
        raise ValueError(
            f"global_batch_size {global_batch_size} exceeds the {n} training examples of "
            f"{dataset.info.name}; use a batch size <= {n}."
        )
    augment = augment or Augment()
    size = _output_shape(dataset, image_size)[0]
    lo = process_index * local
    epoch, order = -1, None
    step = start_step
    while num_steps is None or step < num_steps:
        if step // per_epoch != epoch:
            epoch = step // per_epoch
            order = epoch_permutation(n, seed, epoch)
        offset = (step % per_epoch) * global_batch_size
        indices = order[offset + lo : offset + lo + local]
        rng = np.random.default_rng([seed, _AUGMENT, step])
        yield _train_batch(dataset, indices, rng, augment, global_batch_size, lo, size)
        step += 1


def _train_batch(dataset, indices, rng, augment: Augment, global_batch, lo, size):
    info = dataset.info
    local = len(indices)
    sl = slice(lo, lo + local)
    images, labels = dataset.read(indices)
    # Random parameters for the whole global batch, then this process's rows.
    flips = (rng.random(global_batch) < 0.5)[sl] if augment.flip else np.zeros(local, bool)
    if isinstance(images, np.ndarray):
        p = augment.crop_padding
        if p or augment.flip:
            oy, ox = rng.integers(0, 2 * p + 1, (2, global_batch))[:, sl]
            images = aug.crop_flip(images, oy, ox, flips, padding=p)
    else:
        uniforms = rng.random((global_batch, 10, 4))[sl]
        boxes = [
            aug.inception_crop_box(*im.shape[:2], u)
            if augment.inception_crop
            else aug.center_crop_box(*im.shape[:2], size)
            for im, u in zip(images, uniforms, strict=True)
        ]
        images = np.stack(
            [aug.crop_resize(im, b, size) for im, b in zip(images, boxes, strict=True)]
        )
        if augment.flip:
            images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
    batch = {"image": aug.normalize(images, info.mean, info.std), "label": labels}
    if augment.mixing:
        batch["image"], batch["label_probs"] = _mix(
            batch["image"], labels, info.num_classes, rng, augment
        )
    return batch


def _mix(images, labels, num_classes, rng, augment: Augment):
    probs = aug.one_hot(labels, num_classes)
    use_cutmix = augment.cutmix_alpha > 0 and (
        augment.mixup_alpha <= 0 or rng.random() < augment.switch_prob
    )
    if use_cutmix:
        lam = rng.beta(augment.cutmix_alpha, augment.cutmix_alpha)
        u_y, u_x = rng.random(2)
        box = aug.cutmix_box(*images.shape[1:3], lam, u_y, u_x)
        images, probs, _ = aug.cutmix(images, probs, box)
        return images, probs
    lam = rng.beta(augment.mixup_alpha, augment.mixup_alpha)
    return aug.mixup(images, probs, lam)


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
    """Eval batches needed to cover `num_examples` once: ceil(N / global_batch_size)."""
    return -(-num_examples // global_batch_size)


def eval_iterator(
    dataset: Dataset,
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    image_size: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield the split once, in order, padded so every batch has B/P rows on every process.

    Global batch k holds examples [k * B, (k + 1) * B); process p takes rows
    [p * B/P, (p + 1) * B/P) of it, so processes get disjoint parts and all of
    them yield `num_eval_batches(N, B)` batches. Rows past the end of the split
    are padding: image zeros, label 0, "mask" False. Sum metrics over
    `mask` (never divide by the batch size) to count each example exactly once.

    Yields {"image": float32 (B/P, H, W, C), "label": int32 (B/P,), "mask": bool
    (B/P,)}; variable-size images get the center crop to `image_size`.
    """
    local = _check_batching(global_batch_size, process_index, process_count)
    n = len(dataset)
    info = dataset.info
    image_shape = _output_shape(dataset, image_size)
    size = image_shape[0]
    for k in range(num_eval_batches(n, global_batch_size)):
        start = k * global_batch_size + process_index * local
        indices = np.arange(start, min(start + local, n))
        count = len(indices)
        batch = {
            "image": np.zeros((local, *image_shape), np.float32),
            "label": np.zeros(local, np.int32),
            "mask": np.arange(local) < count,
        }
        if count:
            images, labels = dataset.read(indices)
            if not isinstance(images, np.ndarray):
                images = np.stack(
                    [
                        aug.crop_resize(im, aug.center_crop_box(*im.shape[:2], size), size)
                        for im in images
                    ]
                )
            batch["image"][:count] = aug.normalize(images, info.mean, info.std)
            batch["label"][:count] = labels
        yield batch


# --------------------------------------------------------------- device helpers


def shard_for_pmap(batch: dict[str, np.ndarray], num_devices: int | None = None):
    """Reshape every (B, ...) array to (num_devices, B / num_devices, ...) for `jax.pmap`.

    `num_devices` defaults to `jax.local_device_count()`. A batch size that is not a
    multiple of it raises a ValueError naming both numbers.
    """
    if num_devices is None:
        import jax

        num_devices = jax.local_device_count()

    def reshape(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % num_devices:
            raise ValueError(
                f"Per-process batch size {x.shape[:1]} is not divisible by the "
                f"{num_devices} local devices; use a per-process batch that is a multiple "
                f"of {num_devices}."
            )
        return x.reshape(num_devices, x.shape[0] // num_devices, *x.shape[1:])

    return {k: reshape(v) for k, v in batch.items()}


def prefetch(iterator: Iterator, buffer_size: int = 2) -> Iterator:
    """Run `iterator` in a background thread, `buffer_size` items ahead (order unchanged).

    numpy releases the GIL in its heavy loops, so augmentation overlaps the
    training step. Exceptions from the producer are re-raised in the consumer.
    """
    if buffer_size <= 0:
        yield from iterator
        return
    q: queue.Queue = queue.Queue(maxsize=buffer_size)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for item in iterator:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.01)
