"""Workspace memory (Hydra): chunk-causal reads, the gated slot update written out by hand,
prefixes that give the same reads as the whole sequence, gradients and bad input."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import run_python
from jaxsparse.ops.workspace import read_slots, workspace_memory, workspace_update


def setup(key, b=2, length=23, d=8, slots=4):
    ks = jax.random.split(key, 8)
    x = jax.random.normal(ks[0], (b, length, d))
    queries = jax.random.normal(ks[1], (b, length, d))
    init = jax.random.normal(ks[2], (slots, d))
    weights = {"wq": jax.random.normal(ks[3], (d, d)) / d**0.5,
               "wk": jax.random.normal(ks[4], (d, d)) / d**0.5,
               "wv": jax.random.normal(ks[5], (d, d)) / d**0.5,
               "wg": jax.random.normal(ks[6], (2 * d, d)) / (2 * d)**0.5,
               "bg": jax.random.normal(ks[7], (d,))}
    return x, queries, init, weights


def softmax(z):
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def test_reads_and_updates_follow_the_written_out_equations():
    x, queries, init, w = setup(jax.random.key(0), b=1, length=7)
    reads, final = workspace_memory(x, queries, init, w, chunk=3)
    x, queries, init = np.asarray(x[0], np.float64), np.asarray(queries[0], np.float64), np.asarray(init, np.float64)
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    state, expected = init, []
    for start in range(0, 7, 3):
        chunk, q = x[start:start + 3], queries[start:start + 3]
        expected.append(softmax(q @ state.T / np.sqrt(8)) @ state)
        u = softmax((state @ w["wq"]) @ (chunk @ w["wk"]).T / np.sqrt(8)) @ (chunk @ w["wv"])
        g = 1 / (1 + np.exp(-(np.concatenate([state, u], -1) @ w["wg"] + w["bg"])))
        state = g * state + (1 - g) * u
    np.testing.assert_allclose(reads[0], np.concatenate(expected), atol=1e-5)
    np.testing.assert_allclose(final[0], state, atol=1e-5)


def test_every_prefix_reads_what_the_whole_sequence_reads():
    """Chunk causality: a token's read depends only on earlier chunks, so running any prefix
    (a decoder that has seen t tokens) gives the same reads; changing later tokens, even in
    the same chunk, changes nothing before them."""
    x, queries, init, w = setup(jax.random.key(1))
    full, _ = workspace_memory(x, queries, init, w, chunk=5)
    for t in (0, 4, 5, 13, 22):
        prefix, _ = workspace_memory(x[:, :t + 1], queries[:, :t + 1], init, w, chunk=5)
        np.testing.assert_allclose(prefix, full[:, :t + 1], atol=1e-6)
        changed = x.at[:, t + 1:].add(3.0)
        again, _ = workspace_memory(changed, queries, init, w, chunk=5)
        np.testing.assert_array_equal(again[:, :t + 1], full[:, :t + 1])


def test_first_chunk_reads_the_initial_slots_and_gradients_reach_everything():
    x, queries, init, w = setup(jax.random.key(2), length=12)
    reads, _ = workspace_memory(x, queries, init, w, chunk=4)
    first = jax.nn.softmax(jnp.einsum("bkd,md->bkm", queries[:, :4], init) / jnp.sqrt(8.0)) @ init
    np.testing.assert_allclose(reads[:, :4], first, atol=1e-5)

    def loss(init, w, x):
        return jnp.sum(workspace_memory(x, queries, init, w, chunk=4)[0] ** 2)

    g_init, g_w, g_x = jax.grad(loss, argnums=(0, 1, 2))(init, w, x)
    assert float(jnp.abs(g_init).max()) > 0 and float(jnp.abs(g_x[:, :8]).max()) > 0
    assert float(jnp.abs(g_x[:, 8:]).max()) == 0.0  # the last chunk updates nothing anyone reads
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_w))


def chunk_by_chunk(x, queries, init, w, chunk):
    """The workspace one chunk at a time through ``read_slots`` and ``workspace_update`` (the
    decode path's pieces), padding the last chunk."""
    b, length, _ = x.shape
    state, reads = jnp.broadcast_to(init, (b, *init.shape)), []
    for start in range(0, length, chunk):
        x_c, q_c = x[:, start:start + chunk], queries[:, start:start + chunk]
        reads.append(read_slots(q_c, state))
        n = x_c.shape[1]
        valid = jnp.broadcast_to(jnp.arange(chunk) < n, (b, chunk))
        state = workspace_update(state, jnp.pad(x_c, ((0, 0), (0, chunk - n), (0, 0))), w, valid)
    return jnp.concatenate(reads, axis=1), state


@pytest.mark.parametrize("length", [19, 20])  # a ragged last chunk (masked) and none (no mask)
def test_values_and_gradients_equal_the_chunk_by_chunk_recurrence(length):
    """The hoisted projections and batched reads give the recurrence's reads, final state and
    gradients."""
    x, queries, init, w = setup(jax.random.key(5), b=3, length=length, d=8, slots=5)
    probe = jax.random.normal(jax.random.key(6), (3, length, 8))

    def loss(fn, init, w, x, queries):
        reads, final = fn(x, queries, init, w, 4)
        return jnp.sum(reads * probe) + jnp.sum(final ** 2)

    fast = lambda *a: workspace_memory(*a[:4], chunk=a[4])  # noqa: E731
    got = jax.jit(jax.value_and_grad(lambda *a: loss(fast, *a), argnums=(0, 1, 2, 3)))(
        init, w, x, queries)
    want = jax.jit(jax.value_and_grad(lambda *a: loss(chunk_by_chunk, *a), argnums=(0, 1, 2, 3)))(
        init, w, x, queries)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5 * float(jnp.abs(r).max()))


def test_padding_tokens_leave_the_state_alone():
    x, queries, init, w = setup(jax.random.key(3), b=1, length=4)
    state = jnp.broadcast_to(init, (1, 4, 8))
    unchanged = workspace_update(state, x, w, jnp.zeros((1, 4), bool))
    np.testing.assert_array_equal(unchanged, state)


def test_bad_workspace_input_is_refused():
    x, queries, init, w = setup(jax.random.key(4))
    with pytest.raises(ValueError, match="chunk=0"):
        workspace_memory(x, queries, init, w, chunk=0)
    with pytest.raises(ValueError, match="must agree on the width"):
        workspace_memory(x, queries[..., :4], init, w, chunk=4)
    with pytest.raises(ValueError, match="chunk=2.5: must be an integer >= 1"):
        workspace_memory(x, queries, init, w, chunk=2.5)
    with pytest.raises(ValueError, match=r"x must be \[batch, length, d\]; got \(23, 8\)"):
        workspace_memory(x[0], queries[0], init, w, chunk=4)
    for slots in (init[0], init[None]):
        message = r"init_MD .* \[slots, d=8\]; got " + re.escape(str(slots.shape))
        with pytest.raises(ValueError, match=message):
            workspace_memory(x, queries, slots, w, chunk=4)
    with pytest.raises(ValueError, match=r"weights lack \['wg'\]"):
        workspace_memory(x, queries, init, {k: v for k, v in w.items() if k != "wg"}, chunk=4)
    with pytest.raises(ValueError, match=r"weights\['wk'\] has shape \(8, 9\); must be \(8, 8\)"):
        workspace_memory(x, queries, init, w | {"wk": jnp.ones((8, 9))}, chunk=4)
    with pytest.raises(ValueError, match=r"weights\['wq'\] has shape \(8,\)"):
        workspace_update(jnp.ones((2, 4, 8)), x, w | {"wq": jnp.ones(8)})


def test_bad_workspace_module_options_and_inputs_are_refused():
    from flax import nnx

    from jaxsparse.nn.workspace import WorkspaceMemory

    for options, message in (((0, 2, 2), "d_model=0"), ((8, 2, 2.5), "chunk=2.5"),
                             ((8, True, 2), "slots=True")):
        with pytest.raises(ValueError, match=f"{message}: must be an integer >= 1"):
            WorkspaceMemory(*options, rngs=nnx.Rngs(0))
    ws = WorkspaceMemory(8, 2, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x must be \[batch, length, d_model=8\]; got \(6, 8\)"):
        ws(jnp.ones((6, 8)))
    with pytest.raises(ValueError, match=r"d_model=8\]; got \(1, 3, 7\)"):
        ws.decode(jnp.ones((1, 3, 7)), ws.init_cache(1), 0)
    # each failed inside dynamic_update_slice, or (a negative index) shifted the chunks silently
    x = jnp.ones((2, 3, 8))
    ws.decode(x, ws.init_cache(2), 0)  # the valid baseline
    with pytest.raises(ValueError, match="batch=0: must be an integer >= 1"):
        ws.init_cache(0)
    with pytest.raises(ValueError, match=r"cache\['state'\] of shape \(1, 2, 8\): made for "
                                         r"another batch size than the input's 2"):
        ws.decode(x, ws.init_cache(1), 0)
    # a cache made for another chunk size had its buffer writes clamped (reads off by 0.24)
    other = WorkspaceMemory(8, 2, 3, rngs=nnx.Rngs(0)).init_cache(2)
    with pytest.raises(ValueError, match=r"cache\['buffer'\] of shape \(2, 3, 8\): expected "
                                         r"\(2, 2, 8\)"):
        ws.decode(x, other, 0)
    with pytest.raises(ValueError, match=r"cache\['state'\] of shape \(2, 5, 8\): expected "
                                         r"\(2, 2, 8\)"):
        ws.decode(x, WorkspaceMemory(8, 5, 2, rngs=nnx.Rngs(0)).init_cache(2), 0)
    for index, message in [(-3, "cache_index: index=-3: must be >= 0"),
                           (1.5, r"cache_index: index of shape \(\) and dtype float32"),
                           (None, "cache_index=None")]:
        with pytest.raises(ValueError, match=message):
            ws.decode(x, ws.init_cache(2), index)


def test_fsdp_moves_the_weights_not_the_activations():
    """Under FSDP (8 emulated devices, batch and weights split over ``fsdp``) the workspace,
    run per device's rows as Hydra runs it (``batch_local``), exchanges only its parameters in
    the forward and backward: one gather of the weights and one reduction of their gradients,
    never the [batch, length, d] keys or values (which a projection by a split weight was
    compiled into: 20x the bytes), and the gradients equal those of one device. (Called bare,
    the compiler reduces the recurrence weights' gradients in every chunk of the scan: 5x the
    bytes here, hidden while the dry run counted loop bodies once.)"""
    code = """
import json, jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P
from helpers import sharded_gradient_check
from jaxsparse.nn.batch_local import batch_local
from jaxsparse.nn.workspace import WorkspaceMemory
from jaxsparse.parallel import PRESETS, activation_sharding
mesh, rules = Mesh(np.array(jax.devices()), ("fsdp",)), PRESETS["fsdp"].rules
graphdef, state = nnx.split(WorkspaceMemory(128, 8, 64, rngs=nnx.Rngs(0)))
params = nnx.to_pure_dict(state)
x = jax.random.normal(jax.random.key(1), (8, 512, 128))

def loss(p, x, mesh=None):
    with activation_sharding(mesh, rules):
        return jnp.sum(batch_local(nnx.merge(graphdef, p), x) ** 2)

collectives, err = sharded_gradient_check(loss, params, state, x, mesh, rules, P("fsdp"))
print(json.dumps({"collectives": collectives, "err": err,
                  "param_bytes": sum(v.size * 4 for v in jax.tree.leaves(params))}))
"""
    out = run_python(code, devices=8)
    moved = sum(out["collectives"].values())
    assert set(out["collectives"]) <= {"all-gather", "all-reduce", "reduce-scatter"}, out
    assert moved <= 2 * out["param_bytes"], out
    assert out["err"] < 1e-5, out


def test_sequence_parallelism_gathers_the_input_once():
    """fsdp2 × sequence4 (8 emulated devices), length split over sequence: the chunk
    recurrence needs whole rows, and the workspace (``batch_local``, as in Hydra) trades each
    device's length slice of x for a share of its rows once, an all-to-all of x (gathering
    the projected keys and values instead moved 4x the bytes); the weights are gathered and
    their gradients reduced once; gradients equal one device's."""
    code = """
import json, jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P
from helpers import sharded_gradient_check
from jaxsparse.nn.batch_local import batch_local
from jaxsparse.nn.workspace import WorkspaceMemory
from jaxsparse.parallel import PRESETS, activation_sharding
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("fsdp", "sequence"))
rules = PRESETS["fsdp_tp_sp"].rules
graphdef, state = nnx.split(WorkspaceMemory(128, 8, 64, rngs=nnx.Rngs(0)))
params = nnx.to_pure_dict(state)
x = jax.random.normal(jax.random.key(1), (8, 512, 128))

def loss(p, x, mesh=None):
    with activation_sharding(mesh, rules):
        return jnp.sum(batch_local(nnx.merge(graphdef, p), x) ** 2)

moved, err = sharded_gradient_check(loss, params, state, x, mesh, rules, P("fsdp", "sequence"))
print(json.dumps({"bytes": moved, "err": err,
                  "param_bytes": sum(v.size * 4 for v in jax.tree.leaves(params)),
                  "x_rows_bytes": x.size * 4 // 2}))
"""
    out = run_python(code, devices=8)
    assert set(out["bytes"]) <= {"all-gather", "all-reduce", "reduce-scatter", "all-to-all"}, out
    # x's rows of this device at full length, once; the weights; their gradients reduced
    assert out["bytes"].get("all-to-all", 0) <= out["x_rows_bytes"], out
    assert out["bytes"].get("all-gather", 0) <= out["param_bytes"], out
    assert out["bytes"].get("all-reduce", 0) <= out["param_bytes"], out
    assert out["err"] < 1e-5, out


@pytest.mark.parametrize("length,segmented", [(9, False), (9, True), (8, False), (0, False)])
def test_an_empty_batch_gives_empty_reads_and_state(length, segmented):
    # reshape(b, -1, ...) of a zero batch raised ZeroDivisionError
    x, queries, init, w = setup(jax.random.key(5), b=0, length=length)
    ids = jnp.zeros((0, length), jnp.int32) if segmented else None
    reads, final = workspace_memory(x, queries, init, w, chunk=4, segment_ids=ids)
    assert reads.shape == (0, length, 8) and final.shape == (0, 4, 8)
    x, queries, _, _ = setup(jax.random.key(5), b=2, length=0)  # and an empty sequence
    reads, final = workspace_memory(x, queries, init, w, chunk=4)
    assert reads.shape == (2, 0, 8)
    np.testing.assert_allclose(final, jnp.broadcast_to(init, (2, 4, 8)))
