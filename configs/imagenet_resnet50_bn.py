"""ImageNet ResNet-50 v1.5 with SyncBN: the normalized twin of ``imagenet_nf_resnet50``.

Same schedule, resolution, augmentation and label smoothing (taken from
``imagenet_nf_resnet50``); no AGC; weight decay 1e-4 (the standard BN recipe)
without gains/biases; no parameter EMA; PreciseBN statistics evaluated next to
the running averages.
"""

from configs import imagenet_nf_resnet50


def get_config():
    c = imagenet_nf_resnet50.get_config()
    c.model = "resnet50_v1"
    c.model_kwargs.norm = "batch_norm"
    c.model_kwargs.norm_kwargs = {}
    c.sync_batch_stats = "all"
    c.weight_decay = 1e-4
    c.agc_clip = 0.0
    c.ema = "none"
    c.precise_bn_batches = 200
    return c
