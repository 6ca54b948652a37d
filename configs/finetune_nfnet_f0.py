"""Fine-tune DeepMind's ImageNet NFNet-F0 on CIFAR-10 (a new 10-class classifier).

Convert the released weights once (see README, "Pretrained NFNets")::

    python -m nfnets.pretrained convert --from deepmind F0_haiku.npz --to nfnet_f0.safetensors
    python train.py --config configs/finetune_nfnet_f0.py --workdir runs/f0_cifar10 \\
        --config.data_dir=DIR

``init_from`` also takes the original ``F0_haiku.npz`` or timm's
``model.safetensors`` directly. ``init_exclude=("head",)`` keeps the fresh
10-class classifier (ImageNet's has 1000); everything else starts from the
file. Restarting with the same workdir resumes from its checkpoint and does not
read ``init_from`` again. Needs TFDS CIFAR-10 prepared as array_record in
``data_dir`` (the start-up error prints the command) and a GPU/TPU.

Resolution: F0 was trained at 192x192 and evaluated at 256x256. CIFAR-10 is
32x32, exactly the model's ``min_image_size`` (total stride 32: the stem's two
stride-2 convs, then stages of stride 1, 2, 2, 2), so it runs, but the feature
maps are 16x16 after the first stem conv, 8x8 in stage 0, 4x4 in stage 1, 2x2 in
stage 2 and 1x1 in stage 3 and the final conv (at 192: 96, 48, 24, 12, 6), so
the last stage's 3x3 convs see one position surrounded by padding, far from
what the weights were trained on. The input pipeline keeps fixed-size data at
its native size (``image_size`` is only for variable-size data such as
ImageNet), so to fine-tune at a resolution nearer 192, upsample the images
when preparing the data. Smaller than 32x32 is refused by the model's input
check (use a ``_small`` variant, which cannot load these weights).

Optimizer: the NFNet recipe (SGD + Nesterov, AGC 0.01 without the classifier,
cosine decay), with a 10x lower rate than ImageNet training from scratch
(0.01 per 256 examples) and a short warmup for the fresh classifier.
"""

from configs.common import base_config
from nfnets.training.optim import default_optimizer_config


def get_config():
    c = base_config()
    c.dataset = "cifar10"
    c.model = "nfnet_f0"
    c.dtype = "bfloat16"
    c.init_from = "nfnet_f0.safetensors"
    c.init_exclude = ("head",)
    c.augment.crop_padding = 4
    c.augment.flip = True
    c.update(default_optimizer_config())  # SGD Nesterov 0.9, AGC 0.01 excluding "head"
    c.batch_size = 256
    c.learning_rate = 0.01
    c.lr_base_batch_size = 256
    c.num_epochs = 10.0
    c.warmup_epochs = 0.5
    c.weight_decay = 1e-5
    c.label_smoothing = 0.0
    c.ema = "none"
    c.eval_batch_size = 1000
    c.log_every_steps = 100
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 1000
    return c
