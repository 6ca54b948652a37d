"""The BN doctor: its verdict rules on synthetic reports, and end to end on tiny runs.

The end-to-end runs train a two-stage ResNet-18 v2 (widths 8/16, batch 16) on 8
virtual devices for at most 96 steps on fake Fashion-MNIST IDX files whose class
is the orientation and frequency of a noisy grating (learnable by a small conv
net with global pooling, unlike random pixels).
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from nfnets import doctor as cli
from nfnets.registry import create_model
from nfnets.training import doctor, doctor_report, train
from nfnets.training.actions import checkpoint_meta
from nfnets.training.checkpoints import Checkpointer
from nfnets.training.datasets import FASHION_MNIST_FILES, load_dataset, write_idx
from nfnets.training.loop import Trainer, run
from nfnets.training.pipeline import eval_iterator
from tests.nfnets.training.tiny_config import tiny_bn_config, tiny_nf_config

N_TRAIN, N_TEST = 256, 200
LAYER_KEYS = {
    "name",
    "mean_shift_max",
    "mean_shift_mean",
    "var_log_ratio_max",
    "var_log_ratio_mean",
    "count",
}


def write_gratings(directory: Path, seed: int = 0) -> str:
    """Fashion-MNIST-shaped IDX files: class = grating orientation (5) x frequency (2)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        labels = rng.integers(0, 10, n)
        theta = ((labels % 5) * np.pi / 5)[:, None, None]
        freq = np.where(labels < 5, 0.5, 1.2)[:, None, None]
        phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
        waves = np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy) + phase)
        images = 128 + 80 * waves + rng.normal(0, 40, (n, 28, 28))
        image_file, label_file = FASHION_MNIST_FILES[split]
        write_idx(directory / image_file, np.clip(images, 0, 255).astype(np.uint8))
        write_idx(directory / label_file, labels.astype(np.uint8))
    return str(directory)


@pytest.fixture(scope="module")
def gratings(tmp_path_factory) -> str:
    return write_gratings(tmp_path_factory.mktemp("gratings"))


def bn_config(data_dir: str, norm_kwargs: dict | None = None, **overrides):
    c = tiny_bn_config(data_dir)
    c.tensorboard = False
    c.optimizer, c.learning_rate, c.lr_base_batch_size = "adamw", 0.01, 0
    c.num_train_steps = 96
    c.model_kwargs.norm_kwargs = dict(norm_kwargs or {})
    for key, value in overrides.items():
        c[key] = value
    return c


def check_report(report: dict) -> None:
    """Keys as documented; every evaluation counted each test example exactly once."""
    assert set(report) >= {"layers", "eval", "verdict", "causes"}
    assert report["layers"] and all(set(r) == LAYER_KEYS for r in report["layers"])
    ev = report["eval"]
    assert set(ev) == {"running", "precise_bn", "batch_stats", "batch_stats_by_size"}
    for r in [
        ev["running"],
        ev["precise_bn"],
        ev["batch_stats"],
        *ev["batch_stats_by_size"].values(),
    ]:
        assert r["count"] == N_TEST
        assert 0.0 <= r["accuracy"] <= 1.0 and np.isfinite(r["loss"])
    assert len(report["verdict"]) == len(report["causes"]) >= 1
    assert set(report["causes"]) <= set(doctor_report.CAUSES)


# ----------------------------------------------------------------- end to end


def test_never_updated_on_an_interrupted_run(gratings, tmp_path):
    # momentum=1.0 keeps the old value forever: the PyTorch habit "momentum 0 = frozen"
    # flipped. The run is stopped (checkpoint, no summary.json) half way.
    workdir = str(tmp_path / "run")
    config = bn_config(gratings, {"momentum": 1.0}, num_train_steps=32)
    summary, _ = run(config, workdir, stop_at_step=16)
    assert summary["interrupted"] and not os.path.exists(os.path.join(workdir, "summary.json"))
    report = doctor.diagnose(workdir, batches=4)
    check_report(report)
    assert report["causes"] == ["never_updated"]
    assert report["run"]["step"] == 16 and not report["run"]["finished"]
    assert all(r["count"] == 16 for r in report["layers"])
    assert "never updated" in report["verdict"][0] and "momentum=1" in report["verdict"][0]


def test_stale_running_average(gratings, tmp_path):
    workdir = str(tmp_path / "run")
    train(bn_config(gratings, {"momentum": 0.9999}), workdir)
    report = doctor.diagnose(workdir, batches=8)
    check_report(report)
    assert report["causes"] == ["stale_running_average"]
    ev = report["eval"]
    assert ev["precise_bn"]["accuracy"] > ev["running"]["accuracy"]
    assert max(r["mean_shift_max"] for r in report["layers"]) > doctor_report.SHIFT_SIGMA
    assert "momentum 0.9999 over 96 steps averages over ~10000 steps" in report["verdict"][0]
    # The running-average evaluation is the trainer's own final one.
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["test_accuracy"] == pytest.approx(ev["running"]["accuracy"])


def _reference_batch_stats_accuracy(config, workdir_state, batch: int) -> float:
    """Independent train-mode eval: one device, plain flax, chunks of ``batch`` test images.

    The last chunk is completed with the first test images (scored only once).
    """
    test = load_dataset("fashion_mnist", split="test", data_dir=config.data_dir)
    everything = next(eval_iterator(test, global_batch_size=len(test)))
    images, labels = everything["image"], everything["label"]
    n = len(labels)
    padded = np.concatenate([images, images[: -n % batch]])
    model = create_model(config.model, num_classes=10, **config.model_kwargs.to_dict())
    variables = {"params": workdir_state.params, "batch_stats": workdir_state.batch_stats}
    apply = jax.jit(
        lambda x: model.apply(variables, x, train=True, mutable=["batch_stats"])[0].argmax(-1)
    )
    preds = np.concatenate([apply(padded[i : i + batch]) for i in range(0, len(padded), batch)])
    return float(np.mean(preds[:n] == labels))


def test_healthy_with_syncbn_on_8_devices(gratings, tmp_path):
    assert jax.device_count() == 8
    workdir = str(tmp_path / "run")
    config = bn_config(gratings, {"momentum": 0.9}, sync_batch_stats="all")
    _, state = run(config, workdir)
    report = doctor.diagnose(workdir, batches=8)
    check_report(report)
    assert report["causes"] == ["healthy"]
    # SyncBN over 8 devices x 2 examples normalizes 16 examples; not small: no sweep.
    assert report["eval"]["batch_stats"]["batch_size"] == 16
    assert report["eval"]["batch_stats_by_size"] == {}
    assert max(r["mean_shift_max"] for r in report["layers"]) < doctor_report.SHIFT_SIGMA
    want = _reference_batch_stats_accuracy(config, state, 16)
    assert report["eval"]["batch_stats"]["accuracy"] == pytest.approx(want, abs=1e-6)


def test_unsynced_devices_with_sync_none(gratings, tmp_path, monkeypatch):
    monkeypatch.setattr(doctor, "OTHER_SIZES", (16,))
    workdir = str(tmp_path / "run")
    train(bn_config(gratings, sync_batch_stats="none"), workdir)
    report = doctor.diagnose(workdir, batches=8)
    check_report(report)
    assert report["causes"] == ["unsynced_devices"]
    ev = report["eval"]
    assert ev["batch_stats"]["batch_size"] == 2
    assert set(ev["batch_stats_by_size"]) == {"16"}
    # The batch dependence: 16-example statistics score higher than 2-example ones.
    assert ev["batch_stats_by_size"]["16"]["accuracy"] > ev["batch_stats"]["accuracy"]
    assert "sync_batch_stats=all" in report["verdict"][0]


def test_ghost_batch_2_through_the_command_line(gratings, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(doctor, "OTHER_SIZES", (8, 32))
    workdir, out = str(tmp_path / "run"), str(tmp_path / "out")
    config = bn_config(gratings, {"ghost_batch_size": 2}, sync_batch_stats="none", batch_size=32)
    train(config, workdir)
    capsys.readouterr()
    assert cli.main(["--workdir", workdir, "--batches", "8", "--out", out, "--top", "3"]) == 0
    printed = capsys.readouterr().out
    assert (
        "3 worst of 5 layers" in printed
        and "verdict: the normalization batch is too small" in printed
    )
    with open(os.path.join(out, "doctor.json")) as f:
        report = json.load(f)
    check_report(report)
    assert report["causes"] == ["small_normalization_batch"]
    assert report["eval"]["batch_stats"]["batch_size"] == 2
    assert set(report["eval"]["batch_stats_by_size"]) == {"8", "32"}
    with open(os.path.join(out, "doctor.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_nf_model_gets_one_line(gratings, tmp_path, capsys):
    # A workdir as the trainer leaves it (config.json, a checkpoint); the state is the
    # initial one: the answer does not depend on training.
    workdir = str(tmp_path / "run")
    config = tiny_nf_config(gratings)
    trainer = Trainer(config, workdir)
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort())
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    ckpt.save(0, trainer.init_state(), checkpoint_meta(config, 0.0))
    ckpt.close()
    assert cli.main(["--workdir", workdir]) == 0
    assert capsys.readouterr().out == doctor.NO_BATCH_STATS + "\n"
    assert not os.path.exists(os.path.join(workdir, "doctor.json"))


def test_unusable_workdirs_get_one_line_errors(gratings, tmp_path, capsys):
    def error(workdir) -> str:
        assert cli.main(["--workdir", str(workdir)]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1
        return captured.err

    assert "no such workdir" in error(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "config.json is missing" in error(empty)
    (empty / "config.json").write_text("{not json")
    assert "cannot read" in error(empty)
    (empty / "config.json").write_text(bn_config(gratings).to_json())
    assert "no checkpoint" in error(empty)


# ------------------------------------------------------------------ synthetic


def _layer(name, shift=0.02, var=0.03, count=100):
    return {
        "name": name,
        "mean_shift_max": shift,
        "mean_shift_mean": None if shift is None else shift / 2,
        "var_log_ratio_max": var,
        "var_log_ratio_mean": var / 2,
        "count": count,
    }


def _eval(acc, loss=1.0):
    return {"accuracy": acc, "loss": loss, "count": 1000}


def _case(layers=None, running=0.88, precise=0.88, batch=0.88, **run):
    layers = layers or [_layer("stem_norm"), _layer("stage1/bn1")]
    evals = {
        "running": _eval(running),
        "precise_bn": _eval(precise),
        "batch_stats": _eval(batch),
        "batch_stats_by_size": {},
    }
    facts = {
        "momentum": 0.9,
        "step": 500,
        "normalization_batch": 128,
        "ghost_batch_size": None,
        "sync_batch_stats": "all",
        "num_devices": 1,
        "batch_size": 128,
        "layers_at_init": [],
        **run,
    }
    return layers, evals, facts


def test_judge_healthy():
    causes, verdict = doctor_report.judge(*_case())
    assert causes == ["healthy"] and verdict[0].startswith("healthy")


def test_judge_never_updated_count_zero():
    layers = [_layer("stem_norm", count=0), _layer("stage1/bn1", count=0)]
    causes, verdict = doctor_report.judge(*_case(layers, running=0.1))
    assert causes == ["never_updated"]
    assert verdict[0].startswith("running statistics never updated (count 0) in 2 of 2 layers")


def test_judge_never_updated_at_init_values():
    causes, verdict = doctor_report.judge(
        *_case(momentum=1.0, layers_at_init=["stem_norm", "stage1/bn1"])
    )
    assert causes == ["never_updated"] and "momentum=1 keeps the old value" in verdict[0]


def test_judge_stale_needs_both_a_shift_and_a_cost():
    layers = [_layer("stem_norm"), _layer("stage2/block1/bn2", shift=3.1)]
    causes, verdict = doctor_report.judge(*_case(layers, running=0.62, momentum=0.999))
    assert causes == ["stale_running_average"]
    assert verdict[0].startswith("running averages lag the weights: max mean shift 3.1 sigma in ")
    assert "momentum 0.999 over 500 steps averages over ~1000 steps" in verdict[0]
    assert verdict[0].endswith("use precise_bn_batches=50 or momentum 0.9")
    # Costing nothing, or an accuracy gap without a statistics gap, is no cause.
    assert doctor_report.judge(*_case(layers, momentum=0.999))[0] == ["healthy"]
    assert doctor_report.judge(*_case(running=0.62))[0] == ["healthy"]


def test_judge_stale_by_variance_and_loss():
    layers = [_layer("stem_norm", var=1.2)]
    layers_, evals, run_ = _case(layers)
    evals["running"]["loss"] = 1.3  # 1.3 x the PreciseBN loss, same accuracy
    causes, verdict = doctor_report.judge(layers_, evals, run_)
    assert causes == ["stale_running_average"] and "max |log var ratio| 1.20" in verdict[0]


def test_judge_small_normalization_batch():
    case = _case(batch=0.71, normalization_batch=2, ghost_batch_size=2)
    causes, verdict = doctor_report.judge(*case)
    assert causes == ["small_normalization_batch"]
    assert verdict[0] == (
        "the normalization batch is too small: eval with batch statistics of 2 examples "
        "scores 71.0% vs 88.0% with population statistics; use group_norm, "
        "sync_batch_stats=all, or batch_renorm"
    )
    # The same gap at a normalization batch of 16 is not blamed on the batch size.
    assert doctor_report.judge(*_case(batch=0.71, normalization_batch=16))[0] == ["healthy"]


def test_judge_unsynced_devices_and_two_causes():
    layers = [_layer("stem_norm", shift=2.0)]
    case = _case(
        layers,
        running=0.5,
        batch=0.6,
        normalization_batch=2,
        sync_batch_stats="none",
        num_devices=8,
        batch_size=16,
    )
    causes, verdict = doctor_report.judge(*case)
    assert causes == ["stale_running_average", "unsynced_devices"]
    assert "sync_batch_stats=all (SyncBN over the global batch of 16)" in verdict[1]


def test_normalization_batch_and_sizes():
    plan = types.SimpleNamespace(num_devices=8, per_device_batch=4)
    ghost = {"a": types.SimpleNamespace(ghost_batch_size=2)}
    plain = {"a": types.SimpleNamespace(ghost_batch_size=None)}

    def config(sync, group=0):
        return types.SimpleNamespace(sync_batch_stats=sync, sync_group_size=group)

    assert doctor.normalization_batch(config("all"), plan, plain) == (32, None)
    assert doctor.normalization_batch(config("none"), plan, plain) == (4, None)
    assert doctor.normalization_batch(config("groups", 2), plan, plain) == (8, None)
    assert doctor.normalization_batch(config("none"), plan, ghost) == (2, 2)
    assert doctor.normalization_batch(config("all"), plan, ghost) == (16, 2)
    assert doctor.other_sizes(8, 100) == [2, 32]


def test_report_text_json_and_figure(tmp_path):
    layers, evals, facts = _case([_layer("stem_norm", shift=None), _layer("stage1/bn1", 3.0)])
    evals["batch_stats_by_size"] = {"32": _eval(0.8)}
    causes, verdict = doctor_report.judge(layers, evals, facts)
    report = {"layers": layers, "eval": evals, "verdict": verdict, "causes": causes, "run": facts}
    text = doctor_report.format_report(report, top=1)
    table = text.split("test split")[0]
    assert "1 worst of 2 layers" in table and "stage1/bn1" in table and "stem_norm" not in table
    assert "batch stats of 32" in text and f"verdict: {verdict[0]}" in text
    paths = doctor_report.write_report(report, str(tmp_path))
    with open(paths[0]) as f:
        assert json.load(f) == report
    with open(paths[1], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
