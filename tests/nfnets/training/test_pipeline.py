"""Batch iterators: deterministic, resumable, per-process slices, exact-once evaluation,
variable-size images, device sharding and prefetch, against plain numpy references."""

import numpy as np
import pytest

from nfnets.training import augment as aug
from nfnets.training import datasets, pipeline


def indexed_dataset(n, shape=(6, 5, 1), num_classes=None):
    """A dataset whose example i has label i and images encoding i (so batches name examples)."""
    rng = np.random.default_rng(n)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    info = datasets.DatasetInfo(
        "fake", "train", n, num_classes or n, shape, (0.5,) * shape[2], (0.25,) * shape[2], "mem"
    )
    return datasets.ArrayDataset(images, np.arange(n, dtype=np.int32), info)


def take(iterator, k):
    return [next(iterator) for _ in range(k)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# ------------------------------------------------------------------------ iteration


def test_shuffle_is_deterministic_and_visits_each_example_once_per_epoch():
    ds = indexed_dataset(23)
    a = take(pipeline.train_iterator(ds, global_batch_size=5, seed=7), 9)
    b = take(pipeline.train_iterator(ds, global_batch_size=5, seed=7), 9)
    c = take(pipeline.train_iterator(ds, global_batch_size=5, seed=8), 9)
    assert_batches_equal(a, b)
    assert any((x["label"] != y["label"]).any() for x, y in zip(a, c, strict=True))
    per_epoch = pipeline.steps_per_epoch(23, 5)
    assert per_epoch == 4  # the last 3 examples of each epoch are dropped
    epochs = [np.concatenate([x["label"] for x in a[e * 4 : e * 4 + 4]]) for e in range(2)]
    for labels in epochs:
        assert len(np.unique(labels)) == 20
    assert not np.array_equal(epochs[0], epochs[1])
    for batch in a:
        assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
        # Pixel (0, 0) encodes the example index: images travel with their labels.
        np.testing.assert_allclose(batch["image"][:, 0, 0, 0], (batch["label"] / 255 - 0.5) / 0.25,
                                   rtol=1e-6, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize(
    "augment",
    [None, aug.Augment(crop_padding=1, flip=True, mixup_alpha=0.4, cutmix_alpha=1.0)],
)
def test_resume_from_step_repeats_the_uninterrupted_stream(augment):
    ds = indexed_dataset(26, shape=(6, 6, 2), num_classes=26)
    kw = dict(global_batch_size=6, seed=1, augment=augment)
    full = take(pipeline.train_iterator(ds, **kw), 11)
    for k in (3, 4, 9):  # inside an epoch, at an epoch boundary, in the third epoch
        resumed = take(pipeline.train_iterator(ds, start_step=k, **kw), 11 - k)
        assert_batches_equal(resumed, full[k:])
    stopped = list(pipeline.train_iterator(ds, start_step=2, num_steps=5, **kw))
    assert_batches_equal(stopped, full[2:5])


@pytest.mark.parametrize("process_count", [2, 3])
def test_process_slices_are_disjoint_and_make_up_the_global_batch(process_count):
    ds = indexed_dataset(40)
    augment = aug.Augment(crop_padding=2, flip=True)
    kw = dict(global_batch_size=12, seed=5, augment=augment)
    single = take(pipeline.train_iterator(ds, **kw), 5)
    parts = [
        take(pipeline.train_iterator(ds, process_index=p, process_count=process_count, **kw), 5)
        for p in range(process_count)
    ]
    for step, whole in enumerate(single):
        pieces = [part[step] for part in parts]
        assert all(len(p["label"]) == 12 // process_count for p in pieces)
        labels = np.concatenate([p["label"] for p in pieces])
        assert len(np.unique(labels)) == 12
        np.testing.assert_array_equal(labels, whole["label"])
        np.testing.assert_array_equal(np.concatenate([p["image"] for p in pieces]), whole["image"])


def test_batching_errors_name_the_numbers():
    ds = indexed_dataset(10)
    with pytest.raises(ValueError, match="12 is not divisible by process_count 5"):
        next(pipeline.train_iterator(ds, global_batch_size=12, seed=0, process_count=5))
    with pytest.raises(ValueError, match="exceeds the 10 training examples"):
        next(pipeline.train_iterator(ds, global_batch_size=16, seed=0))
    with pytest.raises(ValueError, match="non-negative"):
        next(pipeline.train_iterator(ds, global_batch_size=2, seed=-1))
    with pytest.raises(ValueError, match="image_size 32"):
        next(pipeline.eval_iterator(ds, global_batch_size=2, image_size=32))


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_eval_covers_every_example_exactly_once(process_count):
    n, batch = 37, 8
    ds = indexed_dataset(n)
    streams = [
        list(
            pipeline.eval_iterator(
                ds, global_batch_size=batch, process_index=p, process_count=process_count
            )
        )  # fmt: skip
        for p in range(process_count)
    ]
    assert {len(s) for s in streams} == {pipeline.num_eval_batches(n, batch)} == {5}
    seen = []
    for stream in streams:
        for b in stream:
            assert b["image"].shape == (batch // process_count, 6, 5, 1)
            assert b["mask"].dtype == bool and b["label"].dtype == np.int32
            seen.extend(b["label"][b["mask"]].tolist())
            assert not b["image"][~b["mask"]].any()  # padding rows are zeros
            reference = (ds.images[b["label"][b["mask"]]] / 255.0 - 0.5) / 0.25
            np.testing.assert_allclose(b["image"][b["mask"]], reference, rtol=1e-6, atol=1e-6)
    assert sorted(seen) == list(range(n))


class ListSource:
    """Random-access source of variable-size images (stands in for a TFDS data source)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitems__(self, indices):
        return [{"image": self.images[i], "label": self.labels[i]} for i in indices]


def test_variable_size_images_get_inception_crop_and_center_crop():
    rng = np.random.default_rng(0)
    sizes = rng.integers(20, 60, (9, 2))
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    spec = datasets.get_spec("imagenet2012")
    info = datasets.DatasetInfo(
        "imagenet2012", "train", 9, 1000, (16, 16, 3), spec.mean, spec.std, "", False
    )
    ds = datasets.SourceDataset(ListSource(images, np.arange(9)), info)
    augment = aug.Augment(flip=True, inception_crop=True, mixup_alpha=0.2)
    batches = take(pipeline.train_iterator(ds, global_batch_size=4, seed=0, augment=augment), 3)
    for b in batches:
        assert b["image"].shape == (4, 16, 16, 3) and np.isfinite(b["image"]).all()
        assert b["label_probs"].shape == (4, 1000)
    resumed = take(pipeline.train_iterator(ds, global_batch_size=4, seed=0, augment=augment,
                                       start_step=2), 1)  # fmt: skip
    assert_batches_equal(resumed, batches[2:])
    evals = list(pipeline.eval_iterator(ds, global_batch_size=4, image_size=12))
    assert [b["mask"].sum() for b in evals] == [4, 4, 1]
    first = aug.crop_resize(images[0], aug.center_crop_box(*sizes[0], 12), 12)
    np.testing.assert_allclose(evals[0]["image"][0], aug.normalize(first, spec.mean, spec.std))


# -------------------------------------------------------------------------- helpers


def test_shard_for_pmap():
    batch = {"image": np.zeros((12, 3, 3, 1)), "label": np.arange(12)}
    out = pipeline.shard_for_pmap(batch, 4)
    assert out["image"].shape == (4, 3, 3, 3, 1)
    np.testing.assert_array_equal(out["label"][1], [3, 4, 5])
    with pytest.raises(ValueError, match=r"\(12,\) is not divisible by the 8 local devices"):
        pipeline.shard_for_pmap(batch, 8)


def test_prefetch_keeps_order_and_reraises():
    assert list(pipeline.prefetch(iter(range(10)), 3)) == list(range(10))

    def failing():
        yield 1
        raise RuntimeError("boom")

    it = pipeline.prefetch(failing(), 2)
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="boom"):
        next(it)
