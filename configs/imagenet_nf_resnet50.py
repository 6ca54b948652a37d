"""ImageNet NF-ResNet-50 (Brock et al., 2021a recipe scaled to batch 1024).

SGD Nesterov, lr 0.1 * B / 256 with 5 warmup epochs then cosine, AGC 0.01
excluding the classifier, weight decay 5e-5 without gains/biases, label smoothing
0.1, 224px Inception crop + flip, 90 epochs.
"""

from configs.common import base_config


def get_config():
    c = base_config()
    c.dataset = "imagenet2012"
    c.model = "nf_resnet50"
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
    c.weight_decay = 5e-5
    c.agc_clip = 0.01
    c.label_smoothing = 0.1
    c.ema = "nfnet"
    c.log_every_steps = 100
    c.eval_every_steps = 5000
    c.checkpoint_every_steps = 1000
    c.progress_bar = False
    return c
