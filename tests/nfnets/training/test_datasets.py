"""Datasets: the IDX format and dataset loading (IDX files, TFDS array_record), checked
against hand-built files and plain numpy parses."""

import gzip
import struct

import numpy as np
import pytest

from nfnets.training import datasets, pipeline
from nfnets.training.datasets import idx_magic, read_idx, write_idx
from tests.nfnets.training.test_pipeline import assert_batches_equal
from tests.nfnets.training.tiny_config import write_fake_fashion_mnist

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
        # mtime=0: the same bytes (and test id) in every xdist worker
        (
            gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 1) + b"a", mtime=0),
            "bad IDX magic",
        ),
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
    write_fake_fashion_mnist(tmp_path, n_train=20, n_test=7, seed=3, gzip=gz)
    train = datasets.load_dataset("fashion_mnist", split="train", data_dir=tmp_path)
    test = datasets.load_dataset("fashion_mnist", split="test", data_dir=str(tmp_path))
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
    write_fake_fashion_mnist(tmp_path, 4, 4, gzip=False)
    images = tmp_path / "train-images-idx3-ubyte"
    labels = tmp_path / "train-labels-idx1-ubyte"
    content = images.read_bytes()
    images.write_bytes(labels.read_bytes())
    labels.write_bytes(content)
    with pytest.raises(ValueError, match="expected 2051"):
        datasets.load_dataset("fashion_mnist", split="train", data_dir=tmp_path)


def test_missing_datasets_name_the_fix(tmp_path):
    with pytest.raises(datasets.DatasetNotFoundError) as e:
        datasets.load_dataset("fashion_mnist", split="train", data_dir=tmp_path)
    assert "apt-get install dataset-fashion-mnist" in str(e.value)
    assert "--config.data_dir" in str(e.value)
    for name in ("cifar10", "imagenet2012"):
        with pytest.raises(datasets.DatasetNotFoundError) as e:
            datasets.load_dataset(name, split="train", data_dir=tmp_path)
        assert f"tfds build {name} --data_dir {tmp_path} --file_format array_record" in str(e.value)
    with pytest.raises(ValueError, match="choose one of"):
        datasets.load_dataset("mnist", split="train")


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
        ds = datasets.load_dataset("cifar10", split=split, data_dir=tmp_path)
        assert isinstance(ds, datasets.ArrayDataset) and ds.info.num_classes == 10
        assert len(ds) == len(images) == ds.info.num_examples
        order = match_rows(ds.images, images)
        assert sorted(order) == list(range(len(images)))
        np.testing.assert_array_equal(ds.labels, np.array(order) % 10)
    lazy = datasets.load_dataset("cifar10", split="test", data_dir=tmp_path, in_memory=False)
    assert isinstance(lazy, datasets.SourceDataset)
    eager = datasets.load_dataset("cifar10", split="test", data_dir=tmp_path)
    assert_batches_equal(
        list(pipeline.eval_iterator(lazy, global_batch_size=4)),
        list(pipeline.eval_iterator(eager, global_batch_size=4)),
    )


def test_fashion_mnist_falls_back_to_prepared_tfds(tmp_path):
    from tensorflow_datasets.image_classification import mnist

    rng = np.random.default_rng(1)
    arrays = {"train": rng.integers(0, 256, (6, 28, 28, 1), dtype=np.uint8),
              "test": rng.integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)}  # fmt: skip
    prepare_fake_tfds(mnist.FashionMNIST, "fashion_mnist", arrays, tmp_path)
    ds = datasets.load_dataset("fashion_mnist", split="test", data_dir=tmp_path)
    assert ds.images.shape == (4, 28, 28, 1) and ds.info.source.startswith("tfds:")
    assert sorted(match_rows(ds.images, arrays["test"])) == [0, 1, 2, 3]


def test_validation_split_is_fixed_disjoint_and_complete(tmp_path):
    """The held-out examples: the same whatever the run, disjoint from train, nothing lost."""
    fake = write_fake_fashion_mnist(tmp_path, n_train=50, n_test=4, seed=3)
    full = datasets.load_dataset("fashion_mnist", split="train", data_dir=fake)
    train, val = datasets.split_validation(full, 12)
    again_train, again_val = datasets.split_validation(full, 12)
    assert (len(train), len(val)) == (38, 12)
    assert (train.info.split, val.info.split) == ("train", "validation")
    assert (train.info.num_examples, val.info.num_examples) == (38, 12)
    np.testing.assert_array_equal(val.images, again_val.images)
    np.testing.assert_array_equal(train.labels, again_train.labels)
    # Independent reference: the first 12 indices of the seeded permutation are held out.
    held = np.sort(np.random.default_rng(datasets.VALIDATION_SEED).permutation(50)[:12])
    kept = np.setdiff1d(np.arange(50), held)
    np.testing.assert_array_equal(val.images, full.images[held])
    np.testing.assert_array_equal(train.images, full.images[kept])
    np.testing.assert_array_equal(train.labels, full.labels[kept])
    assert datasets.split_validation(full, 0) == (full, None)
    for bad in (-1, 50, 2.5):
        with pytest.raises(ValueError, match="validation_examples"):
            datasets.split_validation(full, bad)


def test_validation_split_of_a_lazy_source_reads_the_same_examples(tmp_path):
    from tensorflow_datasets.image_classification import cifar

    rng = np.random.default_rng(2)
    arrays = {"train": rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8),
              "test": rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)}  # fmt: skip
    prepare_fake_tfds(cifar.Cifar10, "cifar10", arrays, tmp_path, lambda s, i: {"id": f"{s}{i}"})
    lazy = datasets.load_dataset("cifar10", split="train", data_dir=tmp_path, in_memory=False)
    eager = datasets.load_dataset("cifar10", split="train", data_dir=tmp_path)
    for lazy_part, eager_part in zip(
        datasets.split_validation(lazy, 4), datasets.split_validation(eager, 4), strict=True
    ):
        assert isinstance(lazy_part, datasets.SourceDataset)
        idx = np.arange(len(eager_part))
        for a, b in zip(lazy_part.read(idx), eager_part.read(idx), strict=True):
            np.testing.assert_array_equal(a, b)
