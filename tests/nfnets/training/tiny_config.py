"""Tiny configs and fake Fashion-MNIST data shared by the training tests.

The ``data_dir`` fixture (tests/nfnets/training/conftest.py) writes the fake data
once per test module.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np

from configs import default, fashion_mnist_norms
from nfnets.training.datasets import FASHION_MNIST_FILES, write_idx

N_TRAIN, N_TEST = 64, 40


def write_fake_fashion_mnist(
    directory: str | os.PathLike,
    n_train: int = 64,
    n_test: int = 32,
    seed: int = 0,
    *,
    gzip: bool = True,
) -> Path:
    """Write the four Fashion-MNIST IDX files with random uint8 images and labels in [0, 10).

    `load_dataset("fashion_mnist", split=..., data_dir=directory)` reads them. Images
    are class-dependent (mean brightness grows with the label) so a tiny model can
    learn something. Returns `directory`.
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


def assert_trees_equal(a, b) -> None:
    """Same structure and bit-identical leaves."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def fake_data(directory) -> str:
    """Writes 64 train / 40 test random IDX examples; returns the directory."""
    write_fake_fashion_mnist(directory, N_TRAIN, N_TEST, seed=0)
    return str(directory)


def _tiny(c, data_dir: str):
    """Shrinks ``c`` in place: two stages (stem 8, widths 8/16, one block each),
    batch 16, eval batch 24, one epoch without warmup, log every step, no bar."""
    c.data_dir = data_dir
    c.model_kwargs.stem_width = 8
    c.model_kwargs.widths = (8, 16)
    c.model_kwargs.depths = (1, 1)
    c.batch_size = 16
    c.eval_batch_size = 24
    c.num_epochs = 1.0
    c.warmup_epochs = 0.0
    c.log_every_steps = 1
    c.progress_bar = False
    return c


def tiny_nf_config(data_dir: str):
    """Two-stage NF-ResNet (widths 8, 16), batch 16: 4 steps per epoch on fake data."""
    c = _tiny(default.get_config(), data_dir)
    c.checkpoint_every_steps = 0
    return c


def tiny_bn_config(data_dir: str, norm: str = "batch_norm"):
    """Two-stage ResNet-18 v2 (small) with ``norm``, same sizes as ``tiny_nf_config``."""
    c = _tiny(fashion_mnist_norms.get_config(norm), data_dir)
    c.precise_bn_batches = 0
    return c
