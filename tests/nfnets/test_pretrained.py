"""nfnets.pretrained: DeepMind / timm / native formats, safety of the pickle reader, merging.

The files are written here, by writers of the test's own that follow the published
names (DeepMind: haiku module paths, HWIO; timm: PyTorch state dict, OIHW), so no
network is needed. The F0 name tables are checked against the counts measured on
the reference implementations: 94 DeepMind modules, 233 tensors, 71,489,284
parameters.
"""

import functools
import os
import pickle
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from nfnets.nfnet import NFNet
from nfnets.pretrained import (
    UnsafePickleError,
    deepmind_table,
    detect_format,
    file_metadata,
    load,
    load_any,
    load_deepmind,
    load_timm,
    merge_pretrained,
    safe_load,
    save,
    timm_table,
)
from nfnets.pretrained.__main__ import main
from nfnets.registry import create_model

TINY = dict(widths=(16, 32), depths=(1, 2), group_width=8, stem_width=8, num_classes=5)
F0_DEPTHS = (1, 2, 6, 3)


def _random_params(model, seed=0):
    """Our ``{path tuple: float32 array}`` for ``model``, every leaf distinct noise."""
    size = model.min_image_size
    tree = jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
    )
    rng = np.random.default_rng(seed)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
    return {p: rng.standard_normal(leaf.shape, dtype=np.float32) for p, leaf in flat.items()}


def _blocks(flat):
    names = sorted({p[1] for p in flat if p[1].startswith("stage")}, key=_stage_block)
    return {name: i for i, name in enumerate(names)}


def _stage_block(name):
    stage, block = name.removeprefix("stage").split("_block")
    return int(stage), int(block)


def _to_deepmind(flat):
    """The haiku dict DeepMind's code would hold for our ``flat`` params."""
    conv = {"kernel": "w", "gain": "gain", "bias": "bias"}
    dense = {"kernel": "w", "bias": "b"}
    index = _blocks(flat)
    out = {}
    for path, array in flat.items():
        _, top, *rest = path
        if top in index:
            module = "NFNet/~/nf_block" + (f"_{index[top]}" if index[top] else "")
            if rest == ["skip_gain"]:
                name = "skip_gain"
            elif rest[0] == "se":
                lin = "linear" if rest[1] == "fc0" else "linear_1"
                module, name = f"{module}/~/squeeze_excite/~/{lin}", dense[rest[2]]
            else:
                module, name = f"{module}/~/{rest[0]}", conv[rest[1]]
        elif top == "head":
            module, name = "NFNet/~/linear", dense[rest[0]]
        else:
            module, name = f"NFNet/~/{top}", conv[rest[0]]
        out.setdefault(module, {})[name] = array
    return out


def _to_timm(flat):
    """timm's dm_nfnet state dict (numpy, OIHW) for our ``flat`` params."""
    convs = {"conv0": "conv1", "conv1": "conv2", "conv1b": "conv2b", "conv2": "conv3",
             "conv_shortcut": "downsample.conv"}  # fmt: skip
    param = {"kernel": "weight", "gain": "gain", "bias": "bias"}
    out = {}
    for path, a in flat.items():
        _, top, *rest = path
        if top.startswith("stage"):
            s, b = _stage_block(top)
            if rest == ["skip_gain"]:
                key, a = f"stages.{s}.{b}.skipinit_gain", a
            elif rest[0] == "se":
                fc = "fc1" if rest[1] == "fc0" else "fc2"
                key = f"stages.{s}.{b}.attn_last.{fc}.{param[rest[2]]}"
                a = a.T[:, :, None, None] if a.ndim == 2 else a
            else:
                key, leaf = f"stages.{s}.{b}.{convs[rest[0]]}", rest[1]
                key = f"{key}.{param[leaf]}"
        elif top == "head":
            key = f"head.fc.{param[rest[0]]}"
            a = a.T if a.ndim == 2 else a
        else:
            stem = f"stem.conv{int(top[-1]) + 1}" if top.startswith("stem") else top
            key = f"{stem}.{param[rest[-1]]}"
        if key.endswith(".weight") and a.ndim == 4 and "attn_last" not in key:
            a = np.transpose(a, (3, 2, 0, 1))
        elif key.endswith(".gain"):
            a = a.reshape(-1, 1, 1, 1)
        out[key] = np.array(a, order="C")  # ascontiguousarray would make () -> (1,)
    return out


def _nested(flat):
    return flax.traverse_util.unflatten_dict(flat)


def _assert_same(variables, flat):
    got = flax.traverse_util.flatten_dict(variables)
    assert set(got) == set(flat)
    for path, array in flat.items():
        assert got[path].dtype == np.float32, path
        np.testing.assert_array_equal(got[path], array, err_msg=str(path))


@pytest.fixture(scope="module")
def tiny():
    model = NFNet(**TINY)
    return model, _random_params(model)


@pytest.fixture(scope="module")
def f0_files(tmp_path_factory):
    """Real-shaped F0 with random weights, in DeepMind's and timm's formats."""
    flat = _random_params(create_model("nfnet_f0"), seed=1)
    root = tmp_path_factory.mktemp("f0")
    with open(root / "F0_haiku.npz", "wb") as f:
        pickle.dump(_to_deepmind(flat), f, protocol=4)
    safetensors.numpy.save_file(_to_timm(flat), str(root / "model.safetensors"))
    return flat, root / "F0_haiku.npz", root / "model.safetensors"


# --- name tables --------------------------------------------------------------------


def test_f0_tables_cover_94_deepmind_modules_and_233_timm_tensors_one_to_one():
    model = create_model("nfnet_f0")
    dm, tm = deepmind_table(model), timm_table(model)
    assert len(dm) == len(tm) == 233
    assert {leaf.path for leaf in dm} == {leaf.path for leaf in tm}
    assert sum(int(np.prod(leaf.shape)) for leaf in dm) == 71_489_284
    starts = {0, 1, 3, 9}  # first block of each stage: a conv_shortcut
    modules = {f"NFNet/~/stem_conv{k}" for k in range(4)} | {"NFNet/~/final_conv", "NFNet/~/linear"}
    for i in range(12):
        block = "NFNet/~/nf_block" + (f"_{i}" if i else "")
        subs = ["conv0", "conv1", "conv1b", "conv2", "squeeze_excite/~/linear"]
        subs += ["squeeze_excite/~/linear_1"] + (["conv_shortcut"] if i in starts else [])
        modules |= {block} | {f"{block}/~/{s}" for s in subs}
    assert len(modules) == 94
    assert {leaf.key.rsplit("/", 1)[0] for leaf in dm} == modules
    keys = {f"stem.conv{k}.{p}" for k in range(1, 5) for p in ("weight", "gain", "bias")}
    keys |= {f"final_conv.{p}" for p in ("weight", "gain", "bias")} | {
        "head.fc.weight",
        "head.fc.bias",
    }
    for s, depth in enumerate(F0_DEPTHS):
        for b in range(depth):
            convs = ["conv1", "conv2", "conv2b", "conv3"] + (["downsample.conv"] if b == 0 else [])
            keys |= {f"stages.{s}.{b}.{c}.{p}" for c in convs for p in ("weight", "gain", "bias")}
            keys |= {
                f"stages.{s}.{b}.attn_last.fc{k}.{p}" for k in (1, 2) for p in ("weight", "bias")
            }
            keys.add(f"stages.{s}.{b}.skipinit_gain")
    assert {leaf.key for leaf in tm} == keys
    dm_shapes = {leaf.key: leaf.source_shape for leaf in dm}
    assert dm_shapes["NFNet/~/stem_conv0/w"] == (3, 3, 3, 16)
    assert dm_shapes["NFNet/~/nf_block_3/~/conv_shortcut/w"] == (1, 1, 512, 1536)
    assert dm_shapes["NFNet/~/nf_block_3/~/squeeze_excite/~/linear_1/w"] == (768, 1536)
    assert dm_shapes["NFNet/~/nf_block_11/skip_gain"] == ()
    assert dm_shapes["NFNet/~/linear/w"] == (3072, 1000)
    tm_shapes = {leaf.key: leaf.source_shape for leaf in tm}
    assert tm_shapes["stem.conv1.weight"] == (16, 3, 3, 3)
    assert tm_shapes["stem.conv4.gain"] == (128, 1, 1, 1)
    assert tm_shapes["stages.0.0.downsample.conv.weight"] == (256, 128, 1, 1)
    assert tm_shapes["stages.2.0.conv2.weight"] == (768, 128, 3, 3)
    assert tm_shapes["stages.3.2.attn_last.fc1.weight"] == (768, 1536, 1, 1)
    assert tm_shapes["stages.3.2.skipinit_gain"] == ()
    assert tm_shapes["head.fc.weight"] == (1000, 3072)


# --- DeepMind's format --------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_deepmind_round_trip_tiny(tmp_path, tiny, protocol):
    model, flat = tiny
    path = tmp_path / "tiny_haiku.npz"
    with open(path, "wb") as f:
        pickle.dump(_to_deepmind(flat), f, protocol=protocol)
    _assert_same(load_deepmind(path, model), flat)


@pytest.mark.slow
def test_deepmind_f0_file_infers_variant(f0_files):
    flat, dm_path, _ = f0_files
    _assert_same(load_deepmind(dm_path), flat)
    _assert_same(load_deepmind(dm_path, "f0"), flat)
    with pytest.raises(ValueError) as err:
        load_deepmind(dm_path, "f1")  # F1 has 24 blocks, stages starting at 0, 2, 6, 18
    assert "NFNet/~/nf_block_23/skip_gain" in str(err.value)
    assert "extra 9: NFNet/~/nf_block_1/~/conv_shortcut/bias" in str(err.value)


class _System:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Eval:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return eval, (self.code,)


@pytest.mark.parametrize("payload", ["system", "eval"])
def test_deepmind_refuses_malicious_global_without_running_it(tmp_path, tiny, payload):
    _, flat = tiny
    marker = tmp_path / "pwned"
    tree = _to_deepmind(flat)
    if payload == "system":
        evil, name = _System(f"touch {marker}"), f"{os.system.__module__}.system"
    else:
        evil, name = _Eval(f"open({str(marker)!r}, 'w').close()"), "builtins.eval"
    tree["NFNet/~/linear"]["b"] = evil  # after many arrays the reader has admitted
    path = tmp_path / "evil.npz"
    with open(path, "wb") as f:
        pickle.dump(tree, f, protocol=4)
    assert name.split(".")[-1].encode() in path.read_bytes()  # the payload is in the file
    with pytest.raises(UnsafePickleError, match=rf"refused global {name}"):
        load_deepmind(path, NFNet(**TINY))
    assert not marker.exists()


@pytest.mark.parametrize(
    "data, refused",
    [
        (b"c_codecs\nencode\n(Vabc\nVrot13\ntR.", "encoding 'rot13'"),  # only latin1
        (b"(ios\nsystem\nVtrue\nb.", "refused global os.system"),  # protocol-0 INST
        (b"\x80\x02X\x01\x00\x00\x00xQ.", "persistent id"),  # BINPERSID
        (b"cbuiltins\ngetattr\n.", "refused global builtins.getattr"),
    ],
)
def test_safe_load_refuses_codecs_inst_and_persistent_ids(data, refused):
    with pytest.raises(UnsafePickleError, match=refused):
        safe_load(data)


def test_deepmind_refuses_object_arrays_and_real_npz(tmp_path):
    path = tmp_path / "obj.npz"
    with open(path, "wb") as f:
        pickle.dump({"NFNet/~/linear": {"w": np.array([{"a": 1}], dtype=object)}}, f)
    with pytest.raises(UnsafePickleError, match="dtype object"):
        load_deepmind(path)
    np.savez(tmp_path / "real.npz", w=np.zeros(3))
    with pytest.raises(ValueError, match="zip archive"):
        load_deepmind(tmp_path / "real.npz")


def test_deepmind_errors_name_every_missing_extra_and_misshaped(tmp_path, tiny):
    model, flat = tiny
    tree = _to_deepmind(flat)
    del tree["NFNet/~/nf_block_2/~/conv1b"]["gain"]
    tree["NFNet/~/nf_block_1/~/conv0"]["w"] = np.zeros((1, 1, 3, 3), np.float32)
    tree["NFNet/~/extra"] = {"w": np.zeros(2, np.float32)}
    path = tmp_path / "bad.npz"
    with open(path, "wb") as f:
        pickle.dump(tree, f)
    with pytest.raises(ValueError) as err:
        load_deepmind(path, model)
    message = str(err.value)
    assert "missing 1: NFNet/~/nf_block_2/~/conv1b/gain" in message
    assert "extra 1: NFNet/~/extra/w" in message
    assert "mis-shaped 1: NFNet/~/nf_block_1/~/conv0/w (1, 1, 3, 3)" in message


# --- timm's format ------------------------------------------------------------------


def test_timm_round_trip_tiny(tmp_path, tiny):
    model, flat = tiny
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(_to_timm(flat), str(path))
    variables = load_timm(path, model)
    _assert_same(variables, flat)
    assert detect_format(path) == "timm"


def test_timm_errors_name_missing_and_misshaped(tmp_path, tiny):
    model, flat = tiny
    tensors = _to_timm(flat)
    del tensors["stages.1.1.attn_last.fc2.bias"]
    tensors["stem.conv1.weight"] = np.zeros((16, 3, 3, 2), np.float32)
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(tensors, str(path))
    with pytest.raises(ValueError) as err:
        load_timm(path, model)
    message = str(err.value)
    assert "missing 1: stages.1.1.attn_last.fc2.bias" in message
    assert "mis-shaped 1: stem.conv1.weight (16, 3, 3, 2) (expected (16, 3, 3, 3))" in message


@pytest.mark.parametrize("name", ["nf_resnet50", "timm/nf_regnet_b1.ra2_in1k"])
def test_timm_rejects_nf_resnets(name):
    with pytest.raises(ValueError, match="different architecture"):
        load_timm("no-such-file.safetensors", name)
    with pytest.raises(ValueError, match="only dm_nfnet_f0..dm_nfnet_f6"):
        load_timm("no-such-file.safetensors", "eca_nfnet_l0")


@pytest.mark.slow
def test_timm_f0_file_by_name_and_inferred(f0_files):
    flat, _, timm_path = f0_files
    _assert_same(load_timm(timm_path, "timm/dm_nfnet_f0.dm_in1k"), flat)
    _assert_same(load_any(timm_path), flat)


# --- native files, load_any, merge ----------------------------------------------------


def test_save_load_round_trip_and_detection(tmp_path, tiny):
    model, flat = tiny
    path = tmp_path / "ours.safetensors"
    save(_nested(flat), path, metadata={"model": "tiny"})
    assert file_metadata(path) == {"format": "nfnets-norms", "model": "tiny"}
    assert "params/stage1_block1/se/fc0/kernel" in safetensors.numpy.load_file(str(path))
    _assert_same(load(path), flat)
    assert detect_format(path) == "native"
    _assert_same(load_any(path), flat)
    timm_path = tmp_path / "timm.safetensors"
    safetensors.numpy.save_file(_to_timm(flat), str(timm_path))
    with pytest.raises(ValueError, match="not written by nfnets.pretrained.save"):
        load(timm_path)
    (tmp_path / "junk").write_bytes(b"hello world, not a weight file")
    with pytest.raises(ValueError, match="neither a safetensors file nor a pickle"):
        detect_format(tmp_path / "junk")


def test_merge_pretrained_keeps_fresh_head_and_checks_shapes(tiny):
    _, flat = tiny
    loaded = _nested(flat)
    model = NFNet(**{**TINY, "num_classes": 7})
    init = _nested(_random_params(model, seed=3))  # stands for a fresh model.init
    merged = merge_pretrained(flax.core.freeze(init), loaded, exclude=("head",))
    assert isinstance(merged, flax.core.FrozenDict)
    got = flax.traverse_util.flatten_dict(flax.core.unfreeze(merged))
    fresh = flax.traverse_util.flatten_dict(init)
    for path, array in got.items():
        want = fresh[path] if path[1] == "head" else flat[path]
        np.testing.assert_array_equal(array, want, err_msg=str(path))
    assert got[("params", "head", "kernel")].shape == (64, 7)
    shapes = r"params/head/bias \(5,\) \(model \(7,\)\), params/head/kernel \(64, 5\) \(model"
    with pytest.raises(ValueError, match=f"mis-shaped 2: {shapes}"):
        merge_pretrained(init, loaded, exclude=())
    partial = flax.traverse_util.unflatten_dict(
        {p: a for p, a in flat.items() if p[1] != "final_conv"}
    )
    with pytest.raises(ValueError, match="missing 3: params/final_conv/bias"):
        merge_pretrained(init, partial)
    with pytest.raises(ValueError, match=r"\['params/heads'\] match no variable"):
        merge_pretrained(init, loaded, exclude=("params/heads",))


# --- command line -------------------------------------------------------------------


@pytest.mark.slow
def test_cli_convert_both_formats(tmp_path, f0_files, capsys):
    flat, dm_path, timm_path = f0_files
    out = tmp_path / "deepmind.safetensors"
    command = [sys.executable, "-m", "nfnets.pretrained", "convert", "--from", "deepmind"]
    run = subprocess.run(
        [*command, str(dm_path), "--to", str(out)], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
    assert "233 tensors, 71,489,284 parameters" in run.stdout
    _assert_same(load(out), flat)
    assert file_metadata(out)["source"] == "deepmind"
    out = tmp_path / "timm.safetensors"
    assert main(["convert", "--from", "timm", str(timm_path), "--to", str(out)]) == 0
    assert "233 tensors, 71,489,284 parameters" in capsys.readouterr().out
    _assert_same(load(out), flat)


def test_cli_user_errors_are_one_line(tmp_path, tiny, capsys):
    _, flat = tiny
    evil = _to_deepmind(flat)
    evil["NFNet/~/linear"]["b"] = _System(f"touch {tmp_path / 'pwned'}")
    with open(tmp_path / "evil.npz", "wb") as f:
        pickle.dump(evil, f)
    cases = [
        (("deepmind", tmp_path / "missing.npz"), "No such file"),
        (("deepmind", tmp_path / "evil.npz"), "refused global"),
        (("timm", tmp_path / "evil.npz", "--variant", "nf_resnet50"), "different architecture"),
    ]
    for (source, path, *rest), text in cases:
        args = ["convert", "--from", source, str(path), "--to", str(tmp_path / "out"), *rest]
        assert main(args) == 2
        stderr = capsys.readouterr().err
        assert stderr.startswith("error: ") and text in stderr, stderr
        assert stderr.count("\n") == 1
    assert not (tmp_path / "pwned").exists()
