"""Sharding presets as data, mesh validation, dry runs (memory, FLOPs, collectives) and
per-block rematerialisation."""

import jax
import numpy as np
import pytest

from jaxsparse.cli import main
from jaxsparse.config import ConfigError, validate
from jaxsparse.dryrun import collective_summary, mesh_overrides, run_emulated
from jaxsparse.parallel import PRESETS, get_preset

from helpers import tiny_config


def test_presets_are_tables_of_logical_names_and_print(capsys):
    assert list(PRESETS) == ["data", "fsdp", "fsdp_tp", "fsdp_tp_ep", "fsdp_tp_sp", "full"]
    rules = {name: dict(p.rules) for name, p in PRESETS.items()}
    assert rules["data"]["embed"] is None and rules["data"]["batch"] == ("data",)
    assert rules["fsdp"]["embed"] == "fsdp" and rules["fsdp"]["mlp"] is None
    assert rules["fsdp_tp"]["heads"] == "tensor" and rules["fsdp_tp"]["length"] is None
    assert rules["fsdp_tp_ep"]["expert"] == "expert" and "expert" in rules["fsdp_tp_ep"]["batch"]
    assert rules["fsdp_tp_sp"]["length"] == "sequence"
    assert main(["configs", "--sharding", "fsdp_tp_sp"]) == 0
    out = capsys.readouterr().out
    assert "mesh axes: data, fsdp, sequence, tensor" in out
    assert "length           sequence" in out and "heads            tensor" in out
    assert main(["configs", "--sharding", "zero3"]) == 2
    assert "'zero3' is not a sharding preset; allowed: data, fsdp" in capsys.readouterr().err
    with pytest.raises(ValueError, match="mesh.preset='zero3'"):
        get_preset("zero3")


@pytest.mark.parametrize("overrides,message", [
    (("mesh.preset=fsdp", "mesh.tensor=2"),
     "mesh.tensor=2: sharding preset 'fsdp' does not use the tensor axis (it uses data, fsdp)"),
    (("mesh.preset=data", "mesh.data=1", "mesh.fsdp=-1"), "mesh.fsdp=-1: sharding preset 'data'"),
    (("mesh.preset=fsdp_tp_ep",),
     "mesh.preset='fsdp_tp_ep' splits MoE experts over the expert axis, but this transformer "
     "model has no MoE layers"),
    (("mesh.tensor=3",), "mesh.tensor=3 must divide model.n_heads=4"),
    (("mesh.tensor=4", "model.n_kv_heads=2"), "mesh.tensor=4 must divide model.n_kv_heads=2"),
    (("mesh.sequence=3",), "mesh.sequence=3 must divide data.seq_len=32"),
    (("mesh.sequence=0",), "mesh.sequence=0: must be >= 1, or -1"),
    (("mesh.preset=ring",), "mesh.preset='ring': allowed data, fsdp, fsdp_tp"),
    (("mesh.data=-1", "mesh.fsdp=-1"), "at most one axis may be -1"),
])
def test_meshes_a_model_or_preset_cannot_use_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(tiny_config(*overrides))
    assert message in str(err.value)


def test_mesh_flags_and_collective_parsing():
    overrides, devices = mesh_overrides("data=16, fsdp=4,tensor=2")
    assert devices == 128
    assert overrides == ["mesh.data=16", "mesh.fsdp=4", "mesh.expert=1", "mesh.sequence=1",
                         "mesh.tensor=2"]
    for bad in ("daat=2", "fsdp=0", "fsdp=two"):
        with pytest.raises(ConfigError, match="must be AXIS=SIZE"):
            mesh_overrides(bad)
    hlo = """
  %all-gather.1 = f32[32,16]{0,1} all-gather(%copy), channel_id=1, dimensions={1}
  %ar = (bf16[8]{0}, f32[2,3]{1,0}) all-reduce(%a, %b), to_apply=%sum
  %cp = s32[4]{0} collective-permute-start(%x), source_target_pairs={{0,1}}
  %add = f32[4]{0} add(%p, %q)
  %ar.2 = f32[64]{0} all-reduce(%c), replica_groups={{0,1},{2,3}}, to_apply=%sum
  %ar.3 = f32[64]{0} all-reduce(%c), replica_groups=[2,4]<=[8], to_apply=%sum
  %ar.4 = f32[64]{0} all-reduce(%c), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, to_apply=%sum
  %one.1 = f32[999]{0} all-reduce(%c), replica_groups={{0},{1},{2},{3}}, to_apply=%sum
  %one.2 = f32[999]{0} all-reduce(%c), replica_groups=[8,1]<=[8], to_apply=%sum
  %one.3 = f32[999]{0} all-gather(%c), replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_1'}, dimensions={0}
"""
    # groups of one device each move nothing (shard_map's transpose emits such all-reduces)
    assert collective_summary(hlo) == {"all-reduce": {"count": 4, "bytes": 16 + 24 + 3 * 256},
                                       "all-gather": {"count": 1, "bytes": 2048},
                                       "collective-permute": {"count": 1, "bytes": 16}}


# a compiled module's shape (XLA:CPU, abridged): a ring's loop of 3 steps with an exchange and,
# nested in it, a loop of 2 with an all-reduce; loops of unknown length, one in the other; a
# conditional
LOOPS_HLO = """
HloModule jit_f, entry_computation_layout={(f32[2]{0})->f32[2]{0}}

%sum (a: f32[], b: f32[]) -> f32[] {
  ROOT %add = f32[] add(%a, %b)
}

%inner_body (param: (s32[], f32[2])) -> (s32[], f32[2]) {
  %psum.7 = f32[2]{0} all-reduce(%x), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%sum
}

%ring_body (param.2: (s32[], f32[2])) -> (s32[], f32[2]) {
  %ppermute.3 = f32[2]{0} collective-permute(%y), channel_id=2, source_target_pairs={{0,1},{1,0}}
  %while.20 = (s32[], f32[2]{0}) while(%t), condition=%cond, body=%inner_body, backend_config={"known_induction_variable":{"tuple_index":"0"},"known_trip_count":{"n":"2"}}
}

%inner_open (param.4: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ag.2 = f32[8]{0} all-gather(%w), replica_groups={{0,1,2,3}}, dimensions={0}
}

%open_body (param.3: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ag = f32[8]{0} all-gather(%z), replica_groups={{0,1,2,3}}, dimensions={0}
  %while.24 = (s32[], f32[8]{0}) while(%tuple.16), condition=%cond.4, body=%inner_open
}

%branch_a (p: f32[2]) -> f32[2] {
  %cp.9 = f32[2]{0} collective-permute(%p), source_target_pairs={{0,1}}
}

%branch_b (p: f32[2]) -> f32[2] {
  ROOT %n = f32[2]{0} negate(%p)
}

ENTRY %main.8_spmd (param.5: f32[2]) -> f32[2] {
  %while.22 = (s32[], f32[2]{0}) while(%tuple.14), condition=%cond.2, body=%ring_body, backend_config={"known_init_step":{"init":"0","step":"1"},"known_trip_count":{"n":"3"}}
  %while.23 = (s32[], f32[8]{0}) while(%tuple.15), condition=%cond.3, body=%open_body
  %c = f32[2]{0} conditional(%i, %a, %b), branch_computations={%branch_a, %branch_b}
  %ar.1 = f32[2]{0} all-reduce(%c), replica_groups={{0,1,2,3}}, to_apply=%sum
}
"""


def test_collectives_in_loops_count_once_per_trip():
    """A ring's exchanges sit in a loop body: counted once per trip (3 exchanges, 3 x 2 nested
    all-reduces and the one outside); they were counted once each, under-reporting the
    sequence-parallel preset ~1.6x at 4 devices. A loop of unknown length counts its body once,
    and says how many ops it counted so (nested in another such loop, each op still once: it
    was counted twice)."""
    assert collective_summary(LOOPS_HLO) == {
        "all-reduce": {"count": 7, "bytes": 7 * 8},
        "all-gather": {"count": 2, "bytes": 64, "unknown_trips": 2},  # each op once
        "collective-permute": {"count": 3 + 1, "bytes": 4 * 8}}


def test_dryrun_reports_memory_flops_and_the_collectives_of_each_preset():
    """Compile-only: FSDP halves the per-device parameter bytes of data parallelism on 2
    devices and brings all-gathers; the sequence preset exchanges K/V blocks around a ring
    (collective-permutes); FLOPs per device halve with the batch."""
    base = ["data.batch_size=4", "data.seq_len=64"]
    data = run_emulated("transformer_tiny", 2, base + ["mesh.preset=data", "mesh.data=2"], True)
    fsdp = run_emulated("transformer_tiny", 2, base + ["mesh.preset=fsdp", "mesh.data=1",
                                                       "mesh.fsdp=2"], True)
    ring = run_emulated("transformer_tiny", 2, base + ["mesh.preset=fsdp_tp_sp", "mesh.data=1",
                                                       "mesh.sequence=2"], True)
    single = run_emulated("transformer_tiny", 1, base + ["mesh.preset=data"], True)
    assert data["mesh"]["data"] == 2 and fsdp["mesh"]["fsdp"] == 2
    assert fsdp["param_bytes_per_device"] < 0.6 * data["param_bytes_per_device"]
    assert data["param_bytes_per_device"] == single["param_bytes_per_device"]
    assert "all-gather" in fsdp["collectives"] and "all-gather" not in data["collectives"]
    assert "all-reduce" in data["collectives"] and single["collectives"] == {}
    assert "collective-permute" in ring["collectives"]
    np.testing.assert_allclose(data["flops_per_device"], single["flops_per_device"] / 2, rtol=0.05)
    assert data["compiled_temp_bytes_per_device"] > 0


def test_remat_recomputes_blocks_without_changing_the_step():
    """model.remat=true: every block is rematerialised (one remat region per block in the
    traced step) and the step is unchanged — losses, gradient norms, and for Hydra its sown MoE
    losses and shared workspace. (XLA:CPU merges the recomputation back into the forward pass,
    so what remat saves shows only on accelerators.)"""
    from jaxsparse.parallel import make_mesh
    from jaxsparse.train.state import TrainSetup
    from jaxsparse.train.step import make_train_step
    from jaxsparse.data import make_stream

    hydra = ("model.name=hydra", "model.hydra_window=8", "model.hydra_max_global=4",
             "model.hydra_ssm_width=16", "model.moe_experts=4", "model.moe_k=2",
             "model.moe_d_ff=32", "model.workspace_slots=4", "model.workspace_chunk=8")
    for extra in ((), hydra):
        out, regions = [], []
        for remat in ("false", "true"):
            cfg = tiny_config(f"model.remat={remat}", *extra)
            setup = TrainSetup(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
            state, step, stream = setup.init(), make_train_step(setup), make_stream(cfg)
            batch = setup.global_batch(stream.batch(0))
            regions.append(str(step.trace(state, batch).jaxpr).count("remat"))
            state, metrics = step(state, batch)
            out.append([float(metrics[k]) for k in ("loss", "aux_loss", "grad_norm")])
        np.testing.assert_allclose(out[1], out[0], rtol=1e-6)
        assert regions == [0, cfg.model.n_layers]


@pytest.mark.parametrize("extra", [(), ("model.tie_embeddings=true",)])
def test_chunked_loss_equals_the_whole_sequence_loss(extra):
    """train.loss_chunk: the head and loss run 7 positions at a time (32 is not a multiple:
    the last chunk is padded and masked) — the same loss, accuracy and gradients."""
    from jaxsparse.parallel import make_mesh
    from jaxsparse.train.state import TrainSetup
    from jaxsparse.train.step import make_train_step
    from jaxsparse.data import make_stream

    out = []
    for chunk in (0, 7):
        cfg = tiny_config(f"train.loss_chunk={chunk}", *extra)
        setup = TrainSetup(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
        state, step, stream = setup.init(), make_train_step(setup), make_stream(cfg)
        for i in range(2):
            state, metrics = step(state, setup.global_batch(stream.batch(i)))
        out.append([float(metrics[k]) for k in ("loss", "accuracy", "grad_norm")])
    np.testing.assert_allclose(out[1], out[0], rtol=2e-6)
    with pytest.raises(ConfigError, match="train.loss_chunk=-1: must be >= 0"):
        validate(tiny_config("train.loss_chunk=-1"))


def test_under_sequence_parallelism_the_loss_chunks_stay_on_their_shards():
    """fsdp2 × sequence2 (4 emulated devices), 32 positions in chunks of 6 (each shard's 16
    padded to 18): the same loss, accuracy and gradient norm as the whole-sequence loss on the
    same mesh; what the chunking gathers beyond the whole-sequence loss is the output head's
    FSDP-split parameters (at most once per step and pass), no activations. A step over one
    global chunk, which one shard holds, also gathered that chunk in every step of the
    backward pass."""
    from helpers import run_python

    code = """
import json, jax
from helpers import tiny_config
from jaxsparse.data import make_stream
from jaxsparse.dryrun import collective_summary
from jaxsparse.parallel import make_mesh
from jaxsparse.train.state import TrainSetup
from jaxsparse.train.step import make_train_step
out = {}
for chunk in (0, 6):
    cfg = tiny_config(f"train.loss_chunk={chunk}", "mesh.preset=fsdp_tp_sp", "mesh.data=1",
                      "mesh.fsdp=2", "mesh.sequence=2", "data.batch_size=4")
    setup = TrainSetup(cfg, make_mesh(cfg.mesh))
    state, step, stream = setup.init(), make_train_step(setup), make_stream(cfg)
    batch = setup.global_batch(stream.batch(0))
    gathered = collective_summary(step.lower(state, batch).compile().as_text()).get(
        "all-gather", {"bytes": 0})["bytes"]
    state, metrics = step(state, batch)
    out[chunk] = {"metrics": [float(metrics[k]) for k in ("loss", "accuracy", "grad_norm")],
                  "gathered": gathered}
m = cfg.model
out["head_bytes"] = (m.d_model * m.vocab_size + m.d_model) * 4  # output head and final norm
print(json.dumps(out))
"""
    out = run_python(code, devices=4)
    np.testing.assert_allclose(out["6"]["metrics"], out["0"]["metrics"], rtol=2e-6)
    steps = 3  # 16 positions per shard, padded to 18: 3 chunks of 6
    extra = out["6"]["gathered"] - out["0"]["gathered"]
    assert extra <= steps * 2 * out["head_bytes"], out  # was 8.2x the head's bytes


def test_a_masked_positions_target_is_not_read():
    """An ignore label (-100) at a masked position made the cross-entropy NaN, and NaN times
    the 0 mask poisoned the summed loss and its gradient."""
    import jax.numpy as jnp

    from jaxsparse.train.step import masked_token_stats

    logits = jax.random.normal(jax.random.key(0), (1, 3, 5))
    mask = jnp.array([[1.0, 0.0, 0.0]])
    stats = lambda targets: masked_token_stats(logits, targets, mask)  # noqa: E731
    ignored, clean = stats(jnp.array([[1, -100, 7]])), stats(jnp.array([[1, 0, 0]]))
    np.testing.assert_array_equal(np.array(ignored), np.array(clean))
    assert np.isfinite(float(ignored[0]))
    grad = jax.grad(lambda l: masked_token_stats(l, jnp.array([[1, -100, 7]]), mask)[0])(logits)
    assert np.all(np.isfinite(np.asarray(grad))) and not np.any(np.asarray(grad)[0, 1:])
