"""CIFAR-10 with the small-input ResNet-18 (v2) and SyncBN: the normalized twin of
``cifar10_nf_resnet``. PreciseBN statistics are evaluated next to the running ones."""

from configs.common import base_config


def get_config():
    c = base_config()
    c.dataset = "cifar10"
    c.model = "resnet18_v2_small"
    c.model_kwargs.norm = "batch_norm"
    c.model_kwargs.norm_kwargs = {}
    c.sync_batch_stats = "all"
    c.augment.crop_padding = 4
    c.augment.flip = True
    c.batch_size = 256
    c.eval_batch_size = 1000
    c.num_epochs = 90.0
    c.learning_rate = 0.1
    c.warmup_epochs = 2.0
    c.weight_decay = 5e-4
    c.agc_clip = 0.0
    c.precise_bn_batches = 50
    c.log_every_steps = 100
    c.eval_every_steps = 2000
    c.checkpoint_every_steps = 2000
    return c
