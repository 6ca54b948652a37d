"""ImageNet NFNet-F0, the paper recipe (Brock et al., 2021, Sec. 4 and Appendix C).

Batch 4096, 360 epochs, SGD Nesterov 0.9, lr 0.1 * B / 256 (1.6) with 5 warmup
epochs then cosine to 0, AGC lambda 0.01 excluding the classifier ("head"),
weight decay 2e-5 not on gains/biases, label smoothing 0.1, parameter EMA
``min(0.99999, (1+t)/(10+t))``, bf16 activations with float32 parameters, train
at 192px and test at 256px, Inception crop + flip, MixUp 0.2 / CutMix.
(RandAugment of the paper is not implemented.) Needs TFDS imagenet2012 prepared
as array_record in ``data_dir`` and a GPU/TPU host (or pod: set
``distributed.initialize``).
"""

from configs.common import base_config
from nfnets.training.optim import default_optimizer_config


def get_config():
    c = base_config()
    c.dataset = "imagenet2012"
    c.model = "nfnet_f0"
    c.image_size = 192
    c.eval_image_size = 256
    c.dtype = "bfloat16"
    c.augment.inception_crop = True
    c.augment.flip = True
    c.augment.mixup_alpha = 0.2
    c.augment.cutmix_alpha = 1.0
    # The NFNet ImageNet recipe is the optimizer default (default_optimizer_config).
    c.update(default_optimizer_config())
    c.eval_batch_size = 1000
    c.ema = "nfnet"
    c.log_every_steps = 100
    c.eval_every_steps = 5000
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.progress_bar = False
    return c
