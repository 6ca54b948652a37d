"""Tiny configs and fake Fashion-MNIST data shared by the training tests."""

from __future__ import annotations

from configs import default, fashion_mnist_norms
from nfnets.data import write_fake_fashion_mnist

N_TRAIN, N_TEST = 64, 40


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
