"""Test set-up: 8 virtual CPU devices (before jax is imported) and float64 references."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
