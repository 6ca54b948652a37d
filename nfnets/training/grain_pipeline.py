"""Training batches built in grain worker processes, and the one entry point the loop uses.

Typical use (what `nfnets.training.loop` does)::

    batches = make_train_iterator(train_ds, config, start_step=step, num_steps=total,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())

`grain_train_iterator` is `pipeline.train_iterator` run by grain
(https://google-grain.readthedocs.io): a `grain.MapDataset` over the step numbers
whose map builds this process's whole batch of a step with `pipeline.train_batch`
(read the records, decode the JPEGs, Inception crop / flip, normalize, MixUp /
CutMix on the process's batch, exactly as the numpy path does). grain's
`mp_prefetch` runs that map in `num_workers` processes, worker w taking steps
w, w + W, ... and the output interleaving them back in step order, and
`ReadOptions.num_threads` threads per process overlap several batches (PIL
releases the GIL while it decodes and resizes).

Determinism and resume: a batch is a pure function of (dataset, seed, step,
process index / count, augmentation), so the stream is the same for any worker
or thread count, equals the numpy path's batch for batch, and restarting at the
checkpointed step (`start_step`) repeats the uninterrupted stream exactly: no
iterator state needs checkpointing beyond the step. Per-process sharding is the
numpy path's: process p takes rows [p * B/P, (p + 1) * B/P) of each global batch.
The elements are whole batches, never examples, because grain slices the map
dataset across workers: batching after the slice would group different examples
for different worker counts.

Dispatch (`make_train_iterator`): ``config.input_pipeline`` "numpy" (in-process,
enough for Fashion-MNIST / CIFAR-10 held in memory), "grain", or "auto" (grain for
splits read record by record, i.e. TFDS ImageNet; numpy for splits in memory).
``config.data_workers``: grain worker processes (-1: one per CPU core, at most 16;
0: build batches in this process, still with grain's threads).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import grain
import ml_collections
import numpy as np

from nfnets.training.augment import Augment, augment_from_config
from nfnets.training.datasets import Dataset, SourceDataset
from nfnets.training.pipeline import StepBatch, check_train_args, train_iterator

INPUT_PIPELINES = ("auto", "numpy", "grain")
MAX_AUTO_WORKERS = 16


def grain_train_iterator(
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
    num_workers: int = 0,
    num_threads: int = 1,
    worker_buffer_size: int = 2,
) -> Iterator[dict[str, np.ndarray]]:
    """`pipeline.train_iterator`'s batches (same arguments, same values) built by grain.

    `num_workers` processes (0: this process) each run `num_threads` threads
    (0: none) and keep up to `worker_buffer_size` finished batches. Arguments are
    checked here, before any worker starts. Yields {"image": float32 (B/P, H, W, C),
    "label": int32 (B/P,)} plus "label_probs" float32 (B/P, num_classes) when
    `augment.mixing`, for steps start_step, ..., num_steps - 1 (forever if None).
    Closing the generator (or letting it be collected) stops the workers.
    """
    check_train_args(dataset, global_batch_size, seed, process_index, process_count, image_size)
    for name, value, low in (
        ("start_step", start_step, 0),
        ("num_workers", num_workers, 0),
        ("num_threads", num_threads, 0),
        ("worker_buffer_size", worker_buffer_size, 1),
    ):
        if not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
    stop = sys.maxsize if num_steps is None else max(int(num_steps), start_step)
    build = StepBatch(
        dataset,
        global_batch_size,
        seed,
        process_index,
        process_count,
        augment or Augment(),
        image_size,
    )
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(num_threads, 1))
    ds = grain.MapDataset.range(start_step, stop).map(build).to_iter_dataset(read)
    if num_workers:
        _allow_unparsed_flags()
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=num_workers, per_worker_buffer_size=worker_buffer_size
            )
        )
    return _closing(iter(ds))


def _allow_unparsed_flags() -> None:
    """Let grain <= 0.2.18 start workers outside an absl app (tests, benchmarks, notebooks).

    Starting workers reads an absl flag, which raises `UnparsedFlagAccessError`
    unless flags were parsed (google/grain#1355, fixed after 0.2.18); marking the
    flags parsed keeps every default. `train.py` parses them itself.
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _closing(iterator) -> Iterator[dict[str, np.ndarray]]:
    try:
        yield from iterator
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


def resolve_workers(data_workers: int) -> int:
    """``config.data_workers`` -> a worker count: -1 means one per CPU core, capped at 16."""
    if data_workers == -1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return min(cores or 1, MAX_AUTO_WORKERS)
    return data_workers


def make_train_iterator(
    dataset: Dataset,
    config: ml_collections.ConfigDict,
    *,
    start_step: int,
    num_steps: int | None,
    process_index: int,
    process_count: int,
) -> Iterator[dict[str, np.ndarray]]:
    """The training batches of `config` from `dataset`, through numpy or grain (see module doc).

    Reads ``batch_size`` (global), ``seed``, ``augment``, ``image_size``,
    ``input_pipeline`` and ``data_workers``; both paths yield identical batches.
    Bad values raise `ConfigError` naming the key and the fix.
    """
    from nfnets.training.plan import ConfigError  # plan imports jax; workers need not

    choice = config.get("input_pipeline", "auto")
    if choice not in INPUT_PIPELINES:
        raise ConfigError(f"config.input_pipeline={choice!r}: use one of {INPUT_PIPELINES}")
    workers = config.get("data_workers", -1)
    if not isinstance(workers, int) or workers < -1:
        raise ConfigError(
            f"config.data_workers={workers!r}: give -1 (one per CPU core), 0 (in this "
            "process) or a number of worker processes"
        )
    kwargs = dict(
        global_batch_size=config.batch_size,
        seed=config.seed,
        start_step=start_step,
        num_steps=num_steps,
        process_index=process_index,
        process_count=process_count,
        augment=augment_from_config(config),
        image_size=config.image_size or None,
    )
    if choice == "numpy" or (choice == "auto" and not isinstance(dataset, SourceDataset)):
        return train_iterator(dataset, **kwargs)
    return grain_train_iterator(dataset, num_workers=resolve_workers(workers), **kwargs)
