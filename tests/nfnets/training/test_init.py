"""Fine-tuning from ``config.init_from``: weights at step 0, a new classifier, resume wins.

The weight files are written here: a tiny NF-ResNet with ``nfnets.pretrained.save``
and a tiny NFNet in DeepMind's haiku layout (as in tests/nfnets/test_pretrained.py),
both with 5 classes where the fake Fashion-MNIST has 10 (the NFNet also with 3
input channels where the data has 1), every leaf perturbed so it differs from
any fresh init.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy

from configs import finetune_nfnet_f0
from nfnets.pretrained import save
from nfnets.registry import create_model
from nfnets.training.init import exclude_patterns, init_from_pretrained
from nfnets.training.loop import Trainer, run
from nfnets.training.plan import ConfigError
from tests.conftest import subprocess_env
from tests.nfnets.test_pretrained import _to_deepmind, _to_timm
from tests.nfnets.training.tiny_config import tiny_nf_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
NFNET_KWARGS = dict(widths=(16, 32), depths=(1, 2), group_width=8, stem_width=8)


def _file_params(model, channels: int, seed: int = 1) -> dict:
    """``{path: array}`` of ``model``'s init at ``seed``, every leaf + N(0, 0.2) noise."""
    x = jnp.zeros((1, 28, 28, channels))
    variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(seed))
    rng = np.random.default_rng(seed)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
    return {
        p: (np.asarray(v) + 0.2 * rng.standard_normal(v.shape)).astype(np.float32)
        for p, v in flat.items()
    }


def _flat(tree) -> dict:
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def _nfnet_config(data_dir: str, init_from: str, exclude) -> ml_collections.ConfigDict:
    config = tiny_nf_config(data_dir)
    config.model = "nfnet_f0"
    config.model_kwargs = ml_collections.ConfigDict(NFNET_KWARGS)
    config.init_from, config.init_exclude = init_from, exclude
    return config


@pytest.fixture(scope="module")
def native_file(tmp_path_factory):
    """A 5-class tiny NF-ResNet (the tiny config's architecture) in our format."""
    config = tiny_nf_config("")
    model = create_model(config.model, num_classes=5, **config.model_kwargs.to_dict())
    flat = _file_params(model, channels=1)
    path = str(tmp_path_factory.mktemp("native") / "tiny.safetensors")
    save(flax.traverse_util.unflatten_dict(flat), path)
    return path, flat


@pytest.fixture(scope="module")
def deepmind_file(tmp_path_factory):
    """A 5-class, 3-channel tiny NFNet, pickled as DeepMind's haiku dict (and timm's file)."""
    flat = _file_params(create_model("nfnet_f0", num_classes=5, **NFNET_KWARGS), channels=3)
    root = tmp_path_factory.mktemp("dm")
    path = str(root / "tiny_haiku.npz")
    with open(path, "wb") as f:
        pickle.dump(_to_deepmind(flat), f, protocol=4)
    safetensors.numpy.save_file(_to_timm(flat), str(root / "model.safetensors"))
    return path, flat


@pytest.fixture(scope="module")
def nfnet_start(data_dir, deepmind_file, tmp_path_factory):
    """``(trainer, fresh state)`` of the 1-channel, 10-class tiny NFNet run."""
    config = _nfnet_config(data_dir, deepmind_file[0], ("head",))
    trainer = Trainer(config, str(tmp_path_factory.mktemp("nfnet")))
    return trainer, trainer.init_state()


def _loaded_state(config, workdir):
    """The loop's start: a fresh state, then ``init_from_pretrained`` (also the fresh one)."""
    trainer = Trainer(config, workdir)
    fresh = trainer.init_state()
    state, message = init_from_pretrained(fresh, trainer.model, trainer.tx, config)
    return trainer, fresh, state, message


def test_native_file_new_head_one_adamw_step_resume_ignores_it(data_dir, tmp_path, native_file):
    source, flat = native_file
    path = tmp_path / "copy.safetensors"
    path.write_bytes(open(source, "rb").read())
    config = tiny_nf_config(data_dir)
    config.init_from, config.num_train_steps = str(path), 2
    trainer, fresh, state, message = _loaded_state(config, str(tmp_path / "a"))
    assert message == f"initialised from {path}, kept fresh: head"
    got, new = _flat({"params": state.params}), _flat({"params": fresh.params})
    assert set(got) == set(flat)
    for p, array in flat.items():
        if p[1] == "head":  # the fresh classifier, 10 classes
            np.testing.assert_array_equal(got[p], new[p])
        else:
            np.testing.assert_array_equal(got[p], array, err_msg=str(p))
    assert got["params", "head", "kernel"].shape == (16, 10)
    assert flat["params", "head", "kernel"].shape == (16, 5)

    # One AdamW step of the loop from there: Adam's bias-corrected first update is
    # m/sqrt(v) = g/|g| (|.| <= 1), so each leaf moves by at most lr * (1 + wd * |x|).
    workdir = str(tmp_path / "run")
    first, after_one = run(config, workdir, stop_at_step=1)
    assert first == {"interrupted": True, "steps": 1} and int(after_one.num_skipped) == 0
    lr, wd = config.learning_rate, config.weight_decay
    out = _flat({"params": after_one.params})
    far = 0
    for p, array in flat.items():
        if p[1] == "head":
            assert out[p].shape == new[p].shape
            continue
        bound = lr * (1 + wd * np.abs(array)) * (1 + 1e-4) + 1e-7
        assert np.all(np.abs(out[p] - array) <= bound), p
        far += int(np.max(np.abs(new[p] - array)) > 3 * lr)
    assert far >= 0.75 * (len(flat) - 2)  # the file is far from the fresh init: this can fail

    path.unlink()  # the resumed run must not read init_from again
    summary, final = run(config, workdir)
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    assert np.isfinite(summary["test_loss"])

    # The finished workdir as init_from: its last checkpoint, the head included.
    again = tiny_nf_config(data_dir)
    again.init_from, again.init_exclude = workdir, ()
    state, _ = init_from_pretrained(fresh, trainer.model, trainer.tx, again)
    got, want = _flat(state.params), _flat(final.params)
    assert set(got) == set(want)
    for p in want:
        np.testing.assert_array_equal(got[p], want[p], err_msg=str(p))


@pytest.mark.parametrize("name", ["tiny_haiku.npz", "model.safetensors"])
def test_deepmind_and_timm_files_into_one_channel_nfnet(name, data_dir, deepmind_file, nfnet_start):
    path, flat = deepmind_file
    path = os.path.join(os.path.dirname(path), name)
    config = _nfnet_config(data_dir, path, ("head,stem_conv0/kernel",))
    assert exclude_patterns(config) == ("head", "stem_conv0/kernel")
    trainer, fresh = nfnet_start
    state, _ = init_from_pretrained(fresh, trainer.model, trainer.tx, config)
    got, new = _flat({"params": state.params}), _flat({"params": fresh.params})
    kept = {("params", "head", "kernel"), ("params", "head", "bias"),
            ("params", "stem_conv0", "kernel")}  # fmt: skip
    for p, array in flat.items():
        if p in kept:
            np.testing.assert_array_equal(got[p], new[p])
        else:
            np.testing.assert_array_equal(got[p], array, err_msg=str(p))
    assert got["params", "stem_conv0", "kernel"].shape == (3, 3, 1, 16)
    assert got["params", "head", "kernel"].shape == (64, 10)


def test_mismatched_shapes_name_the_leaves_and_init_exclude(
    data_dir, tmp_path, deepmind_file, nfnet_start
):
    path, _ = deepmind_file
    config = _nfnet_config(data_dir, path, ("head",))
    with pytest.raises(ConfigError) as err:
        run(config, str(tmp_path / "a"))
    message = str(err.value)
    assert "\n" not in message
    assert "mis-shaped 1: params/stem_conv0/kernel (3, 3, 3, 16) (model (3, 3, 1, 16))" in message
    assert "--config.init_exclude" in message
    assert not os.listdir(tmp_path / "a" / "checkpoints")  # nothing trained

    trainer, fresh = nfnet_start  # the same checks the loop runs, without rebuilding it
    config.init_exclude = ("head", "hed")
    with pytest.raises(ConfigError, match=r"config.init_exclude=\('head', 'hed'\).*\['hed'\]"):
        init_from_pretrained(fresh, trainer.model, trainer.tx, config)
    config.init_exclude = ("head",)
    nf_resnet = create_model("nf_resnet26_small", num_classes=10)
    with pytest.raises(ConfigError, match="exist only for NFNets") as err:
        init_from_pretrained(fresh, nf_resnet, trainer.tx, config)
    assert "\n" not in str(err.value)


def test_missing_file_fails_before_the_data_loads(tmp_path):
    config = tiny_nf_config(str(tmp_path / "no-data"))
    config.init_from = str(tmp_path / "nfnet_f0.safetensors")
    with pytest.raises(ConfigError) as err:
        run(config, str(tmp_path / "run"))
    message = str(err.value)
    assert "\n" not in message and "no such file or directory" in message
    assert "python -m nfnets.pretrained convert" in message
    (tmp_path / "junk.bin").write_bytes(b"not weights")
    config.init_from = str(tmp_path / "junk.bin")
    with pytest.raises(ConfigError, match="neither a safetensors file nor a pickle"):
        run(config, str(tmp_path / "run"))


def test_train_py_prints_one_line(data_dir, tmp_path):
    missing = tmp_path / "none.npz"
    cmd = [sys.executable, "train.py", "--workdir", str(tmp_path / "run"),
           f"--config.data_dir={data_dir}", f"--config.init_from={missing}"]  # fmt: skip
    env = subprocess_env(1)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("train.py: error: config.init_from=")
    assert "Traceback" not in out.stderr and "no such file" in lines[-1]


def test_finetune_config_and_f0_feature_sizes_at_32px():
    """The documented sizes: at 32x32 F0's stages see 8, 4, 2, 1 pixels; 32 is the minimum."""
    config = finetune_nfnet_f0.get_config()
    assert (config.model, config.dataset, config.init_exclude) == ("nfnet_f0", "cifar10", ("head",))
    assert config.init_from.endswith(".safetensors")
    model = create_model("nfnet_f0", num_classes=10)
    assert model.min_image_size == 32

    def sizes(size):
        init = lambda: model.init_with_output(
            jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False,
            capture_intermediates=True,
        )  # fmt: skip
        inter = jax.eval_shape(init)[1]["intermediates"]
        names = ("stem_conv0", "stage0_block0", "stage1_block0", "stage2_block0",
                 "stage3_block2", "final_conv")  # fmt: skip
        return [jax.tree.leaves(inter[n])[0].shape[1] for n in names]

    assert sizes(32) == [16, 8, 4, 2, 1, 1]
    assert sizes(192) == [96, 48, 24, 12, 6, 6]
    with pytest.raises(ValueError, match="minimum image size is 32x32"):
        sizes(28)
