"""Two processes on localhost (jax.distributed, CPU collectives over gloo) train together.

Each process has 4 virtual CPU devices; the "batch" axis (of pmap, or of the
shard_map mesh over global arrays) spans all 8, each process feeds its half of
every global batch. If the gradients were not averaged
across processes the two would end with different parameters (they see different
data); the test requires them to agree and the run to report 8 devices, 2
processes and every test example counted once. Process 1 starts its run 2 s after
process 0 (after both have joined the distributed runtime), so process 0 has already
created the checkpoint folder when process 1 checks the workdir.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import subprocess_env
from tests.nfnets.training.tiny_config import N_TEST, fake_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r"""
import json, sys, time
import jax, numpy as np
from jax.experimental import multihost_utils
from nfnets.training import maybe_initialize_distributed, run
from tests.nfnets.training.tiny_config import tiny_nf_config

pid, port, data_dir, workdir, out, parallelism = sys.argv[1:]
c = tiny_nf_config(data_dir)
c.parallelism = parallelism
c.distributed.initialize = True
c.distributed.coordinator_address = f"127.0.0.1:{port}"
c.distributed.num_processes = 2
c.distributed.process_id = int(pid)
c.distributed.cpu_collectives = "gloo"
maybe_initialize_distributed(c)
barriers, sync = [], multihost_utils.sync_global_devices
def recording_sync(name):  # orbax's barriers and ours: the same in both processes?
    barriers.append(name)
    sync(name)
multihost_utils.sync_global_devices = recording_sync
if pid == "1":
    # Process 0 goes on alone for a moment (it writes the workdir first): a process
    # that looks at the workdir later must still run the same collectives.
    time.sleep(2)
summary, state = run(c, workdir)
leaves = jax.tree_util.tree_leaves_with_path(state.params)
np.savez(out, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})
with open(out + ".json", "w") as f:
    json.dump({"summary": summary, "process_index": jax.process_index(),
               "local_devices": jax.local_device_count(), "barriers": barriers}, f)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["pmap", "shard_map"])
def test_two_processes_train_and_agree(tmp_path, parallelism):
    data_dir = fake_data(tmp_path / "fmnist")
    env = subprocess_env(4)
    env["PYTHONPATH"] = ROOT
    port = str(_free_port())
    workdir = str(tmp_path / "run")
    outs = [str(tmp_path / f"params{p}.npz") for p in (0, 1)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(p), port, data_dir, workdir, outs[p], parallelism],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for p in (0, 1)
    ]
    try:
        logs = [proc.communicate(timeout=240)[0] for proc in procs]
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        logs = [proc.communicate()[0] for proc in procs]
        pytest.fail(
            "the processes hung:\n"
            + "\n".join(f"--- process {p} ---\n{log[-3000:]}" for p, log in enumerate(logs))
        )
    codes = [proc.returncode for proc in procs]
    report = "\n".join(
        f"--- process {p} (exit {c}) ---\n{log[-4000:]}"
        for p, (c, log) in enumerate(zip(codes, logs, strict=True))
    )
    assert codes == [0, 0], report

    infos = []
    for out in outs:
        with open(out + ".json") as f:
            infos.append(json.load(f))
    assert [i["process_index"] for i in infos] == [0, 1]
    assert infos[0]["barriers"] == infos[1]["barriers"]
    assert any("workdir checked" in name for name in infos[0]["barriers"])
    for info in infos:
        s = info["summary"]
        assert info["local_devices"] == 4
        assert (s["num_devices"], s["num_processes"], s["steps"]) == (8, 2, 4)
        assert s["test_count"] == N_TEST
    # Process 0 alone writes the run's files.
    assert os.path.exists(os.path.join(workdir, "summary.json"))

    p0, p1 = np.load(outs[0]), np.load(outs[1])
    assert sorted(p0.files) == sorted(p1.files) and p0.files
    for key in p0.files:
        np.testing.assert_array_equal(p0[key], p1[key], err_msg=key)
    # Training did change the parameters (skip gains start at 0 and must have moved).
    moved = any(np.any(p0[k] != 0) for k in p0.files if k.endswith("['skip_gain']"))
    assert moved
