"""Fixtures of the training tests."""

import pytest

from tests.nfnets.training.tiny_config import fake_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """A folder with fake Fashion-MNIST IDX files (64 train / 40 test examples)."""
    return fake_data(tmp_path_factory.mktemp("fmnist"))
