"""Shared base of the Fashion-MNIST norm comparison: a small-input ResNet-18 (v2).

The norm is one override: ``--config.model_kwargs.norm=<name>`` with a name of
``norms.linen.make`` (batch_norm, batch_renorm, group_norm, layer_norm,
instance_norm, frn, switchable_norm, evonorm_b0, evonorm_s0); the files
``fashion_mnist_<norm>.py`` set it (plus the norm's own settings) for you.
Stateful norms follow ``sync_batch_stats`` ("all" = SyncBN across devices,
"none" = per-device batches, "groups" = groups of ``sync_group_size`` devices).
"""

from configs.common import base_config


def get_config(norm: str = "batch_norm", **norm_kwargs):
    c = base_config()
    c.dataset = "fashion_mnist"
    c.model = "resnet18_v2_small"
    c.model_kwargs.norm = norm
    c.model_kwargs.norm_kwargs = dict(norm_kwargs)
    c.model_kwargs.ws_conv = False
    c.model_kwargs.stem_width = 16
    c.model_kwargs.widths = (16, 32, 64)
    c.model_kwargs.depths = (1, 1, 1)
    c.augment.crop_padding = 2
    c.augment.flip = True
    c.batch_size = 128
    c.num_epochs = 3.0
    c.learning_rate = 0.1
    c.warmup_epochs = 0.2
    c.weight_decay = 5e-5
    c.precise_bn_batches = 20 if norm in ("batch_norm", "batch_renorm") else 0
    return c
