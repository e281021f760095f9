"""The rows of every global batch that each process of a multi-process job reads.

Two local processes of one jax.distributed job (gloo, two emulated CPU devices each), launched
as tests/test_parallel.py launches its multi-process training."""

import json
import os
import socket
import subprocess
import sys

from jaxsparse.parallel.emulated import emulated_devices_env

from helpers import ROOT

WORKER = r"""
import json, jax, numpy as np
from jaxsparse.parallel import distributed
distributed.initialize()
from helpers import tiny_config
from jaxsparse.config import ConfigError
from jaxsparse.data import make_stream
from jaxsparse.parallel import make_mesh
from jaxsparse.parallel.mesh import check_batch_split, check_mesh
from jaxsparse.train.loop import process_stream
from jaxsparse.train.state import TrainSetup

out = {}
for name, overrides in MESHES.items():
    cfg = tiny_config(*overrides)
    check_batch_split(cfg, check_mesh(cfg, jax.device_count()), jax.process_count())
    setup = TrainSetup(cfg, make_mesh(cfg.mesh))
    stream, full = process_stream(cfg, setup), make_stream(cfg)
    rows, same = [], True
    for local, expected in ((stream.batch(3), full.batch(3)),
                            (stream.eval_batch(1, 2), full.eval_batch(1, 2))):
        rows.append(local["inputs"].shape[0])
        for key, array in setup.global_batch(local).items():  # every device's part
            same &= all(np.array_equal(shard.data, expected[key][shard.index])
                        for shard in array.addressable_shards)
    out[name] = {"rows": rows, "same": bool(same)}

# devices in the order p0, p1, p0, p1 along the data axis: process 0 holds rows 0-1 and 4-5
cfg = tiny_config("mesh.data=4")
d = jax.devices()
try:
    process_stream(cfg, TrainSetup(cfg, make_mesh(cfg.mesh, [d[0], d[2], d[1], d[3]])))
    out["interleaved"] = "accepted"
except ConfigError as err:
    out["interleaved"] = str(err)
print(json.dumps(out), flush=True)
"""

# two processes of two devices each; the tiny config's batch holds 8 rows
MESHES = {
    "data": ["mesh.data=4"],                                       # rows split 4 | 4
    "data x tensor": ["mesh.data=2", "mesh.tensor=2"],             # rows split 4 | 4
    "tensor across processes": ["mesh.data=1", "mesh.tensor=4", "model.n_kv_heads=4"],
    "sequence x tensor": ["mesh.data=1", "mesh.sequence=2", "mesh.tensor=2",
                          "data.batch_size=3"],                     # 3 rows, 2 processes
}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_each_process_reads_the_rows_its_devices_hold():
    """With the tensor or sequence axis spanning the processes, every process supplies all
    rows of the batch (make_array_from_process_local_data refused the half that process i
    used to read, rows [i B/P, (i+1) B/P): "Invalid host data"); split over data, its part.
    Either way every device holds its part of the one global batch of (seed, step), whatever
    the layout; a batch not divisible by the processes is no error when they do not split it;
    a mesh that interleaves the processes along the batch is a ConfigError naming the mesh."""
    env = dict(emulated_devices_env(2), PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="2")
    code = WORKER.replace("MESHES", repr(MESHES))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env=dict(env, JAX_PROCESS_ID=str(i))) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-3000:]
    for i, (stdout, _) in enumerate(outputs):
        out = json.loads(stdout.strip().splitlines()[-1])
        assert out["data"] == out["data x tensor"] == {"rows": [4, 4], "same": True}
        assert out["tensor across processes"] == {"rows": [8, 8], "same": True}
        assert out["sequence x tensor"] == {"rows": [3, 3], "same": True}
        held = ("[0, 2), [4, 6)", "[2, 4), [6, 8)")[i]
        assert (f"the devices of process {i} hold rows {held} of the 8-row global batch, not "
                "one contiguous range (mesh {'data': 4,") in out["interleaved"]
