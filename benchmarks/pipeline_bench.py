"""ImageNet-style training input: images/s of the grain workers vs the single-threaded path.

Run: ``python -m benchmarks.pipeline_bench`` (or ``make bench``). The benchmark
writes its own data: ``--images`` synthetic JPEGs of ImageNet-like size (300-400 x
350-450 pixels, a smooth colour field plus noise, JPEG quality 90: about 100 KiB
each, near ImageNet's average) as a TFDS
``imagenet2012`` dataset in the array_record format in a temporary folder, and
reads it back with ``load_dataset`` (a lazy ``SourceDataset``, as real ImageNet).

Each row builds ``--steps`` training batches of ``--batch`` images at 224 x 224
with the ImageNet augmentation (Inception crop, flip, MixUp / CutMix), the same
batches on every row:

- ``numpy`` is ``pipeline.train_iterator`` in this process (one PIL decode and
  resize after another; the path the loop used before grain);
- ``grain W x T`` is ``grain_pipeline.grain_train_iterator`` with W worker
  processes (0 = this process) of T threads each.

images/s counts the batches after the first W (at least 1), timed from the
arrival of batch W - 1 to the last, so worker start-up (spawning, importing
grain and TFDS) is left out of the rate; it is the "first batch (s)" column.
CPU ms / image is the CPU time of this process and its workers over the same
batches: on a CPU shared with other jobs, images/s measures the share the
scheduler gave, while the CPU cost per image does not depend on it.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image

from nfnets.training import augment as aug
from nfnets.training import datasets, grain_pipeline, pipeline

CONFIGS = (("numpy", 0, 0), ("grain", 1, 1), ("grain", 2, 1), ("grain", 0, 2), ("grain", 2, 2))
AUGMENT = aug.Augment(flip=True, inception_crop=True, mixup_alpha=0.2, cutmix_alpha=1.0)


def prepare_fake_imagenet(
    data_dir, images: dict[str, list[np.ndarray]], *, quality: int = 90
) -> None:
    """`images` ({split: uint8 (h, w, 3) arrays}) as TFDS `imagenet2012` (JPEG, array_record).

    Same name, version and features as the real builder (which needs the ILSVRC
    tar files), so `tfds.builder("imagenet2012", data_dir=...)` finds it prepared
    and `datasets.load_dataset` reads it. Each image is stored as PIL's JPEG at
    `quality`; example i of a split gets label i % 10. Needs no TensorFlow and no
    network.
    """
    import tensorflow_datasets as tfds
    from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as real

    class Fake(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        # tfds 4.9.10 looks up the code path of builders defined in packages through the
        # optional `importlib_resources`; a non-package module takes its plain fallback.
        __module__ = "__main__"
        name = "imagenet2012"
        VERSION = real.Builder.VERSION

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(num_classes=1000),
                    "file_name": tfds.features.Text(),
                }
            )
            return tfds.core.DatasetInfo(
                builder=self, features=features, supervised_keys=("image", "label")
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in images}

        def _generate_examples(self, split):
            for i, image in enumerate(images[split]):
                jpeg = io.BytesIO()
                PIL.Image.fromarray(image).save(jpeg, "JPEG", quality=quality)
                example = {"image": jpeg.getvalue(), "label": i % 10}
                yield f"{split}{i}", {**example, "file_name": f"{split}_{i}.JPEG"}

    Fake(data_dir=os.fspath(data_dir), file_format="array_record").download_and_prepare()


def synthetic_images(n: int, seed: int = 0) -> list[np.ndarray]:
    """`n` uint8 (h, w, 3) images: an upsampled 64 x 64 random colour field plus noise."""
    rng = np.random.default_rng(seed)
    out = []
    for h, w in zip(rng.integers(300, 401, n), rng.integers(350, 451, n), strict=True):
        field = PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        smooth = np.asarray(field.resize((int(w), int(h)), PIL.Image.Resampling.BICUBIC))
        noise = rng.normal(0, 25, smooth.shape)
        out.append(np.clip(smooth + noise, 0, 255).astype(np.uint8))
    return out


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's live multiprocessing children (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for child in multiprocessing.active_children():
        try:
            with open(f"/proc/{child.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # exited, or not Linux
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def throughput(batches, num_workers: int, batch: int, steps: int) -> dict:
    """Time `steps` batches of an endless stream; rates leave out the first max(W, 1).

    Returns seconds to the first batch, images/s and CPU ms per image (this process
    plus its worker processes, over the same batches). The stream is endless so the
    workers are still alive, and their CPU time readable, at the last batch.
    """
    warm = max(num_workers, 1)
    start = time.perf_counter()
    for i in range(steps):
        next(batches)
        if i == 0:
            first = time.perf_counter() - start
        if i == warm - 1:
            t0, cpu0 = time.perf_counter(), time.process_time() + children_cpu_seconds()
    wall = time.perf_counter() - t0
    cpu = time.process_time() + children_cpu_seconds() - cpu0
    batches.close()
    images = (steps - warm) * batch
    return {"first": first, "rate": images / wall, "cpu_ms": 1e3 * cpu / images}


def run(ds, batch: int, steps: int) -> list[dict]:
    rows = []
    kw = dict(global_batch_size=batch, seed=0, augment=AUGMENT, image_size=224)
    for path, workers, threads in CONFIGS:
        if path == "numpy":
            it = pipeline.train_iterator(ds, **kw)
        else:
            it = grain_pipeline.grain_train_iterator(
                ds, num_workers=workers, num_threads=threads, **kw
            )
        name = "numpy (single-threaded PIL)" if path == "numpy" else f"grain {workers} x {threads}"
        rows.append({"pipeline": name, **throughput(it, workers, batch, steps)})
    return rows


def table(rows: list[dict], meta: str) -> str:
    base = rows[0]["rate"]
    lines = [
        meta,
        "",
        "| pipeline (workers x threads) | first batch (s) | images/s | vs numpy | CPU ms / image |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['pipeline']} | {r['first']:.2f} | {r['rate']:.1f} | {r['rate'] / base:.2f} "
            f"| {r['cpu_ms']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="synthetic JPEGs written")
    parser.add_argument("--batch", type=int, default=32, help="images per batch")
    parser.add_argument("--steps", type=int, default=16, help="batches per row")
    args = parser.parse_args(argv)
    import tensorflow_datasets as tfds

    from benchmarks.norms_bench import cpu_model

    tfds.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        images = synthetic_images(args.images)
        prepare_fake_imagenet(tmp, {"train": images, "validation": images[:2]})
        ds = datasets.load_dataset("imagenet2012", split="train", data_dir=tmp)
        jpeg_bytes = sum(f.stat().st_size for f in Path(tmp).rglob("*array_record*"))
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        meta = (
            f"{len(ds)} JPEGs, {jpeg_bytes / len(ds) / 1024:.0f} KiB per record; batches of "
            f"{args.batch} at 224 x 224, {args.steps} per row; {os.cpu_count()} CPU cores "
            f"({cpu_model()}), Python {platform.python_version()}; load average {load:.1f} "
            "at the start"
        )
        out = table(run(ds, args.batch, args.steps), meta)
    print(out)
    return out


if __name__ == "__main__":
    main()
