"""Fashion-MNIST, small ResNet-18 v2: batch renormalization (paper r_max/d_max schedule)."""

from configs import fashion_mnist_norms


def get_config():
    c = fashion_mnist_norms.get_config("batch_renorm")
    return c
