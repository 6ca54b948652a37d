"""Deterministic, resumable, per-process batch iterators, device sharding and prefetch.

Typical use::

    batches = train_iterator(train, global_batch_size=256, seed=0, start_step=step,
                             process_index=jax.process_index(),
                             process_count=jax.process_count(),
                             augment=Augment(crop_padding=2, flip=True))
    for step, batch in zip(range(step, num_steps), batches):
        batch = shard_for_pmap(batch, jax.local_device_count())  # (D, B/D, ...)

Batches are dicts of numpy arrays: ``"image"`` float32 (N, H, W, C) normalized
as `(x / 255 - mean) / std` with the per-dataset mean/std in
`nfnets.training.datasets.DATASETS`; ``"label"`` int32 (N,); with MixUp/CutMix
also ``"label_probs"`` float32 (N, num_classes) whose rows sum to 1 (train on
it; "label" is then the unmixed label of each example's own image, for accuracy
only); eval batches add ``"mask"`` bool (N,), True for real examples, False for
padding. `train_batch` builds one step's batch; `nfnets.training.grain_pipeline`
runs it in grain worker processes for ImageNet-sized data.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
from collections.abc import Iterator

import numpy as np

from nfnets.training.augment import Augment, augment_batch, center_crop_box, crop_resize, normalize
from nfnets.training.datasets import Dataset

_SHUFFLE, _AUGMENT = 0, 1


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
    """Training steps per epoch: full batches only (the last partial batch is dropped).

    Raises ValueError when not even one full batch fits in the examples.
    """
    per_epoch = num_examples // global_batch_size
    if per_epoch == 0:
        raise ValueError(
            f"global_batch_size {global_batch_size} exceeds the {num_examples} training "
            f"examples; use a batch size <= {num_examples}."
        )
    return per_epoch


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
    check_train_args(dataset, global_batch_size, seed, process_index, process_count, image_size)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}.")
    build = StepBatch(
        dataset, global_batch_size, seed, process_index, process_count, augment, image_size
    )
    step = start_step
    while num_steps is None or step < num_steps:
        yield build(step)
        step += 1


# One epoch's order per process: ImageNet's 1.28M-entry permutation takes tens of
# milliseconds, so it is drawn once per epoch, not once per batch.
_epoch_order = functools.lru_cache(maxsize=2)(epoch_permutation)


@dataclasses.dataclass(frozen=True)
class StepBatch:
    """step -> this process's training batch (`train_batch`); picklable for grain workers."""

    dataset: Dataset
    global_batch_size: int
    seed: int
    process_index: int
    process_count: int
    augment: Augment | None
    image_size: int | None

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        step = int(step)
        n = len(self.dataset)
        order = _epoch_order(n, self.seed, step // steps_per_epoch(n, self.global_batch_size))
        return train_batch(
            self.dataset,
            step,
            global_batch_size=self.global_batch_size,
            seed=self.seed,
            process_index=self.process_index,
            process_count=self.process_count,
            augment=self.augment,
            image_size=self.image_size,
            order=order,
        )


def check_train_args(
    dataset: Dataset,
    global_batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
    image_size: int | None,
) -> int:
    """Validate training-batch arguments (ValueError naming the fix); returns the local batch."""
    local = _check_batching(global_batch_size, process_index, process_count)
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
    steps_per_epoch(len(dataset), global_batch_size)
    _output_shape(dataset, image_size)
    return local


def train_batch(
    dataset: Dataset,
    step: int,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    augment: Augment | None = None,
    image_size: int | None = None,
    order: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """This process's part of global training batch `step`: what `train_iterator` yields there.

    A pure function of its arguments (the iterator's only state is the step), so
    any worker can build any step. `order` is `epoch_permutation(N, seed, epoch)`
    of the step's epoch when the caller has it (computed here otherwise).
    """
    local = check_train_args(
        dataset, global_batch_size, seed, process_index, process_count, image_size
    )
    n = len(dataset)
    per_epoch = steps_per_epoch(n, global_batch_size)
    if order is None:
        order = epoch_permutation(n, seed, step // per_epoch)
    lo = process_index * local
    offset = (step % per_epoch) * global_batch_size
    indices = order[offset + lo : offset + lo + local]
    rng = np.random.default_rng([seed, _AUGMENT, step])
    images, labels = dataset.read(indices)
    size = _output_shape(dataset, image_size)[0]
    return augment_batch(
        images,
        labels,
        dataset.info,
        rng,
        augment or Augment(),
        slice(lo, lo + local),
        global_batch_size,
        size,
    )


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
                    [crop_resize(im, center_crop_box(*im.shape[:2], size), size) for im in images]
                )
            batch["image"][:count] = normalize(images, info.mean, info.std)
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
