"""Fashion-MNIST, small ResNet-18 v2: Group norm, 8 groups."""

from configs import fashion_mnist_norms


def get_config():
    c = fashion_mnist_norms.get_config("group_norm", num_groups=8)
    return c
