"""Sharded training on emulated devices and on two local processes (gloo)."""

import socket
import subprocess
import sys
import os
import json

import pytest
from jax.sharding import Mesh, PartitionSpec as P
import numpy as np

from jaxsparse.parallel import logical_to_spec
from jaxsparse.parallel.emulated import emulated_devices_env

from helpers import ROOT, run_python

MESH_VS_SINGLE = r"""
import json, jax, numpy as np
from helpers import tiny_config
from jaxsparse.parallel import make_mesh
from jaxsparse.train.state import TrainSetup
from jaxsparse.train.step import make_train_step
from jaxsparse.data import make_stream

def run(devices, *mesh):
    cfg = tiny_config("model.n_heads=4", "model.n_kv_heads=2", *mesh)
    setup = TrainSetup(cfg, make_mesh(cfg.mesh, devices))
    state, step, stream = setup.init(), make_train_step(setup), make_stream(cfg)
    losses = []
    for i in range(3):
        state, metrics = step(state, setup.global_batch(stream.batch(i)))
        losses.append(float(metrics["loss"]))
    return setup, state, losses

_, single, single_losses = run(jax.devices()[:1])
setup, sharded, sharded_losses = run(jax.devices(), "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                     single["params"], sharded["params"])
gate = sharded["params"]["blocks"][0]["mlp"]["gate"]["kernel"]
from jaxsparse.train import train
from jaxsparse.config import ConfigError
try:
    train(tiny_config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "data.batch_size=6"),
          "/tmp/never-written", quiet=True)
    batch_error = None
except ConfigError as err:
    batch_error = str(err)
print(json.dumps({"devices": jax.device_count(), "single": single_losses,
                  "sharded": sharded_losses, "max_param_diff": max(jax.tree.leaves(diffs)),
                  "gate_spec": list(gate.sharding.spec), "gate_shards": len(gate.addressable_shards),
                  "gate_shard_shape": list(gate.addressable_shards[0].data.shape),
                  "batch_error": batch_error}))
"""


def test_train_step_on_8_devices_matches_one_device():
    out = run_python(MESH_VS_SINGLE, devices=8)
    assert out["devices"] == 8
    np.testing.assert_allclose(out["sharded"], out["single"], rtol=2e-5)
    assert out["max_param_diff"] < 1e-5
    # the weights really are split: embed over fsdp, mlp over tensor
    assert out["gate_spec"] == ["fsdp", "tensor"]
    assert out["gate_shard_shape"] == [16, 32]  # [32, 64] / (2, 2)
    assert "data.batch_size=6 is not divisible by the data-parallel size 4" in out["batch_error"]


def test_logical_rules_drop_axes_that_do_not_fit():
    devices = np.array(__import__("jax").devices()[:1] * 1).reshape(1, 1, 1)
    mesh = Mesh(devices, ("data", "fsdp", "tensor"))
    assert logical_to_spec(("embed", "mlp"), (8, 8), mesh) == P(None, None)  # size-1 axes

    class FakeMesh:  # shape-only stand-in: rules are pure functions of axis sizes
        shape = {"data": 2, "fsdp": 4, "tensor": 2}

    fake = FakeMesh()
    assert logical_to_spec(("batch", "length"), (16, 5), fake) == P(("data", "fsdp"), None)
    assert logical_to_spec(("batch", "length"), (6, 5), fake) == P("data", None)  # 4 ∤ 6
    assert logical_to_spec(("embed", "mlp"), (8, 6), fake) == P("fsdp", "tensor")
    assert logical_to_spec(("embed", "embed"), (8, 8), fake) == P("fsdp", None)  # used once
    assert logical_to_spec(("vocab", "embed"), (255, 8), fake) == P(None, "fsdp")


def test_row_local_layers_spread_their_rows_over_tensor_and_sequence_parallelism():
    from jaxsparse.nn.batch_local import RowSplit, row_split
    from jaxsparse.parallel import PRESETS, activation_sharding

    class FakeMesh:
        shape = {"data": 2, "fsdp": 2, "expert": 1, "sequence": 2, "tensor": 2}

    mesh = FakeMesh()
    with activation_sharding(mesh, PRESETS["full"].rules):
        assert row_split(mesh, (16, 8, 3)) == RowSplit(("data", "fsdp"), ("sequence",), ("tensor",))
        assert row_split(mesh, (16, 8, 3)).spec == P(("data", "fsdp", "tensor"), ("sequence",))
        assert row_split(mesh, (16, 7, 3)) == RowSplit(("data", "fsdp"), (), ("tensor",))  # 2 ∤ 7
        assert row_split(mesh, (12, 8, 3)) == RowSplit(("data", "fsdp"))  # 3 rows per device
        assert row_split(mesh, (2, 8, 3)) == RowSplit(("data",))  # one row: the length is gathered
    with activation_sharding(mesh, PRESETS["fsdp"].rules):  # no tensor or sequence parallelism
        assert row_split(mesh, (16, 8, 3)) == RowSplit(("data", "fsdp"))
    assert not RowSplit()



ATTENTION_UNDER_TENSOR_PARALLELISM = r"""
import json, jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P
from helpers import sharded_gradient_check
from jaxsparse.nn.attention import Attention
from jaxsparse.ops.masks import CausalMask, LocalMask, MultiHeadMask
from jaxsparse.parallel import PRESETS, activation_sharding
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("fsdp", "tensor"))
rules = PRESETS["fsdp_tp"].rules
batch, length, d = 4, 256, 64  # 4 x 8 heads x 256^2 logits: the block-sparse path
x = jax.random.normal(jax.random.key(1), (batch, length, d))
positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
segments = jnp.asarray((np.arange(batch * length) // 100 % 3).reshape(batch, length))
out = {}
for name, mask in (("causal", CausalMask()),
                   ("per_head", MultiHeadMask([LocalMask(32 * (h + 1), 0) for h in range(8)]))):
    graphdef, state = nnx.split(Attention(d, 8, 4, 16, mask=mask, rngs=nnx.Rngs(0)))  # GQA
    params = nnx.to_pure_dict(state)

    def loss(p, x, mesh=None):
        with activation_sharding(mesh, rules):
            y, _ = nnx.merge(graphdef, p)(x, positions, segment_ids=segments)
        return jnp.sum(jnp.sin(y))

    moved, err = sharded_gradient_check(loss, params, state, x, mesh, rules, P("fsdp"))
    out[name] = {"bytes": moved, "err": err}
out["x_bytes"] = batch // 2 * length * d * 4  # one device's rows of x, float32
out["param_bytes"] = sum(v.size * 4 for v in jax.tree.leaves(params))
print(json.dumps(out))
"""


def test_attention_under_tensor_parallelism_runs_on_each_devices_rows_and_heads():
    """fsdp2 × tensor4 on 8 emulated devices, GQA, causal + packed segments: each device
    attends its rows and heads, so the forward+backward moves what Megatron-style tensor
    parallelism needs — all-reduces of the output projection's result and of the q/k/v
    projections' input gradient (4 × one device's rows of x) plus the weights' FSDP gathers
    and gradient reductions. Before, XLA partitioned the block-sparse path's tile gathers by
    computing every head on each tensor rank: 1.6 MB of all-reduces and all-gathers here
    against 0.57 MB. A per-head mask keeps the heads whole (rows split only); both equal one
    device's gradients."""
    out = run_python(ATTENTION_UNDER_TENSOR_PARALLELISM, devices=8)
    causal, weights = out["causal"]["bytes"], out["param_bytes"]
    assert set(causal) <= {"all-reduce", "all-gather", "reduce-scatter"}, out
    assert causal.get("all-reduce", 0) <= 4 * out["x_bytes"] + weights, out
    assert causal.get("all-gather", 0) <= weights, out
    assert out["causal"]["err"] < 1e-5 and out["per_head"]["err"] < 1e-5, out

MULTI_HOST = ["train.steps=10", "train.checkpoint_every=3", "mesh.data=2", "mesh.fsdp=2",
              "mesh.preset=fsdp"]

WORKER = r"""
import json, os, signal, jax
from jaxsparse.parallel import distributed
if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    distributed.initialize()
from helpers import tiny_config, TINY
from jaxsparse.data import make_stream
from jaxsparse.data.stream import Shard
from jaxsparse.train import train
cfg = tiny_config(*OVERRIDES)
kill_at = int(os.environ.get("KILL_AT", "0"))

def kill_after(step):  # a preemption: SIGKILL, so nothing gets a chance to save
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return False

rows = make_stream(cfg, Shard(jax.process_index(), jax.process_count())).batch(0)["inputs"].shape[0]
print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                  "devices": jax.device_count(), "local_rows": rows}), flush=True)
result = train(cfg, os.environ["WORKDIR"], sample=False, quiet=True, should_stop=kill_after)
print(json.dumps({"losses": result.losses}))
""".replace("OVERRIDES", repr(MULTI_HOST))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(command: list[str], processes: int, env: dict) -> list[subprocess.Popen]:
    """``processes`` local processes of one jax.distributed job (one CPU device each, gloo)."""
    env = dict(emulated_devices_env(1), PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
               JAX_NUM_PROCESSES=str(processes), **env)
    return [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=ROOT, env=dict(env, JAX_PROCESS_ID=str(i)))
            for i in range(processes)]


def _train_losses(workdir) -> dict[int, list[float]]:
    """Every training loss process 0 logged, by step (a step logged twice appears twice)."""
    by_step: dict[int, list[float]] = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["split"] == "train":
            by_step.setdefault(record["step"], []).append(record["loss"])
    return by_step


@pytest.mark.slow  # ~75 s on 2 cores; resume in one process (tests/test_train.py) and 8 -> 4
# device checkpoint restores (below) stay in the default run
def test_four_processes_train_are_killed_and_resume_with_the_same_losses(tmp_path):
    """A 4-process job (gloo, FSDP across processes) trains and checkpoints, every process is
    SIGKILLed after step 7, and `jaxsparse train` — started by the environment variables a
    cluster launcher sets — resumes from the last checkpoint to step 10. The losses of every
    step equal one process with 4 devices; each process read a quarter of every batch; only
    process 0 wrote metrics."""
    workdir = tmp_path / "multi"
    procs = _launch([sys.executable, "-c", WORKER], 4, {"WORKDIR": str(workdir), "KILL_AT": "7"})
    for i, p in enumerate(procs):
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == -9, stderr[-3000:]  # killed, as planned
        started = json.loads(stdout.splitlines()[0])
        assert started == {"process": i, "processes": 4, "devices": 4, "local_rows": 2}
    first = _train_losses(workdir)
    assert sorted(first) == list(range(1, 8)) and all(len(v) == 1 for v in first.values())
    saved = sorted(int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit())
    assert saved and max(saved) in (3, 6)  # step 6's asynchronous save may not have finished

    from helpers import TINY
    sets = [arg for item in TINY + MULTI_HOST for arg in ("--set", item)]
    procs = _launch([sys.executable, "-m", "jaxsparse.cli", "train", "--config", "transformer_tiny",
                     "--workdir", str(workdir), *sets], 4, {})
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-3000:]
    assert f"resumed from {workdir}/checkpoints step {max(saved)}" in outputs[0][0]
    assert "resumed" not in outputs[1][0]  # only process 0 talks
    both = _train_losses(workdir)
    assert sorted(both) == list(range(1, 11))

    single = run_python(WORKER, devices=4, env={"WORKDIR": str(tmp_path / "single")})
    for step, logged in both.items():
        np.testing.assert_allclose(logged, [single["losses"][str(step - 1)]] * len(logged),
                                   rtol=1e-5, err_msg=f"step {step}")


EXPERT_PARALLEL = r"""
import json, jax, numpy as np
from helpers import tiny_config
from jaxsparse.parallel import make_mesh
from jaxsparse.train.state import TrainSetup
from jaxsparse.train.step import make_train_step
from jaxsparse.data import make_stream

def run(devices, *mesh):
    cfg = tiny_config("model.moe_experts=4", "model.moe_k=2", "model.moe_d_ff=32", *mesh)
    setup = TrainSetup(cfg, make_mesh(cfg.mesh, devices))
    state, step, stream = setup.init(), make_train_step(setup), make_stream(cfg)
    metrics = []
    for i in range(3):
        state, m = step(state, setup.global_batch(stream.batch(i)))
        metrics.append({k: float(m[k]) for k in ("loss", "aux_loss", "moe_max_load")})
    return state, metrics

single, single_metrics = run(jax.devices()[:1])
out = {"single": single_metrics}
for name, mesh in {"data x expert": ("mesh.data=2", "mesh.expert=4"),
                   "fsdp x expert": ("mesh.data=1", "mesh.fsdp=2", "mesh.expert=4")}.items():
    state, metrics = run(jax.devices(), *mesh)
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                         single["params"], state["params"])
    gate = state["params"]["blocks"][1]["mlp"]["w_gate"]
    out[name] = {"metrics": metrics, "max_param_diff": max(jax.tree.leaves(diffs)),
                 "spec": [s if s is None or isinstance(s, str) else list(s) for s in gate.sharding.spec],
                 "shard_shape": list(gate.addressable_shards[0].data.shape)}
print(json.dumps(out))
"""


@pytest.mark.slow  # the default run keeps Hydra's 8-device test (data x FSDP x expert, chunk MoE)
def test_expert_parallel_training_matches_one_device():
    """Experts split 4 ways (with data or FSDP parallelism beside them): the same losses, router
    losses and parameters as one device (dropless, so nothing depends on the split)."""
    out = run_python(EXPERT_PARALLEL, devices=8)
    for name in ("data x expert", "fsdp x expert"):
        for key in ("loss", "aux_loss", "moe_max_load"):
            np.testing.assert_allclose([m[key] for m in out[name]["metrics"]],
                                       [m[key] for m in out["single"]], rtol=2e-5, err_msg=key)
        assert out[name]["max_param_diff"] < 1e-5, name
        assert out[name]["spec"][0] == "expert"  # experts really are split
        assert out[name]["shard_shape"][0] == 1  # 4 experts over 4 devices


SAVE_ON_8 = r"""
import json, os, jax, numpy as np
from helpers import tiny_config
from jaxsparse.config import MeshConfig
from jaxsparse.train import load, train
workdir = os.environ["WORKDIR"]
if os.environ["PHASE"] == "save":
    cfg = tiny_config("train.steps=2", "train.checkpoint_every=2", "mesh.data=1", "mesh.fsdp=8",
                      "mesh.preset=fsdp")
    result = train(cfg, workdir, sample=False, quiet=True)
    step = 2
else:
    step = 4
_, setup, state = load(workdir, mesh=MeshConfig(data=1, fsdp=8, preset="fsdp"))
gate = state["params"]["blocks"][0]["mlp"]["gate"]["kernel"]
np.savez(os.environ["DUMP"], *[np.asarray(x) for x in jax.tree.leaves(state["params"])])
print(json.dumps({"step": int(state["step"]), "spec": [str(a) for a in gate.sharding.spec],
                  "shard": list(gate.addressable_shards[0].data.shape)}))
"""

RESTORE_ON_4 = r"""
import json, os, dataclasses, jax, numpy as np
from helpers import worst
from helpers import tiny_config
from jaxsparse.config import ConfigError, MeshConfig
from jaxsparse.train import load, train
workdir = os.environ["WORKDIR"]
_, setup, state = load(workdir, mesh=MeshConfig(data=2, tensor=2, preset="fsdp_tp"))
saved = np.load(os.environ["DUMP"])
leaves = jax.tree.leaves(state["params"])
diff = worst(float(np.max(np.abs(np.asarray(a) - saved[f"arr_{i}"]))) for i, a in enumerate(leaves))
gate = state["params"]["blocks"][0]["mlp"]["gate"]["kernel"]
errors = []
for mesh in (MeshConfig(data=1, tensor=3, preset="fsdp_tp"), MeshConfig(data=2, expert=2, preset="full"),
             MeshConfig(data=3, tensor=2)):
    try:
        load(workdir, mesh=mesh)
        errors.append(None)
    except ConfigError as err:
        errors.append(str(err))
# a mesh whose data axis does not split the run's batch of 8: loaded (other batches may), said
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    _, odd, _ = load(workdir, mesh=MeshConfig(data=3), devices=jax.devices()[:3])
split_warnings = [str(w.message) for w in caught if "no data parallelism" in str(w.message)]
# continue training on the new mesh from the restored step
cfg = tiny_config("train.steps=4", "train.checkpoint_every=2", "mesh.data=2", "mesh.tensor=2",
                  "mesh.preset=fsdp_tp")
result = train(cfg, workdir, sample=False, quiet=True)
np.savez(os.environ["DUMP"], *[np.asarray(x) for x in jax.tree.leaves(result.state["params"])])
print(json.dumps({"step": int(state["step"]), "max_diff": diff, "errors": errors,
                  "spec": [str(a) for a in gate.sharding.spec],
                  "shard": list(gate.addressable_shards[0].data.shape),
                  "resumed_steps": sorted(int(k) for k in result.losses),
                  "split_warnings": split_warnings,
                  "odd_batch_spec": [str(a) for a in odd.batch_sharding.spec]}))
"""


def test_checkpoint_written_on_8_devices_restores_onto_4_devices_and_back(tmp_path):
    """Resharding restore: saved with fsdp=8 on 8 devices, restored as data=2 x tensor=2 on 4
    (every array equal, now split over tensor), trained on there, and restored back onto the
    8-device FSDP mesh; meshes the model cannot use are refused by name."""
    env = {"WORKDIR": str(tmp_path / "run"), "DUMP": str(tmp_path / "params.npz")}
    saved = run_python(SAVE_ON_8, devices=8, env=env | {"PHASE": "save"})
    assert saved["step"] == 2 and saved["spec"] == ["fsdp", "None"] and saved["shard"] == [4, 64]
    moved = run_python(RESTORE_ON_4, devices=4, env=env)
    assert moved["step"] == 2 and moved["max_diff"] == 0.0
    assert moved["spec"] == ["None", "tensor"] and moved["shard"] == [32, 32]
    assert moved["resumed_steps"] == [2, 3]  # steps 3 and 4 (0-based), after the restored 2
    assert "mesh.tensor=3 must divide model.n_heads=4" in moved["errors"][0]
    assert "mesh.expert=2 needs MoE layers" in moved["errors"][1]
    assert "needs 6 devices but 4 are available" in moved["errors"][2]
    # train and dryrun refuse a batch the data axis cannot split; load said nothing and the
    # batch sharding quietly fell back to replication
    assert moved["odd_batch_spec"] == ["None", "None"]
    assert len(moved["split_warnings"]) == 1
    assert "data.batch_size=8 is not divisible by the data-parallel size 3" in \
        moved["split_warnings"][0]
    back = run_python(SAVE_ON_8, devices=8, env=env | {"PHASE": "restore", "DUMP": str(tmp_path / "back.npz")})
    assert back["step"] == 4 and back["spec"] == ["fsdp", "None"]
    ours, theirs = np.load(tmp_path / "params.npz"), np.load(tmp_path / "back.npz")
    assert len(ours.files) == len(theirs.files) > 10
    for name in ours.files:
        np.testing.assert_array_equal(ours[name], theirs[name])


def test_emulated_devices_env_keeps_other_xla_flags_and_replaces_the_count():
    env = emulated_devices_env(8, {"XLA_FLAGS": "--xla_dump_to=/tmp/d "
                                                "--xla_force_host_platform_device_count=2",
                                   "JAX_PLATFORMS": "cuda", "HOME": "/h"})
    assert env["XLA_FLAGS"].split() == ["--xla_dump_to=/tmp/d",
                                        "--xla_force_host_platform_device_count=8"]
    assert env["JAX_PLATFORMS"] == "cpu" and env["HOME"] == "/h"
    assert emulated_devices_env(1, {})["XLA_FLAGS"] == "--xla_force_host_platform_device_count=1"


@pytest.mark.parametrize("mesh, fragment", [
    (dict(data=-1, fsdp=-1), "mesh: at most one axis may be -1"),
    (dict(data=-2, fsdp=-4), "mesh.data=-2: must be >= 1, or -1 for 'the rest'"),
    (dict(data=0), "mesh.data=0: must be >= 1, or -1 for 'the rest'"),
    (dict(data=2.0, fsdp=4), "mesh.data=2.0: must be an integer (>= 1, or -1 for 'the rest'), "
                             "not float"),
    (dict(data=-1, tensor=True), "mesh.tensor=True: must be an integer"),
])
def test_mesh_shape_and_make_mesh_refuse_bad_axis_sizes_by_name(mesh, fragment):
    """The public helpers check what validate() checks: a MeshConfig built in Python (never
    validated) gets the same ConfigError, not a silent product of 64 or a numpy error."""
    import jax

    from jaxsparse.config import ConfigError, MeshConfig
    from jaxsparse.parallel import make_mesh, mesh_shape

    with pytest.raises(ConfigError) as err:
        mesh_shape(MeshConfig(**mesh), 8)
    assert fragment in str(err.value)
    with pytest.raises(ConfigError, match="mesh"):
        make_mesh(MeshConfig(**mesh), jax.devices()[:1])


@pytest.mark.parametrize("config, overrides, devices, fragment", [
    ("mamba2_tiny", ["mesh.tensor=-1", "model.d_model=32"], 4,
     "mesh.tensor=4 must divide the 2 SSM heads"),
    ("moe_tiny", ["mesh.expert=-1", "model.moe_experts=4"], 8,
     "mesh.expert=8 must divide model.moe_experts=4"),
    ("transformer_tiny", ["mesh.expert=-1"], 4, "mesh.expert=4 needs MoE layers"),
    ("transformer_tiny", ["mesh.sequence=-1"], 3, "mesh.sequence=3 must divide data.seq_len=128"),
    ("transformer_tiny", ["mesh.tensor=-1", "model.n_kv_heads=2"], 4,
     "mesh.tensor=4 must divide model.n_kv_heads=2"),
    ("transformer_tiny", ["mesh.preset=fsdp", "mesh.fsdp=-1"], 3,
     "data.batch_size=32 is not divisible by the data-parallel size 3"),
])
def test_a_minus_one_axis_gets_the_config_checks_once_resolved(config, overrides, devices,
                                                               fragment):
    """validate() cannot know the size of a -1 axis; check_mesh runs the very same checks on
    the size it resolves to (train, load and the dry run call it before building anything),
    naming the -1 it came from."""
    from jaxsparse import configs
    from jaxsparse.config import ConfigError, apply_overrides, validate
    from jaxsparse.parallel import check_batch_split
    from jaxsparse.parallel.mesh import check_mesh

    cfg = validate(apply_overrides(configs.get(config), ["mesh.data=1", *overrides]))
    with pytest.raises(ConfigError) as err:
        check_batch_split(cfg, check_mesh(cfg, devices))
    assert fragment in str(err.value)
    if "data.batch_size" not in fragment:
        assert "=-1 is " in str(err.value) and f"the rest of {devices} devices" in str(err.value)
    # the same axes resolved to sizes that fit are accepted
    assert check_mesh(cfg, 1) == dict.fromkeys(("data", "fsdp", "expert", "sequence", "tensor"), 1)


MINUS_ONE_EXPERT_AXIS = r"""
import json, os, jax
from helpers import TINY
from jaxsparse import configs
from jaxsparse.config import ConfigError, apply_overrides
from jaxsparse.train import train
workdir = os.environ["WORKDIR"]
cfg = apply_overrides(configs.get("moe_tiny"), TINY + ["model.moe_experts=4", "mesh.data=1",
                                                       "mesh.expert=-1"])
try:
    train(cfg, workdir, sample=False, quiet=True)
    error = None
except ConfigError as err:
    error = str(err)
print(json.dumps({"error": error, "workdir_exists": os.path.exists(workdir)}))
"""


def test_train_refuses_a_minus_one_expert_axis_the_experts_cannot_split_before_the_workdir(
        tmp_path):
    """8 devices, 4 experts, mesh.expert=-1: refused by name before config.json and
    checkpoints/ are written (it was a ValueError from the MoE layer after)."""
    out = run_python(MINUS_ONE_EXPERT_AXIS, devices=8, env={"WORKDIR": str(tmp_path / "run")})
    assert "mesh.expert=8 must divide model.moe_experts=4" in out["error"]
    assert not out["workdir_exists"]


def test_the_worst_gradient_error_is_nan_when_any_leaf_is_nan():
    """The sharded-gradient checks took Python's ``max`` of per-leaf errors, which keeps a NaN
    only when it comes first: a program whose second parameter's gradient was NaN reported
    the first's error and passed."""
    import math

    from helpers import worst

    assert max([1e-7, float("nan"), 2e-7]) == 2e-7  # what the checks did
    assert math.isnan(worst([1e-7, float("nan"), 2e-7]))
    assert worst(x for x in (1e-7, 3e-7, 2e-7)) == 3e-7
