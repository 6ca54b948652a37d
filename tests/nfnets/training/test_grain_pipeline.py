"""The grain input path on a tiny ImageNet prepared as TFDS array_record in the test:
the same batches in the same order for any worker count, exact resume, disjoint and
covering per-process shards, and the dispatch the training loop uses. References:
the numpy `pipeline.train_iterator`, and PIL + the normalization formula directly."""

import numpy as np
import PIL.Image
import pytest

from benchmarks.pipeline_bench import prepare_fake_imagenet
from configs import default
from nfnets.training import augment as aug
from nfnets.training import datasets, grain_pipeline, pipeline
from nfnets.training.plan import ConfigError
from tests.nfnets.training.test_pipeline import assert_batches_equal, indexed_dataset

N_TRAIN, SIZE = 12, 16
FULL = aug.Augment(flip=True, inception_crop=True, mixup_alpha=0.2, cutmix_alpha=1.0)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> datasets.SourceDataset:
    """A dozen JPEGs of 20..39 pixels a side, read back lazily (a `SourceDataset`)."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(20, 40, (N_TRAIN, 2))
    train = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    data_dir = tmp_path_factory.mktemp("imagenet")
    prepare_fake_imagenet(data_dir, {"train": train, "validation": train[:2]})
    ds = datasets.load_dataset("imagenet2012", split="train", data_dir=data_dir)
    assert isinstance(ds, datasets.SourceDataset) and len(ds) == N_TRAIN
    return ds


def center_crops(ds: datasets.SourceDataset) -> np.ndarray:
    """Every example's eval center crop to SIZE, normalized, with PIL and the formula."""
    out = []
    for i in range(len(ds)):
        image = np.asarray(ds.source[i]["image"])
        h, w = image.shape[:2]
        side = round(min(h, w) * SIZE / (SIZE + 32))
        top, left = (h - side) // 2, (w - side) // 2
        crop = PIL.Image.fromarray(image).crop((left, top, left + side, top + side))
        x = np.asarray(crop.resize((SIZE, SIZE), PIL.Image.Resampling.BICUBIC), np.float64)
        out.append((x / 255 - np.array(ds.info.mean)) / np.array(ds.info.std))
    return np.stack(out)


def example_ids(batch, crops) -> list[int]:
    """Which example each row of an unaugmented batch is (nearest reference crop)."""
    dist = ((batch["image"][:, None].astype(np.float64) - crops[None]) ** 2).sum(axis=(2, 3, 4))
    assert (dist.min(axis=1) < 1e-6).all(), dist.min(axis=1)
    return list(dist.argmin(axis=1))


def take_grain(ds, k, **kw):
    it = grain_pipeline.grain_train_iterator(ds, **kw)
    try:
        return [next(it) for _ in range(k)]
    finally:
        it.close()


@pytest.mark.slow  # starts worker processes (seconds each: they import grain and tfds)
def test_same_batches_in_the_same_order_for_any_worker_count(imagenet):
    """7 steps over 3 epochs (3 steps each) with every augmentation and MixUp/CutMix."""
    kw = dict(global_batch_size=4, seed=3, augment=FULL, image_size=SIZE, num_steps=7)
    reference = list(pipeline.train_iterator(imagenet, **kw))
    assert all(b["label_probs"].shape == (4, 1000) for b in reference)
    for workers, threads in ((0, 0), (0, 2), (2, 2)):  # 1 worker: the resume test
        got = list(
            grain_pipeline.grain_train_iterator(
                imagenet, num_workers=workers, num_threads=threads, **kw
            )
        )
        assert_batches_equal(got, reference)
    other_seed = take_grain(imagenet, 1, **{**kw, "seed": 4})
    assert not np.array_equal(other_seed[0]["image"], reference[0]["image"])


def test_batches_are_the_shuffled_examples_with_labels(imagenet):
    """Unaugmented: step s holds examples epoch_permutation(seed, epoch)[rows], center-cropped."""
    crops = center_crops(imagenet)
    labels = np.array([imagenet.source[i]["label"] for i in range(N_TRAIN)])
    batches = take_grain(imagenet, 6, global_batch_size=4, seed=5, image_size=SIZE)
    for step, batch in enumerate(batches):
        order = pipeline.epoch_permutation(N_TRAIN, 5, step // 3)
        expected = order[(step % 3) * 4 : (step % 3) * 4 + 4]
        np.testing.assert_allclose(batch["image"], crops[expected], atol=1e-5)
        np.testing.assert_array_equal(batch["label"], labels[expected])


@pytest.mark.slow  # starts a worker process
def test_resume_from_a_step_repeats_the_uninterrupted_stream(imagenet):
    kw = dict(global_batch_size=4, seed=1, augment=FULL, image_size=SIZE)
    full = take_grain(imagenet, 8, num_workers=0, **kw)
    for k in (2, 3, 7):  # inside an epoch, at an epoch boundary, in the third epoch
        assert_batches_equal(take_grain(imagenet, 8 - k, start_step=k, **kw), full[k:])
    resumed = list(
        grain_pipeline.grain_train_iterator(
            imagenet, start_step=4, num_steps=8, num_workers=2, **kw
        )
    )
    assert_batches_equal(resumed, full[4:])


@pytest.mark.parametrize("process_count", [2, 3])
def test_process_shards_are_disjoint_and_cover_each_epoch(imagenet, process_count):
    crops = center_crops(imagenet)
    kw = dict(global_batch_size=6, seed=2, image_size=SIZE, num_steps=4)  # 2 steps per epoch
    single = list(grain_pipeline.grain_train_iterator(imagenet, **kw))
    parts = [
        list(
            grain_pipeline.grain_train_iterator(
                imagenet, process_index=p, process_count=process_count, **kw
            )
        )
        for p in range(process_count)
    ]
    for step in range(4):
        rows = [part[step] for part in parts]
        assert all(len(r["label"]) == 6 // process_count for r in rows)
        joined = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
        assert_batches_equal([joined], [single[step]])
    for epoch in range(2):
        ids = [
            i for p in parts for b in p[2 * epoch : 2 * epoch + 2] for i in example_ids(b, crops)
        ]
        assert sorted(ids) == list(range(N_TRAIN))  # each example once: disjoint and covering


def test_argument_errors_are_raised_before_any_worker_starts(imagenet):
    kw = dict(global_batch_size=4, seed=0, num_workers=2)
    with pytest.raises(ValueError, match="num_workers must be an int >= 0"):
        grain_pipeline.grain_train_iterator(imagenet, **{**kw, "num_workers": -1})
    with pytest.raises(ValueError, match="exceeds the 12 training examples"):
        grain_pipeline.grain_train_iterator(imagenet, **{**kw, "global_batch_size": 16})
    with pytest.raises(ValueError, match="process_count"):
        grain_pipeline.grain_train_iterator(imagenet, **kw, process_index=2, process_count=2)


def test_make_train_iterator_dispatch(imagenet, monkeypatch):
    calls = []

    def fake_grain(dataset, *, num_workers, **kw):
        calls.append(num_workers)
        return pipeline.train_iterator(dataset, **kw)

    monkeypatch.setattr(grain_pipeline, "grain_train_iterator", fake_grain)
    config = default.get_config()
    config.batch_size, config.image_size = 4, SIZE
    args = dict(start_step=1, num_steps=3, process_index=0, process_count=1)
    in_memory = indexed_dataset(10, shape=(6, 6, 1))
    config.image_size = 0
    grain_pipeline.make_train_iterator(in_memory, config, **args)
    assert calls == []  # auto: an in-memory split stays on the numpy path
    config.image_size, config.data_workers = SIZE, 3
    got = list(grain_pipeline.make_train_iterator(imagenet, config, **args))
    assert calls == [3]  # auto: a record-by-record split goes through grain
    config.input_pipeline = "numpy"
    assert_batches_equal(got, list(grain_pipeline.make_train_iterator(imagenet, config, **args)))
    assert calls == [3]
    config.input_pipeline, config.image_size, config.data_workers = "grain", 0, -1
    grain_pipeline.make_train_iterator(in_memory, config, **args)
    assert calls == [3, grain_pipeline.resolve_workers(-1)] and calls[1] >= 1
    for key, value, message in (
        ("input_pipeline", "tf.data", "use one of"),
        ("data_workers", -2, "give -1"),
    ):
        bad = default.get_config()
        bad[key] = value
        with pytest.raises(ConfigError, match=f"config.{key}=.*{message}"):
            grain_pipeline.make_train_iterator(in_memory, bad, **args)


def test_in_memory_data_through_grain_matches_numpy():
    """The grain path also takes in-memory splits (pad-crop + flip + MixUp) unchanged."""
    ds = indexed_dataset(20, shape=(6, 6, 2), num_classes=20)
    augment = aug.Augment(crop_padding=1, flip=True, mixup_alpha=0.4)
    kw = dict(global_batch_size=4, seed=9, augment=augment, start_step=3, num_steps=9)
    assert_batches_equal(
        list(grain_pipeline.grain_train_iterator(ds, num_threads=2, **kw)),
        list(pipeline.train_iterator(ds, **kw)),
    )


def test_the_training_loop_feeds_the_same_batches_through_grain(data_dir):
    """`Trainer.train_batches` (the loop's iterator) with input_pipeline grain vs numpy."""
    from nfnets.training.loop import Trainer
    from tests.nfnets.training.tiny_config import tiny_nf_config

    streams = []
    for choice in ("numpy", "grain"):
        config = tiny_nf_config(data_dir)
        config.augment.crop_padding, config.augment.flip = 2, True
        config.input_pipeline, config.data_workers = choice, 0
        trainer = Trainer(config, workdir="")
        streams.append(list(trainer.train_batches(start_step=2, num_steps=6)))
    assert_batches_equal(*streams)
    devices = trainer.plan.local_devices
    assert streams[0][0]["image"].shape[:2] == (devices, 16 // devices)
