"""Numpy augmentation (crop/flip, normalize, MixUp/CutMix, Inception crop) against
per-example numpy references, also through the training iterator."""

import numpy as np
import pytest

from nfnets.training import augment as aug
from nfnets.training import pipeline
from tests.nfnets.training.test_pipeline import indexed_dataset, take

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
    batch = next(pipeline.train_iterator(ds, global_batch_size=64, seed=2,
                                     augment=aug.Augment(flip=True)))  # fmt: skip
    raw = ds.images[batch["label"]].astype(np.float64)
    expected_plain = (raw / 255 - 0.5) / 0.25
    expected_flip = expected_plain[:, :, ::-1]
    is_plain = np.isclose(batch["image"], expected_plain, atol=1e-5).all(axis=(1, 2, 3))
    is_flip = np.isclose(batch["image"], expected_flip, atol=1e-5).all(axis=(1, 2, 3))
    assert (is_plain | is_flip).all()
    assert 10 < is_flip.sum() < 54  # about half flipped
    batch = next(pipeline.train_iterator(ds, global_batch_size=64, seed=2,
                                     augment=aug.Augment(crop_padding=2, flip=True)))  # fmt: skip
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
    plain = aug.Augment(crop_padding=1, flip=True)
    for mix in (dict(mixup_alpha=0.4), dict(cutmix_alpha=1.0)):
        augment = aug.Augment(crop_padding=1, flip=True, **mix)
        it = pipeline.train_iterator(ds, global_batch_size=10, seed=4, augment=augment)
        ref = pipeline.train_iterator(ds, global_batch_size=10, seed=4, augment=plain)
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
