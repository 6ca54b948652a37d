"""CIFAR-10, the batch-norm twin of ``cifar10_nf_resnet``: same everything but the norm.

The model is the pre-activation bottleneck ResNet (``resnet50_v2_small``) with the
NF-ResNet-26's stages (depths (2, 2, 2, 2), the same widths and stem), batch norm
synchronized across devices (SyncBN) and no AGC; the schedule, augmentation and
EMA come from ``cifar10_nf_resnet``. PreciseBN statistics are evaluated next to
the running averages.
"""

from configs import cifar10_nf_resnet


def get_config():
    c = cifar10_nf_resnet.get_config()
    c.model = "resnet50_v2_small"
    c.model_kwargs.norm = "batch_norm"
    c.model_kwargs.norm_kwargs = {}
    c.sync_batch_stats = "all"
    c.agc_clip = 0.0
    c.precise_bn_batches = 50
    return c
