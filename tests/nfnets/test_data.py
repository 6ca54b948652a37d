"""Data pipeline: IDX format, dataset loading, deterministic/resumable/sharded iterators,
exact-once evaluation and numpy augmentation, checked against plain numpy references."""

import gzip
import struct

import numpy as np
import pytest

from nfnets import augment as aug
from nfnets import data
from nfnets.idx import idx_magic, read_idx, write_idx


def indexed_dataset(n, shape=(6, 5, 1), num_classes=None):
    """A dataset whose example i has label i and images encoding i (so batches name examples)."""
    rng = np.random.default_rng(n)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    info = data.DatasetInfo(
        "fake", "train", n, num_classes or n, shape, (0.5,) * shape[2], (0.25,) * shape[2], "mem"
    )
    return data.ArrayDataset(images, np.arange(n, dtype=np.int32), info)


def take(iterator, k):
    return [next(iterator) for _ in range(k)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# ------------------------------------------------------------------------------ IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, suffix, dtype):
    array = (np.random.default_rng(0).normal(size=(3, 4, 5)) * 50).astype(dtype)
    path = write_idx(tmp_path / f"a.idx{suffix}", array)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, array)


def test_idx_reads_hand_built_file(tmp_path):
    # Header built with struct from the format description, independent of write_idx.
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    (tmp_path / "l.idx").write_bytes(struct.pack(">iI", 2049, 5) + labels.tobytes())
    np.testing.assert_array_equal(read_idx(tmp_path / "l.idx", expected_magic=2049), labels)
    ints = np.arange(6, dtype=np.int32).reshape(2, 3) - 2
    (tmp_path / "i.gz").write_bytes(
        gzip.compress(struct.pack(">iII", 0x0C02, 2, 3) + ints.astype(">i4").tobytes())
    )
    np.testing.assert_array_equal(read_idx(tmp_path / "i.gz"), ints)
    assert idx_magic(np.uint8, 3) == 2051 and idx_magic(np.uint8, 1) == 2049
    write_idx(tmp_path / "w.idx", labels)
    assert (tmp_path / "w.idx").read_bytes() == (tmp_path / "l.idx").read_bytes()


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"ab", "bad IDX magic"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 2) + b"ab", "bad IDX magic"),
        (b"\x00\x00\x08\x00", "bad IDX magic"),
        (b"\x00\x00", "too short"),
        (b"\x00\x00\x08\x02" + struct.pack(">I", 2), "truncated IDX header"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 4) + b"abc", "truncated"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"abc", "trailing bytes"),
        (gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 1) + b"a"), "bad IDX magic"),
    ],
)
def test_idx_errors(tmp_path, payload, match):
    (tmp_path / "bad").write_bytes(payload)
    with pytest.raises(ValueError, match=match):
        read_idx(tmp_path / "bad")


def test_idx_expected_magic_and_bad_gzip(tmp_path):
    write_idx(tmp_path / "labels", np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="expected 2051"):
        read_idx(tmp_path / "labels", expected_magic=2051)
    (tmp_path / "x.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot read IDX"):
        read_idx(tmp_path / "x.gz")
    with pytest.raises(ValueError, match="cannot store dtype"):
        write_idx(tmp_path / "y", np.zeros(2, np.int64))


# -------------------------------------------------------------------------- loading


@pytest.mark.parametrize("gz", [True, False])
def test_load_fake_fashion_mnist(tmp_path, gz):
    data.write_fake_fashion_mnist(tmp_path, n_train=20, n_test=7, seed=3, gzip=gz)
    train = data.load_dataset("fashion_mnist", split="train", data_dir=tmp_path)
    test = data.load_dataset("fashion_mnist", split="test", data_dir=str(tmp_path))
    assert (len(train), len(test)) == (20, 7)
    assert train.info.num_examples == 20 and train.info.num_classes == 10
    assert train.info.image_shape == (28, 28, 1) and train.images.shape == (20, 28, 28, 1)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int32
    # Independent parse: skip the 16/8-byte headers of the raw files.
    opener = gzip.open if gz else open
    suffix = ".gz" if gz else ""
    with opener(tmp_path / f"t10k-images-idx3-ubyte{suffix}", "rb") as f:
        raw_images = np.frombuffer(f.read()[16:], np.uint8).reshape(7, 28, 28, 1)
    with opener(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", "rb") as f:
        raw_labels = np.frombuffer(f.read()[8:], np.uint8)
    np.testing.assert_array_equal(test.images, raw_images)
    np.testing.assert_array_equal(test.labels, raw_labels)


def test_fashion_mnist_rejects_swapped_files(tmp_path):
    data.write_fake_fashion_mnist(tmp_path, 4, 4, gzip=False)
    images = tmp_path / "train-images-idx3-ubyte"
    labels = tmp_path / "train-labels-idx1-ubyte"
    content = images.read_bytes()
    images.write_bytes(labels.read_bytes())
    labels.write_bytes(content)
    with pytest.raises(ValueError, match="expected 2051"):
        data.load_dataset("fashion_mnist", split="train", data_dir=tmp_path)


def test_missing_datasets_name_the_fix(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.load_dataset("fashion_mnist", split="train", data_dir=tmp_path)
    assert "apt-get install dataset-fashion-mnist" in str(e.value)
    assert "--config.data_dir" in str(e.value)
    for name in ("cifar10", "imagenet2012"):
        with pytest.raises(data.DatasetNotFoundError) as e:
            data.load_dataset(name, split="train", data_dir=tmp_path)
        assert f"tfds build {name} --data_dir {tmp_path} --file_format array_record" in str(e.value)
    with pytest.raises(ValueError, match="choose one of"):
        data.load_dataset("mnist", split="train")


def prepare_fake_tfds(base, name, arrays, data_dir, extra=lambda split, i: {}):
    """Prepare `arrays` ({split: uint8 (N, H, W, C)}) as TFDS dataset `name` (array_record).

    `base` is the real TFDS builder class, so its feature spec is used; labels are i % 10.
    """
    import PIL.Image

    class Fake(base, skip_registration=True):
        # tfds 4.9.10 looks up the code path of builders defined in packages through the
        # optional `importlib_resources`; a non-package module takes its plain fallback.
        __module__ = "__main__"

        def _split_generators(self, dl_manager):
            return {split: self._examples(split) for split in arrays}

        def _examples(self, split):
            for i, image in enumerate(arrays[split]):
                image = PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
                yield f"{split}{i}", {"image": image, "label": i % 10, **extra(split, i)}

    Fake.name = name
    Fake(data_dir=data_dir, file_format="array_record").download_and_prepare()


def match_rows(images, reference):
    """Index into `reference` of each image (TFDS shuffles records on writing)."""
    return [int(np.flatnonzero((reference == x).all(axis=(1, 2, 3)))[0]) for x in images]


def test_tfds_array_record_source_without_tensorflow(tmp_path):
    """A tiny CIFAR-10 prepared as array_record is read back through tfds.data_source."""
    from tensorflow_datasets.image_classification import cifar

    rng = np.random.default_rng(0)
    arrays = {"train": rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8),
              "test": rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)}  # fmt: skip
    prepare_fake_tfds(cifar.Cifar10, "cifar10", arrays, tmp_path, lambda s, i: {"id": f"{s}{i}"})
    for split, images in arrays.items():
        ds = data.load_dataset("cifar10", split=split, data_dir=tmp_path)
        assert isinstance(ds, data.ArrayDataset) and ds.info.num_classes == 10
        assert len(ds) == len(images) == ds.info.num_examples
        order = match_rows(ds.images, images)
        assert sorted(order) == list(range(len(images)))
        np.testing.assert_array_equal(ds.labels, np.array(order) % 10)
    lazy = data.load_dataset("cifar10", split="test", data_dir=tmp_path, in_memory=False)
    assert isinstance(lazy, data.SourceDataset)
    eager = data.load_dataset("cifar10", split="test", data_dir=tmp_path)
    assert_batches_equal(
        list(data.eval_iterator(lazy, global_batch_size=4)),
        list(data.eval_iterator(eager, global_batch_size=4)),
    )


def test_fashion_mnist_falls_back_to_prepared_tfds(tmp_path):
    from tensorflow_datasets.image_classification import mnist

    rng = np.random.default_rng(1)
    arrays = {"train": rng.integers(0, 256, (6, 28, 28, 1), dtype=np.uint8),
              "test": rng.integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)}  # fmt: skip
    prepare_fake_tfds(mnist.FashionMNIST, "fashion_mnist", arrays, tmp_path)
    ds = data.load_dataset("fashion_mnist", split="test", data_dir=tmp_path)
    assert ds.images.shape == (4, 28, 28, 1) and ds.info.source.startswith("tfds:")
    assert sorted(match_rows(ds.images, arrays["test"])) == [0, 1, 2, 3]


# ------------------------------------------------------------------------ iteration


def test_shuffle_is_deterministic_and_visits_each_example_once_per_epoch():
    ds = indexed_dataset(23)
    a = take(data.train_iterator(ds, global_batch_size=5, seed=7), 9)
    b = take(data.train_iterator(ds, global_batch_size=5, seed=7), 9)
    c = take(data.train_iterator(ds, global_batch_size=5, seed=8), 9)
    assert_batches_equal(a, b)
    assert any((x["label"] != y["label"]).any() for x, y in zip(a, c, strict=True))
    per_epoch = data.steps_per_epoch(23, 5)
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
    [None, data.Augment(crop_padding=1, flip=True, mixup_alpha=0.4, cutmix_alpha=1.0)],
)
def test_resume_from_step_repeats_the_uninterrupted_stream(augment):
    ds = indexed_dataset(26, shape=(6, 6, 2), num_classes=26)
    kw = dict(global_batch_size=6, seed=1, augment=augment)
    full = take(data.train_iterator(ds, **kw), 11)
    for k in (3, 4, 9):  # inside an epoch, at an epoch boundary, in the third epoch
        resumed = take(data.train_iterator(ds, start_step=k, **kw), 11 - k)
        assert_batches_equal(resumed, full[k:])
    stopped = list(data.train_iterator(ds, start_step=2, num_steps=5, **kw))
    assert_batches_equal(stopped, full[2:5])


@pytest.mark.parametrize("process_count", [2, 3])
def test_process_slices_are_disjoint_and_make_up_the_global_batch(process_count):
    ds = indexed_dataset(40)
    augment = data.Augment(crop_padding=2, flip=True)
    kw = dict(global_batch_size=12, seed=5, augment=augment)
    single = take(data.train_iterator(ds, **kw), 5)
    parts = [
        take(data.train_iterator(ds, process_index=p, process_count=process_count, **kw), 5)
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
        next(data.train_iterator(ds, global_batch_size=12, seed=0, process_count=5))
    with pytest.raises(ValueError, match="exceeds the 10 training examples"):
        next(data.train_iterator(ds, global_batch_size=16, seed=0))
    with pytest.raises(ValueError, match="non-negative"):
        next(data.train_iterator(ds, global_batch_size=2, seed=-1))
    with pytest.raises(ValueError, match="image_size 32"):
        next(data.eval_iterator(ds, global_batch_size=2, image_size=32))


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_eval_covers_every_example_exactly_once(process_count):
    n, batch = 37, 8
    ds = indexed_dataset(n)
    streams = [
        list(
            data.eval_iterator(
                ds, global_batch_size=batch, process_index=p, process_count=process_count
            )
        )  # fmt: skip
        for p in range(process_count)
    ]
    assert {len(s) for s in streams} == {data.num_eval_batches(n, batch)} == {5}
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


# --------------------------------------------------------------------- augmentation


def reference_crop_flip(images, oy, ox, flips, padding):
    out = []
    for image, y, x, f in zip(images, oy, ox, flips, strict=True):
        padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
        crop = padded[y : y + image.shape[0], x : x + image.shape[1]]
        out.append(crop[:, ::-1] if f else crop)
    return np.stack(out)


def test_crop_flip_matches_per_example_numpy():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 7, 9, 3), dtype=np.uint8)
    oy, ox = rng.integers(0, 5, (2, 16))
    flips = rng.random(16) < 0.5
    out = aug.crop_flip(images, oy, ox, flips, padding=2)
    assert out.dtype == np.uint8 and out.shape == images.shape
    np.testing.assert_array_equal(out, reference_crop_flip(images, oy, ox, flips, 2))
    centered = aug.crop_flip(images, np.full(16, 2), np.full(16, 2), np.ones(16, bool), padding=2)
    np.testing.assert_array_equal(centered, images[:, :, ::-1])
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        aug.crop_flip(images, oy + 1, ox, flips, padding=2)


def test_train_flip_only_mirrors_and_normalizes():
    ds = indexed_dataset(64, shape=(5, 7, 3))
    batch = next(data.train_iterator(ds, global_batch_size=64, seed=2,
                                     augment=data.Augment(flip=True)))  # fmt: skip
    raw = ds.images[batch["label"]].astype(np.float64)
    expected_plain = (raw / 255 - 0.5) / 0.25
    expected_flip = expected_plain[:, :, ::-1]
    is_plain = np.isclose(batch["image"], expected_plain, atol=1e-5).all(axis=(1, 2, 3))
    is_flip = np.isclose(batch["image"], expected_flip, atol=1e-5).all(axis=(1, 2, 3))
    assert (is_plain | is_flip).all()
    assert 10 < is_flip.sum() < 54  # about half flipped
    batch = next(data.train_iterator(ds, global_batch_size=64, seed=2,
                                     augment=data.Augment(crop_padding=2, flip=True)))  # fmt: skip
    lo, hi = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25
    assert batch["image"].min() >= lo - 1e-6 and batch["image"].max() <= hi + 1e-6
    assert np.isclose(batch["image"], lo).any()  # zero padding came in


def test_normalize_matches_float64_formula():
    x = np.random.default_rng(1).integers(0, 256, (4, 3, 3, 3), dtype=np.uint8)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    out = aug.normalize(x, mean, std)
    assert out.dtype == np.float32
    ref = (x / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_mixup_and_cutmix_label_probabilities():
    ds = indexed_dataset(30, shape=(8, 8, 1), num_classes=30)
    plain = data.Augment(crop_padding=1, flip=True)
    for mix in (dict(mixup_alpha=0.4), dict(cutmix_alpha=1.0)):
        augment = data.Augment(crop_padding=1, flip=True, **mix)
        it = data.train_iterator(ds, global_batch_size=10, seed=4, augment=augment)
        ref = data.train_iterator(ds, global_batch_size=10, seed=4, augment=plain)
        for batch, unmixed in zip(take(it, 3), take(ref, 3), strict=True):
            probs, labels = batch["label_probs"], batch["label"]
            assert probs.shape == (10, 30) and probs.dtype == np.float32
            np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
            assert (probs >= 0).all()
            np.testing.assert_array_equal(labels, unmixed["label"])
            lam = probs[np.arange(10), labels]
            np.testing.assert_allclose(lam + probs[np.arange(10), labels[::-1]], 1.0, rtol=1e-6)
            x, x_rev = unmixed["image"], unmixed["image"][::-1]
            if "mixup_alpha" in mix:
                expected = lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x_rev
                np.testing.assert_allclose(batch["image"], expected, rtol=1e-5, atol=1e-5)
            else:
                own = np.isclose(batch["image"], x).all(axis=(0, 3))  # (H, W) pixels kept
                np.testing.assert_allclose(lam[0], own.mean(), atol=1e-6)
                np.testing.assert_array_equal(batch["image"][:, own], x[:, own])
                np.testing.assert_array_equal(batch["image"][:, ~own], x_rev[:, ~own])


def test_inception_crop_box_bounds_and_fallback():
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = rng.integers(20, 300, 2)
        top, left, ch, cw = aug.inception_crop_box(h, w, rng.random((10, 4)))
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
        assert ch * cw <= h * w
    # Attempt that fits: area fraction and aspect within the (rounded) ranges.
    top, left, ch, cw = aug.inception_crop_box(400, 400, np.array([[0.5, 0.5, 0.0, 1.0]]))
    assert (top, left) == (0, 400 - cw) and ch == cw == round(400 * np.sqrt(0.54))
    # No attempt fits a 10x1000 strip: widest centered crop with aspect 4/3.
    assert aug.inception_crop_box(10, 1000, np.ones((3, 4)) * 0.99) == (0, 493, 10, 13)
    assert aug.center_crop_box(300, 200, 224, crop_padding=32) == (62, 12, 175, 175)


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
    spec = data.get_spec("imagenet2012")
    info = data.DatasetInfo(
        "imagenet2012", "train", 9, 1000, (16, 16, 3), spec.mean, spec.std, "", False
    )
    ds = data.SourceDataset(ListSource(images, np.arange(9)), info)
    augment = data.default_augment("imagenet2012", mixup_alpha=0.2)
    batches = take(data.train_iterator(ds, global_batch_size=4, seed=0, augment=augment), 3)
    for b in batches:
        assert b["image"].shape == (4, 16, 16, 3) and np.isfinite(b["image"]).all()
        assert b["label_probs"].shape == (4, 1000)
    resumed = take(data.train_iterator(ds, global_batch_size=4, seed=0, augment=augment,
                                       start_step=2), 1)  # fmt: skip
    assert_batches_equal(resumed, batches[2:])
    evals = list(data.eval_iterator(ds, global_batch_size=4, image_size=12))
    assert [b["mask"].sum() for b in evals] == [4, 4, 1]
    first = aug.crop_resize(images[0], aug.center_crop_box(*sizes[0], 12), 12)
    np.testing.assert_allclose(evals[0]["image"][0], aug.normalize(first, spec.mean, spec.std))


# -------------------------------------------------------------------------- helpers


def test_shard_for_pmap():
    batch = {"image": np.zeros((12, 3, 3, 1)), "label": np.arange(12)}
    out = data.shard_for_pmap(batch, 4)
    assert out["image"].shape == (4, 3, 3, 3, 1)
    np.testing.assert_array_equal(out["label"][1], [3, 4, 5])
    with pytest.raises(ValueError, match=r"\(12,\) is not divisible by the 8 local devices"):
        data.shard_for_pmap(batch, 8)


def test_prefetch_keeps_order_and_reraises():
    assert list(data.prefetch(iter(range(10)), 3)) == list(range(10))

    def failing():
        yield 1
        raise RuntimeError("boom")

    it = data.prefetch(failing(), 2)
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="boom"):
        next(it)
