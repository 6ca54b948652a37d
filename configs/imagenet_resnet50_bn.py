"""ImageNet ResNet-50 v1.5 with SyncBN: the normalized twin of ``imagenet_nf_resnet50``.

Same schedule; no AGC; weight decay 1e-4 (the standard BN recipe) without
gains/biases; PreciseBN statistics evaluated next to the running averages.
"""

from configs.common import base_config


def get_config():
    c = base_config()
    c.dataset = "imagenet2012"
    c.model = "resnet50_v1"
    c.model_kwargs.norm = "batch_norm"
    c.model_kwargs.norm_kwargs = {}
    c.sync_batch_stats = "all"
    c.image_size = 224
    c.eval_image_size = 224
    c.dtype = "bfloat16"
    c.augment.inception_crop = True
    c.augment.flip = True
    c.batch_size = 1024
    c.eval_batch_size = 1000
    c.num_epochs = 90.0
    c.learning_rate = 0.1
    c.warmup_epochs = 5.0
    c.weight_decay = 1e-4
    c.agc_clip = 0.0
    c.label_smoothing = 0.1
    c.precise_bn_batches = 200
    c.log_every_steps = 100
    c.eval_every_steps = 5000
    c.checkpoint_every_steps = 1000
    c.progress_bar = False
    return c
