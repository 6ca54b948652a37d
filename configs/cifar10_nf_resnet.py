"""CIFAR-10 with the small-input NF-ResNet-26 (3x3 stride-1 stem, no max pool).

Needs TFDS CIFAR-10 prepared as array_record (the start-up error prints the
command). SGD + Nesterov, warmup + cosine, AGC 0.01-scale clipping excluding the
classifier, weight decay 5e-4 without gains/biases, crop + flip augmentation.
"""

from configs.common import base_config


def get_config():
    c = base_config()
    c.dataset = "cifar10"
    c.model = "nf_resnet26_small"
    c.model_kwargs.widths = (64, 128, 256, 512)
    c.model_kwargs.depths = (2, 2, 2, 2)
    c.model_kwargs.stem_width = 32
    c.augment.crop_padding = 4
    c.augment.flip = True
    c.batch_size = 256
    c.eval_batch_size = 1000
    c.num_epochs = 90.0
    c.learning_rate = 0.1
    c.warmup_epochs = 2.0
    c.weight_decay = 5e-4
    c.agc_clip = 0.04
    c.label_smoothing = 0.0
    c.ema = "0.999"
    c.log_every_steps = 100
    c.eval_every_steps = 2000
    c.checkpoint_every_steps = 2000
    return c
