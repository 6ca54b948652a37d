"""Fashion-MNIST, small ResNet-18 v2: EvoNorm-B0 (batch variance + instance variance)."""

from configs import fashion_mnist_norms


def get_config():
    c = fashion_mnist_norms.get_config("evonorm_b0")
    return c
