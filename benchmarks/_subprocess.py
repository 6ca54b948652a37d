"""Run benchmark code in a fresh Python with ``devices`` virtual CPU devices.

JAX fixes its device count when its backend starts, so a measurement that needs
more devices than this process has runs in a child process; the child prints its
result as JSON on its last line of stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


def json_with_cpu_devices(code: str, devices: int) -> Any:
    """The JSON value ``code`` prints last, run under ``devices`` virtual CPU devices.

    ``XLA_FLAGS`` gains ``--xla_force_host_platform_device_count=devices`` (other
    flags kept), ``JAX_PLATFORMS=cpu``; the child runs in the repository root.
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True
    )
    return json.loads(res.stdout.strip().splitlines()[-1])
