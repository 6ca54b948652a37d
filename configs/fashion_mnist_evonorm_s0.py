"""Fashion-MNIST, small ResNet-18 v2: EvoNorm-S0 (batch independent), 8 groups."""

from configs import fashion_mnist_norms


def get_config():
    c = fashion_mnist_norms.get_config("evonorm_s0", num_groups=8)
    return c
