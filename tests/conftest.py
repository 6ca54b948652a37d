"""Test set-up, before jax is imported: 8 virtual CPU devices, fast XLA compiles and
one compilation cache for every test process.

The tests train tiny models for a few steps, so XLA's compile time dominates them.
The CPU backend at optimization level 0 compiles about 2x faster (the programs run
slower, which tiny shapes do not notice), and the persistent compilation cache lets
the many runs of the same tiny configs, in both xdist workers and in the train.py
subprocesses (which inherit this environment, see ``subprocess_env``), compile each
program once. Benchmarks and training never see these settings.
"""

import os
import tempfile

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
    """``XLA_FLAGS`` for ``devices`` virtual CPU devices with the tests' compile settings."""
    return f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}"


def subprocess_env(devices: int | None = None) -> dict:
    """This process's environment for a CPU subprocess, with ``devices`` virtual devices
    (None: keep this process's XLA_FLAGS)."""
    env = dict(os.environ)
    if devices is not None:
        env["XLA_FLAGS"] = xla_flags(devices)
    env["JAX_PLATFORMS"] = "cpu"
    return env


os.environ.setdefault("XLA_FLAGS", xla_flags(8))
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += f" {TEST_XLA_FLAGS}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"nfnets-tests-jax-cache-{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
