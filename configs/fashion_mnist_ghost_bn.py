"""Fashion-MNIST, small ResNet-18 v2: ghost batch norm (runs of 16 examples each)."""

from configs import fashion_mnist_norms


def get_config():
    c = fashion_mnist_norms.get_config("batch_norm", ghost_batch_size=16)
    return c
