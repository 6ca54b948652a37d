"""Fashion-MNIST with a small-input NF-ResNet, sized for a 2-core CPU (``make train``).

Target: >= 90% test accuracy in well under 10 minutes of training on 2 CPU cores.
The model is ``nf_resnet26_small`` (3x3 stride-1 stem, no max pool) cut down to
three single-block stages; AGC is on (the NF recipe) but loose, since the batch is
small.
"""

from configs.common import base_config


def get_config():
    c = base_config()
    c.dataset = "fashion_mnist"
    c.model = "nf_resnet26_small"
    c.model_kwargs.stem_width = 16
    c.model_kwargs.widths = (32, 64, 128)
    c.model_kwargs.depths = (1, 1, 1)
    c.model_kwargs.stochastic_depth = 0.0
    c.augment.crop_padding = 2
    c.augment.flip = True
    c.batch_size = 128
    c.eval_batch_size = 1000
    c.num_epochs = 3.0
    c.optimizer = "sgd"
    c.learning_rate = 0.1
    c.lr_base_batch_size = 256
    c.warmup_epochs = 0.2
    c.weight_decay = 5e-5
    c.agc_clip = 0.04
    c.label_smoothing = 0.0
    c.ema = "none"
    c.log_every_steps = 50
    c.checkpoint_every_steps = 500
    return c
