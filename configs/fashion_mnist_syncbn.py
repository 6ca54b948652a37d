"""Fashion-MNIST, small ResNet-18 v2: SyncBN, batch statistics over all devices."""

from configs import fashion_mnist_norms


def get_config():
    c = fashion_mnist_norms.get_config("batch_norm")
    c.sync_batch_stats = "all"
    return c
