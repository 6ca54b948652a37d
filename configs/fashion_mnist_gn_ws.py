"""Fashion-MNIST, small ResNet-18 v2: Group norm with weight-standardized convs (GN+WS)."""

from configs import fashion_mnist_norms


def get_config():
    c = fashion_mnist_norms.get_config("group_norm", num_groups=8)
    c.model_kwargs.ws_conv = True
    return c
