"""Fashion-MNIST, small ResNet-18 v2: Switchable norm (learned mix of IN, LN and BN statistics)."""

from configs import fashion_mnist_norms


def get_config():
    c = fashion_mnist_norms.get_config("switchable_norm")
    return c
