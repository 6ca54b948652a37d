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

from nfnets.pretrained import save
from nfnets.registry import create_model
from nfnets.training.init import exclude_patterns, init_from_pretrained
from nfnets.training.loop import Trainer, run
from nfnets.training.plan import ConfigError
from tests.nfnets.test_pretrained import _to_deepmind
from tests.nfnets.training.tiny_config import tiny_nf_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
NFNET_KWARGS = dict(widths=(16, 32), depths=(1, 2), group_width=8, stem_width=8)


def _file_params(model, channels: int, seed: int = 1) -> dict:
    """``{path: array}`` of ``model``'s init at ``seed``, every leaf + N(0, 0.2) noise."""
    x = jnp.zeros((1, 28, 28, channels))
    variables = model.init(jax.random.key(seed), x, train=False)
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
    """A 5-class, 3-channel tiny NFNet, pickled as DeepMind's haiku dict."""
    flat = _file_params(create_model("nfnet_f0", num_classes=5, **NFNET_KWARGS), channels=3)
    path = str(tmp_path_factory.mktemp("dm") / "tiny_haiku.npz")
    with open(path, "wb") as f:
        pickle.dump(_to_deepmind(flat), f, protocol=4)
    return path, flat


def _loaded_state(config, workdir):
    """The loop's start: a fresh state, then ``init_from_pretrained`` (also the fresh one)."""
    trainer = Trainer(config, workdir)
    fresh = trainer.init_state()
    state, message = init_from_pretrained(fresh, trainer.model, trainer.tx, config)
    return trainer, fresh, state, message


def test_native_file_new_head_then_one_adamw_step(data_dir, tmp_path, native_file):
    path, flat = native_file
    config = tiny_nf_config(data_dir)
    config.init_from, config.num_train_steps = path, 1
    _, fresh, state, message = _loaded_state(config, str(tmp_path / "a"))
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
    summary, final = run(config, str(tmp_path / "b"))
    assert summary["steps"] == 1 and summary["skipped_steps"] == 0
    lr, wd = config.learning_rate, config.weight_decay
    out = _flat({"params": final.params})
    far = 0
    for p, array in flat.items():
        if p[1] == "head":
            assert out[p].shape == new[p].shape
            continue
        bound = lr * (1 + wd * np.abs(array)) * (1 + 1e-4) + 1e-7
        assert np.all(np.abs(out[p] - array) <= bound), p
        far += int(np.max(np.abs(new[p] - array)) > 3 * lr)
    assert far >= 0.75 * (len(flat) - 2)  # the file is far from the fresh init: this can fail


def test_deepmind_file_into_one_channel_nfnet_trains(data_dir, tmp_path, deepmind_file):
    path, flat = deepmind_file
    config = _nfnet_config(data_dir, path, ("head,stem_conv0/kernel",))
    config.num_train_steps = 2
    assert exclude_patterns(config) == ("head", "stem_conv0/kernel")
    _, fresh, state, _ = _loaded_state(config, str(tmp_path / "a"))
    got, new = _flat({"params": state.params}), _flat({"params": fresh.params})
    kept = {("params", "head", "kernel"), ("params", "head", "bias"),
            ("params", "stem_conv0", "kernel")}  # fmt: skip
    for p, array in flat.items():
        if p in kept:
            np.testing.assert_array_equal(got[p], new[p])
        else:
            np.testing.assert_array_equal(got[p], array, err_msg=str(p))
    assert got["params", "stem_conv0", "kernel"].shape == (3, 3, 1, 16)
    assert got["params", "head", "bias"].shape == (10,)

    summary, final = run(config, str(tmp_path / "b"))
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    assert np.isfinite(summary["test_loss"])
    assert final.params["head"]["kernel"].shape == (64, 10)


def test_mismatched_shapes_name_the_leaves_and_init_exclude(data_dir, tmp_path, deepmind_file):
    path, _ = deepmind_file
    config = _nfnet_config(data_dir, path, ("head",))
    with pytest.raises(ConfigError) as err:
        run(config, str(tmp_path / "a"))
    message = str(err.value)
    assert "\n" not in message
    assert "mis-shaped 1: params/stem_conv0/kernel (3, 3, 3, 16) (model (3, 3, 1, 16))" in message
    assert "--config.init_exclude" in message
    assert not os.listdir(tmp_path / "a" / "checkpoints")  # nothing trained

    config.init_exclude = ("head", "hed")
    with pytest.raises(ConfigError, match=r"config.init_exclude=\('head', 'hed'\).*\['hed'\]"):
        run(config, str(tmp_path / "b"))
    nf_resnet = tiny_nf_config(data_dir)
    nf_resnet.init_from = path
    with pytest.raises(ConfigError, match="exist only for NFNets") as err:
        run(nf_resnet, str(tmp_path / "c"))
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
    cmd = [sys.executable, "train.py", "--workdir", str(tmp_path / "run"),
           f"--config.data_dir={data_dir}", f"--config.init_from={tmp_path / 'none.npz'}"]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("train.py: error: config.init_from=")
    assert "Traceback" not in out.stderr and "no such file" in lines[-1]


def test_resume_ignores_init_from_then_workdir_as_init(data_dir, tmp_path, native_file):
    path, _ = native_file
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(open(path, "rb").read())
    config = tiny_nf_config(data_dir)
    config.init_from, config.num_train_steps = str(copy), 2
    workdir = str(tmp_path / "run")
    assert run(config, workdir, stop_at_step=1)[0] == {"interrupted": True, "steps": 1}
    copy.unlink()  # a resumed run must not read it again
    summary, final = run(config, workdir)
    assert summary["steps"] == 2

    # The finished workdir as init_from: its last checkpoint, the head included.
    again = tiny_nf_config(data_dir)
    again.init_from, again.init_exclude = workdir, ()
    _, _, state, _ = _loaded_state(again, str(tmp_path / "next"))
    got, want = _flat(state.params), _flat(final.params)
    assert set(got) == set(want)
    for p in want:
        np.testing.assert_array_equal(got[p], want[p], err_msg=str(p))
