"""nfnets.training.losses against float64 numpy references."""

import jax
import numpy as np
import pytest

from nfnets.training import losses
from tests.nfnets.test_agc import rand


def test_smoothed_cross_entropy_matches_numpy():
    logits = np.asarray(rand(jax.random.key(6), (6, 5), 3.0), np.float64)
    labels = np.array([0, 4, 2, 2, 1, 3])
    logp = logits - logits.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    for s in (0.0, 0.1):
        y = np.eye(5)[labels] * (1 - s) + s / 5
        ref = -(y * logp).sum(1)
        np.testing.assert_allclose(losses.smoothed_cross_entropy(logits, labels, s), ref, rtol=1e-5)
        soft = np.eye(5)[labels]
        np.testing.assert_allclose(losses.smoothed_cross_entropy(logits, soft, s), ref, rtol=1e-5)
    with pytest.raises(ValueError, match="smoothing must be in"):
        losses.smoothed_cross_entropy(logits, labels, 1.0)
    with pytest.raises(ValueError, match="fits neither"):
        losses.smoothed_cross_entropy(logits, labels[:3], 0.1)


def test_accuracy_takes_the_argmax_of_soft_labels():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0]], np.float32)
    hard = np.array([0, 2, 2])
    np.testing.assert_array_equal(losses.accuracy(logits, hard), [1.0, 0.0, 1.0])
    soft = np.array([[0.7, 0.3, 0.0], [0.1, 0.2, 0.7], [0.0, 0.4, 0.6]], np.float32)
    np.testing.assert_array_equal(losses.accuracy(logits, soft), [1.0, 0.0, 1.0])
