"""Fashion-MNIST, small ResNet-18 v2: batch norm with per-device batch statistics.

``sync_batch_stats="none"``: each device normalizes with its own batch; the running
statistics are merged across devices before evaluation and checkpoints.
"""

from configs import fashion_mnist_norms


def get_config():
    c = fashion_mnist_norms.get_config("batch_norm")
    c.sync_batch_stats = "none"
    return c
