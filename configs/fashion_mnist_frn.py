"""Fashion-MNIST, small ResNet-18 v2: Filter response normalization with TLU."""

from configs import fashion_mnist_norms


def get_config():
    c = fashion_mnist_norms.get_config("frn")
    return c
