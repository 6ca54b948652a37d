"""Image augmentation in pure numpy (PIL only to resize), channels-last (N, H, W, C).

Randomness is never drawn inside the image functions: callers pass the random
parameters (offsets, flips, uniforms, the mixing coefficient). `augment_batch`
draws them from a generator that `nfnets.training.pipeline` seeds with
`(seed, step)`, so a resumed run repeats them exactly. `Augment` is the
configuration (`augment_from_config` builds it from `config.augment`).

- `crop_flip`: pad-and-random-crop plus horizontal flip for a whole uint8 batch
  in one gather (the fast path for 28x28 / 32x32 data).
- `inception_crop_box` / `center_crop_box` + `crop_resize`: Inception-style
  random-resized crop and the eval center crop for variable-size (ImageNet)
  images, one example at a time with PIL (CPU-slow; not the fast path).
- `normalize`: uint8 -> float32 `(x / 255 - mean) / std` per channel.
- `mixup` / `cutmix`: mix each example with the batch reversed; soft labels.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import ml_collections
import numpy as np
from PIL import Image


def crop_flip(
    images: np.ndarray,
    offsets_y: np.ndarray,
    offsets_x: np.ndarray,
    flips: np.ndarray,
    *,
    padding: int,
) -> np.ndarray:
    """Zero-pad by `padding` pixels per side, crop back to (H, W) at the offsets, then flip.

    Args:
      images: (N, H, W, C) array (any dtype; uint8 in the data pipeline).
      offsets_y, offsets_x: (N,) ints in [0, 2 * padding]: top-left corner of the
        crop in the padded image (offset `padding` means no shift).
      flips: (N,) bool, True mirrors the example left-right (after the crop).
      padding: pixels of zeros added on every side (>= 0).

    Returns the (N, H, W, C) batch, same dtype.
    """
    if images.ndim != 4:
        raise ValueError(f"crop_flip expects (N, H, W, C) images, got shape {images.shape}.")
    n, h, w, _ = images.shape
    offsets_y, offsets_x = np.asarray(offsets_y), np.asarray(offsets_x)
    flips = np.asarray(flips, dtype=bool)
    for name, v in (("offsets_y", offsets_y), ("offsets_x", offsets_x), ("flips", flips)):
        if v.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {v.shape}.")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}.")
    if n and (
        min(offsets_y.min(), offsets_x.min()) < 0
        or max(offsets_y.max(), offsets_x.max()) > 2 * padding
    ):
        raise ValueError(f"crop offsets must lie in [0, {2 * padding}] for padding {padding}.")
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    # One slice copy per distinct offset (at most (2p + 1)^2): faster than a per-pixel gather.
    out = np.empty_like(images)
    key = offsets_y * (2 * padding + 1) + offsets_x
    for k in np.unique(key):
        rows = key == k
        dy, dx = divmod(int(k), 2 * padding + 1)
        out[rows] = padded[rows, dy : dy + h, dx : dx + w]
    out[flips] = out[flips, :, ::-1]
    return out


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (..., C) in [0, 255] -> float32 `(images / 255 - mean) / std`, mean/std per channel."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    scale = (1.0 / (255.0 * std)).astype(np.float32)
    out = images.astype(np.float32)
    out *= scale
    out -= mean / std
    return out


def inception_crop_box(
    height: int,
    width: int,
    uniforms: np.ndarray,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """Inception-style random-resized-crop box (Szegedy et al. 2015; torchvision's rule).

    Each attempt k uses `uniforms[k] = (u_area, u_ratio, u_y, u_x)` in [0, 1):
    target area `H * W * U(scale)`, aspect `exp(U(log ratio))`, `w = round(sqrt(area
    * aspect))`, `h = round(sqrt(area / aspect))`; the first attempt that fits gets a
    uniform position. If none fits: the largest centered crop with the aspect
    clamped to `ratio`.

    Returns (top, left, crop_height, crop_width).
    """
    uniforms = np.asarray(uniforms, np.float64)
    if uniforms.ndim != 2 or uniforms.shape[1] != 4:
        raise ValueError(f"uniforms must have shape (attempts, 4), got {uniforms.shape}.")
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for u_area, u_ratio, u_y, u_x in uniforms:
        target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u_y * (height - h + 1)), height - h)
            left = min(int(u_x * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(height: int, width: int, image_size: int, *, crop_padding: int = 32):
    """Eval center crop: a square of side `min(H, W) * image_size / (image_size + crop_padding)`.

    The NFNet / EfficientNet eval convention (crop_padding 32 at 224 is the usual
    0.875 crop fraction). Returns (top, left, crop_height, crop_width).
    """
    side = max(1, round(min(height, width) * image_size / (image_size + crop_padding)))
    return (height - side) // 2, (width - side) // 2, side, side


def crop_resize(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Crop `image` (H, W, C) uint8 to `box` (top, left, h, w) and resize to (size, size), bicubic.

    Returns uint8 (size, size, C).
    """
    top, left, h, w = box
    crop = np.ascontiguousarray(image[top : top + h, left : left + w])
    squeeze = crop.ndim == 3 and crop.shape[-1] == 1
    pil = Image.fromarray(crop[..., 0] if squeeze else crop)
    out = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC))
    return out[..., None] if squeeze else out


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(N,) int labels -> (N, num_classes) float32 one-hot rows."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}."
        )
    return np.eye(num_classes, dtype=np.float32)[labels]


def mixup(images: np.ndarray, label_probs: np.ndarray, lam: float):
    """MixUp (Zhang et al. 2018) with the batch reversed as partner.

    `x_i <- lam * x_i + (1 - lam) * x_{N-1-i}`, same for the label rows, so each
    output row of `label_probs` still sums to 1. Returns (images, label_probs).
    """
    lam = np.float32(lam)
    images = lam * images + (1 - lam) * images[::-1]
    return images.astype(np.float32), lam * label_probs + (1 - lam) * label_probs[::-1]


def cutmix_box(height: int, width: int, lam: float, u_y: float, u_x: float):
    """CutMix box (Yun et al. 2019): side ratio sqrt(1 - lam), center uniform, clipped to the image.

    Returns (top, bottom, left, right) with top <= bottom, left <= right.
    """
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(u_y * height), int(u_x * width)
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return top, bottom, left, right


def cutmix(images: np.ndarray, label_probs: np.ndarray, box: tuple[int, int, int, int]):
    """CutMix with the batch reversed as partner: paste the partner's `box` into each image.

    The label weight is the area actually kept, `lam = 1 - box_area / (H * W)`, so
    the rows of the returned `label_probs` sum to 1. Returns (images, label_probs, lam).
    """
    top, bottom, left, right = box
    h, w = images.shape[1:3]
    mixed = images.copy()
    mixed[:, top:bottom, left:right] = images[::-1, top:bottom, left:right]
    lam = np.float32(1.0 - (bottom - top) * (right - left) / (h * w))
    return mixed, lam * label_probs + (1 - lam) * label_probs[::-1], float(lam)


# --------------------------------------------------------------- training batches


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training augmentation; every field off gives plain normalized images.

    - `crop_padding`: pad-and-random-crop by this many pixels per side (0 = off;
      4 is the CIFAR convention for 32x32, 2 for 28x28). Fixed-size datasets.
    - `flip`: random horizontal flip with probability 1/2.
    - `inception_crop`: random-resized crop (area 8-100%, aspect 3/4-4/3) to the
      output size, for variable-size (ImageNet) images; otherwise those get the
      eval center crop.
    - `mixup_alpha`, `cutmix_alpha`: Beta(alpha, alpha) mixing with the local
      batch reversed; one lam per batch; both > 0 picks CutMix with probability
      `switch_prob` per batch. Adds "label_probs" to the batch.
    """

    crop_padding: int = 0
    flip: bool = False
    inception_crop: bool = False
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    switch_prob: float = 0.5

    def __post_init__(self):
        if self.crop_padding < 0 or self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError(f"crop_padding and alphas must be >= 0, got {self}.")
        if not 0 <= self.switch_prob <= 1:
            raise ValueError(f"switch_prob must lie in [0, 1], got {self.switch_prob}.")

    @property
    def mixing(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def augment_from_config(config: ml_collections.ConfigDict) -> Augment:
    """`Augment` from ``config.augment`` (crop_padding, flip, inception_crop, alphas)."""
    a = config.augment
    return Augment(
        crop_padding=a.crop_padding,
        flip=a.flip,
        inception_crop=a.inception_crop,
        mixup_alpha=a.mixup_alpha,
        cutmix_alpha=a.cutmix_alpha,
    )


def augment_batch(
    images,
    labels,
    info,
    rng: np.random.Generator,
    augment: Augment,
    rows: slice,
    global_batch: int,
    size: int,
) -> dict[str, np.ndarray]:
    """One process's normalized, augmented training batch from its uint8 ``images``.

    ``images`` is a uint8 (B, H, W, C) array (fixed-size data) or a list of
    (h_i, w_i, C) arrays (cropped and resized to ``size``); ``labels`` int32 (B,);
    ``info`` the dataset's `DatasetInfo` (mean, std, classes). Every random
    parameter is drawn from ``rng`` for the whole global batch of ``global_batch``
    rows and then sliced to this process's ``rows``, so the batch depends only on
    the generator's seed, not on the process count.
    """
    local = len(labels)
    sl = rows
    # Random parameters for the whole global batch, then this process's rows.
    flips = (rng.random(global_batch) < 0.5)[sl] if augment.flip else np.zeros(local, bool)
    if isinstance(images, np.ndarray):
        p = augment.crop_padding
        if p or augment.flip:
            oy, ox = rng.integers(0, 2 * p + 1, (2, global_batch))[:, sl]
            images = crop_flip(images, oy, ox, flips, padding=p)
    else:
        uniforms = rng.random((global_batch, 10, 4))[sl]
        boxes = [
            inception_crop_box(*im.shape[:2], u)
            if augment.inception_crop
            else center_crop_box(*im.shape[:2], size)
            for im, u in zip(images, uniforms, strict=True)
        ]
        images = np.stack([crop_resize(im, b, size) for im, b in zip(images, boxes, strict=True)])
        if augment.flip:
            images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
    batch = {"image": normalize(images, info.mean, info.std), "label": labels}
    if augment.mixing:
        batch["image"], batch["label_probs"] = _mix(
            batch["image"], labels, info.num_classes, rng, augment
        )
    return batch


def _mix(images, labels, num_classes, rng, augment: Augment):
    probs = one_hot(labels, num_classes)
    use_cutmix = augment.cutmix_alpha > 0 and (
        augment.mixup_alpha <= 0 or rng.random() < augment.switch_prob
    )
    if use_cutmix:
        lam = rng.beta(augment.cutmix_alpha, augment.cutmix_alpha)
        u_y, u_x = rng.random(2)
        box = cutmix_box(*images.shape[1:3], lam, u_y, u_x)
        images, probs, _ = cutmix(images, probs, box)
        return images, probs
    lam = rng.beta(augment.mixup_alpha, augment.mixup_alpha)
    return mixup(images, probs, lam)
