"""The full config schema with CPU-sized defaults; experiment files override values.

Keys (all read by ``nfnets.training.train``; the optimizer keys by
``nfnets.training.optim.make_optimizer``):

- ``seed``: one integer fixes initialisation, data order, augmentation and dropout.
- ``dataset``: "fashion_mnist" | "cifar10" | "imagenet2012"; ``data_dir``: where the
  data lives ("" = the default place: /usr/share/datasets/fashion-mnist for
  Fashion-MNIST IDX files, ~/tensorflow_datasets for TFDS datasets).
- ``validation_examples``: training examples held out as the ``validation`` split
  (a fixed random subset, the same for every run and seed); evaluated beside the
  test split as ``validation_accuracy`` / ``validation_loss``. 0 = no split.
- ``image_size`` / ``eval_image_size``: 0 keeps the native size.
- ``input_pipeline``: "auto" (grain worker processes for splits read record by
  record, i.e. TFDS ImageNet; in-process numpy for splits held in memory),
  "numpy" or "grain"; ``data_workers``: grain worker processes (-1 = one per CPU
  core, at most 16; 0 = in this process). Same batches either way
  (nfnets/training/grain_pipeline.py).
- ``augment``: random crop (``crop_padding`` pixels, 0 = off), horizontal ``flip``,
  ``inception_crop`` (random-resized crop, ImageNet),
  ``mixup_alpha`` / ``cutmix_alpha`` (0 = off).
- ``model``: a name of ``nfnets.registry.MODEL_NAMES``; ``model_kwargs``: its
  overrides (widths, depths, norm, norm_kwargs, ...).
- ``dtype``: compute dtype ("float32" | "bfloat16"); params and norm statistics stay
  float32.
- ``sync_batch_stats``: how stateful norms (BN, renorm, switchable, EvoNorm-B0)
  share batch statistics across devices: "all" (SyncBN over every device of every
  host), "none" (each device its own batch; running statistics averaged before
  evaluation and checkpoints), "groups" (groups of ``sync_group_size``
  consecutive devices, via ``axis_index_groups``).
- ``parallelism``: "pmap" (``jax.pmap``) or "shard_map" (``jax.jit(jax.shard_map(...))``
  over global arrays); same numbers, checkpoints interchangeable
  (nfnets/training/parallel.py).
- ``batch_size``: GLOBAL batch (all devices, all hosts); must divide by the device
  count. ``eval_batch_size``: global eval batch (any size; the last batch is
  padded and masked).
- ``num_epochs``; ``num_train_steps`` > 0 overrides it (the schedule then spans
  that many steps).
- optimizer: ``optimizer``, ``learning_rate`` (per ``lr_base_batch_size`` examples),
  ``lr_base_batch_size``, ``warmup_epochs``, ``momentum``, ``nesterov``,
  ``weight_decay``, ``adam_b1/b2/eps``, ``agc_clip`` (0 = off), ``agc_eps``,
  ``agc_exclude``, ``label_smoothing`` (see nfnets/training/optim.py).
- ``ema``: parameter EMA: "none", "nfnet" (decay min(0.99999, (1+t)/(10+t))) or a
  fixed decay written as a string, e.g. "0.999".
- ``precise_bn_batches``: > 0 re-estimates BN population statistics after training
  from that many training batches (PreciseBN) and evaluates them next to the
  running averages.
- ``log_every_steps``, ``eval_every_steps`` (0 = only at the end),
  ``checkpoint_every_steps`` (0 = only at the end and on SIGTERM/SIGINT),
  ``keep_checkpoints``, ``progress_bar``, ``tensorboard``.
- fine-tuning (see nfnets/training/init.py): ``init_from`` ("" = random init): a
  DeepMind ``F*_haiku.npz``, timm ``model.safetensors``, a file of
  ``nfnets.pretrained.save`` or a training workdir; ``init_exclude``: path
  prefixes that keep the fresh init (default ("head",): a new classifier).
  Ignored when the workdir has a checkpoint (resume wins).
- ``max_consecutive_skipped_steps``: a run that skips this many steps in a row
  (non-finite loss or gradients) has diverged: it stops with "diverged at step N",
  keeps its last good checkpoint and exits non-zero (0 = never stop; a non-finite
  test loss also stops it). See nfnets/training/health.py.
- ``distributed``: ``initialize`` (call jax.distributed.initialize; also when the
  environment sets JAX_COORDINATOR_ADDRESS), ``coordinator_address``,
  ``num_processes``, ``process_id`` ("" / -1 = auto-detect), ``cpu_collectives``
  ("gloo" lets CPU processes talk to each other; "" leaves JAX's default).
"""

import ml_collections

from nfnets.training.optim import default_optimizer_config


def base_config() -> ml_collections.ConfigDict:
    """Every key the trainer reads, with Fashion-MNIST/CPU defaults."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Data.
    c.dataset = "fashion_mnist"
    c.data_dir = ""
    c.image_size = 0
    c.eval_image_size = 0
    # Training examples held out as the validation split (the same ones in every run,
    # whatever the seed; nfnets.training.datasets.split_validation); 0 = none.
    c.validation_examples = 0
    c.input_pipeline = "auto"
    c.data_workers = -1
    c.augment = ml_collections.ConfigDict(
        {
            "crop_padding": 0,
            "flip": False,
            "inception_crop": False,
            "mixup_alpha": 0.0,
            "cutmix_alpha": 0.0,
        }
    )

    # Model.
    c.model = "nf_resnet26_small"
    c.model_kwargs = ml_collections.ConfigDict()
    c.dtype = "float32"
    c.sync_batch_stats = "all"
    c.sync_group_size = 0

    # Data parallelism: "pmap" or "shard_map".
    c.parallelism = "pmap"

    # Batches and length.
    c.batch_size = 128
    c.eval_batch_size = 1000
    c.num_epochs = 1.0
    c.num_train_steps = -1

    # Optimizer: the values of nfnets.training.optim.default_optimizer_config(), except
    # batch_size/num_epochs (set above) and these CPU-sized changes:
    for key, value in default_optimizer_config().items():
        if key not in ("batch_size", "num_epochs"):
            c[key] = value
    c.warmup_epochs = 0.0
    c.weight_decay = 5e-5
    c.agc_clip = 0.0  # off
    c.label_smoothing = 0.0
    c.ema = "none"
    c.precise_bn_batches = 0

    # Fine-tuning (nfnets.training.init).
    c.init_from = ""
    c.init_exclude = ("head",)

    # Outputs.
    c.log_every_steps = 50
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 0
    c.keep_checkpoints = 2
    c.progress_bar = True
    c.tensorboard = True

    # Divergence: stop after this many skipped (non-finite) steps in a row; 0 = never.
    # Isolated skips are normal; 50 in a row means no finite step is left to take.
    c.max_consecutive_skipped_steps = 50

    c.distributed = ml_collections.ConfigDict(
        {
            "initialize": False,
            "coordinator_address": "",
            "num_processes": -1,
            "process_id": -1,
            "cpu_collectives": "gloo",
        }
    )
    return c
