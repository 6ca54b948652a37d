"""Every config file loads, validates, derives and builds its model (shapes only)."""

from __future__ import annotations

import glob
import importlib
import os

import jax
import jax.numpy as jnp
import pytest

from nfnets.registry import create_model
from nfnets.training.datasets import get_spec
from nfnets.training.plan import make_plan
from nfnets.training.step import init_variables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    # from_workdir.py reads a run's config.json (tests/nfnets/training/test_resume.py).
    if not os.path.basename(p).startswith(("__", "common", "from_workdir"))
)


def test_all_experiments_present():
    for name in ("default", "cifar10_nf_resnet", "cifar10_bn_resnet", "imagenet_nfnet_f0",
                 "imagenet_nf_resnet50", "imagenet_resnet50_bn"):  # fmt: skip
        assert name in CONFIGS
    norms = {"bn", "syncbn", "ghost_bn", "gn", "gn_ws", "frn", "evonorm_b0", "evonorm_s0",
             "batch_renorm", "switchable"}  # fmt: skip
    assert {f"fashion_mnist_{n}" for n in norms} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    config.lock()
    spec = get_spec(config.dataset)
    d = make_plan(
        config, num_train_examples=50_000, num_devices=8, local_devices=8, process_count=1
    )
    model = create_model(config.model, num_classes=spec.num_classes, **d.model_kwargs)
    size = config.image_size or spec.image_shape[0]
    x = jnp.zeros((2, size, size, spec.image_shape[2]))
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), x, "batch"))
    assert "head" in shapes["params"]
    stateful = config.model_kwargs.get("norm") in ("batch_norm", "batch_renorm",
                                                   "switchable_norm", "evonorm_b0")  # fmt: skip
    assert bool(shapes.get("batch_stats")) == stateful
    if config.dataset == "imagenet2012":
        assert config.batch_size % 8 == 0 and d.steps_per_epoch == 50_000 // config.batch_size


def test_nfnet_f0_is_the_paper_recipe():
    c = importlib.import_module("configs.imagenet_nfnet_f0").get_config()
    assert (c.batch_size, c.num_epochs, c.warmup_epochs) == (4096, 360.0, 5.0)
    assert (c.optimizer, c.momentum, c.nesterov) == ("sgd", 0.9, True)
    assert c.learning_rate * c.batch_size / c.lr_base_batch_size == pytest.approx(1.6)
    assert (c.agc_clip, tuple(c.agc_exclude), c.weight_decay) == (0.01, ("head",), 2e-5)
    assert (c.label_smoothing, c.ema, c.dtype) == (0.1, "nfnet", "bfloat16")
    assert (c.image_size, c.eval_image_size) == (192, 256)
