"""Sequence (context) parallelism: ring attention and SSM scans split along the length on 8
emulated devices equal their single-device results, values and gradients."""

import numpy as np
import pytest

from helpers import run_python

OPS = r"""
import json, jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_numpy_rank_promotion", "raise")
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxsparse.ops.attention import dot_product_attention
from jaxsparse.ops.attention.ring import ring_attention
from jaxsparse.ops.masks import (BigBirdMask, CausalMask, ChunkedCausalMask, GlobalTokensMask,
                                 LocalMask, MultiHeadMask)
from jaxsparse.ops.diagonal_ssm import diagonal_ssm, diagonal_ssm_sequence_parallel
from jaxsparse.ops.ssm import (selective_scan, selective_scan_sequence_parallel, ssd_reference,
                               ssd_sequence_parallel)

mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "sequence"))
rng = np.random.default_rng(0)
def normal(*shape, scale=1.0):
    return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)
def split(x):  # batch over data, length over sequence
    return jax.device_put(x, NamedSharding(mesh, P("data", "sequence")))

def compare(ours, reference, args):
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(jax.tree.leaves(f(*a))[0]))
    argnums = tuple(range(len(args)))
    # compiled, the reference too: dispatched op by op its gradient cost more than compiling
    out, g = jax.jit(lambda *a: (ours(*a), jax.grad(loss(ours), argnums)(*a)))(*map(split, args))
    ref, g_ref = jax.jit(lambda *a: (reference(*a), jax.grad(loss(reference), argnums)(*a)))(*args)
    rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
    return {"value": max(rel(a, b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref))),
            "grad": max(rel(a, b) for a, b in zip(g, g_ref)),
            "grad_scale": min(float(jnp.max(jnp.abs(b))) for b in g_ref)}

out = {}
B, S, Hq, Hk, D = 2, 56, 4, 2, 8  # 14 positions per shard: chunks need not be powers of two
q, k, v = normal(B, S, Hq, D), normal(B, S, Hk, D), normal(B, S, Hk, D)
segments = jnp.asarray(np.sort(rng.integers(0, 3, size=(B, S)), axis=1), jnp.int32)
masks = {"causal": CausalMask(), "window": LocalMask(9, 0), "window_bidirectional": LocalMask(5, 5),
         "chunked": ChunkedCausalMask(10), "longformer": GlobalTokensMask(3) & CausalMask(),
         "bigbird": BigBirdMask(7, 1, 1, 1, 3),
         "per_head": MultiHeadMask((CausalMask(), LocalMask(3, 0), LocalMask(9, 2), CausalMask()))}
for name, mask in masks.items():
    for layout in ("contiguous", "zigzag"):
        out[f"attention {name} {layout}"] = compare(
            lambda q, k, v: ring_attention(q, k, v, mesh=mesh, mask=mask, layout=layout),
            lambda q, k, v: dot_product_attention(q, k, v, mask=mask, implementation="xla"),
            (q, k, v))
for layout in ("contiguous", "zigzag"):
    out[f"attention causal+segments {layout}"] = compare(
        lambda q, k, v: ring_attention(q, k, v, mesh=mesh, mask=CausalMask(), layout=layout,
                                       segment_ids=split(segments)),
        lambda q, k, v: dot_product_attention(q, k, v, mask=CausalMask(), segment_ids=segments,
                                              implementation="xla"), (q, k, v))
# fewer keys than queries (a causal mask with an offset: the first 8 rows attend nothing),
# shards of odd length (no halves) and shards in four parts of 4 (part_tokens=4)
kv_short = (normal(B, 48, Hk, D), normal(B, 48, Hk, D))
for layout in ("contiguous", "zigzag"):
    out[f"attention S!=T {layout}"] = compare(
        lambda q, k, v: ring_attention(q, k, v, mesh=mesh, mask=CausalMask(-8), layout=layout),
        lambda q, k, v: dot_product_attention(q, k, v, mask=CausalMask(-8), implementation="xla"),
        (q, *kv_short))
out["attention odd shards contiguous"] = compare(
    lambda q, k, v: ring_attention(q, k, v, mesh=mesh, mask=CausalMask()),
    lambda q, k, v: dot_product_attention(q, k, v, mask=CausalMask(), implementation="xla"),
    (q[:, :52], k[:, :52], v[:, :52]))
for layout in ("contiguous", "zigzag"):
    out[f"attention four parts {layout}"] = compare(
        lambda q, k, v: ring_attention(q, k, v, mesh=mesh, mask=masks["per_head"], layout=layout,
                                       part_tokens=4),
        lambda q, k, v: dot_product_attention(q, k, v, mask=masks["per_head"],
                                              implementation="xla"),
        (normal(B, 64, Hq, D), normal(B, 64, Hk, D), normal(B, 64, Hk, D)))
out["attention soft cap zigzag"] = compare(
    lambda q, k, v: ring_attention(q, k, v, mesh=mesh, mask=CausalMask(), layout="zigzag",
                                   logits_soft_cap=2.0, scale=0.5),
    lambda q, k, v: dot_product_attention(q, k, v, mask=CausalMask(), logits_soft_cap=2.0,
                                          scale=0.5, implementation="xla"), (q, k, v))
# bfloat16 inputs against the float32 reference on the same (rounded) values
bf16 = [t.astype(jnp.bfloat16) for t in (q, k, v)]
out["attention bf16 zigzag"] = compare(
    lambda q, k, v: ring_attention(q, k, v, mesh=mesh, mask=CausalMask(), layout="zigzag"),
    lambda q, k, v: dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                          v.astype(jnp.float32), mask=CausalMask(),
                                          implementation="xla"), bf16)

# exchanges (ppermute executions; a scan's body counts its length times) of a contiguous ring
def exchanges(jaxpr, times=1):
    total = 0
    for eqn in jaxpr.eqns:
        total += times * (eqn.primitive.name == "ppermute")
        inner_times = times * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
        for sub in eqn.params.values():
            for j in (sub if isinstance(sub, (list, tuple)) else [sub]):
                inner = j if hasattr(j, "eqns") else getattr(j, "jaxpr", None)
                if hasattr(inner, "eqns"):
                    total += exchanges(inner, inner_times)
    return total
ones, ring_of_4 = jnp.ones((1, 64, 2, 8)), Mesh(np.array(jax.devices()[:4]), ("sequence",))
out["exchanges"] = {}
for name, mask in (("window", LocalMask(4, 0)), ("causal", CausalMask())):
    ring = lambda q, k, v: ring_attention(q, k, v, mesh=ring_of_4, mask=mask, layout="contiguous")
    out["exchanges"][name] = [
        exchanges(jax.make_jaxpr(ring)(ones, ones, ones).jaxpr),
        exchanges(jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(ring(*a)), (0, 1, 2)))(
            ones, ones, ones).jaxpr)]

# the precision of every matmul of a ring, forward and backward (part_tokens a numpy integer,
# as a config read from numpy gives)
def dot_precisions(jaxpr):
    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.add(str(eqn.params["precision"]))
        for sub in eqn.params.values():
            for j in (sub if isinstance(sub, (list, tuple)) else [sub]):
                inner = j if hasattr(j, "eqns") else getattr(j, "jaxpr", None)
                if hasattr(inner, "eqns"):
                    found |= dot_precisions(inner)
    return found
ring = lambda q, k, v: ring_attention(q, k, v, mesh=ring_of_4, mask=CausalMask(),
                                      part_tokens=np.int64(4))
out["ring dot precisions"] = sorted(dot_precisions(jax.make_jaxpr(
    jax.grad(lambda *a: jnp.sum(ring(*a)), (0, 1, 2)))(ones, ones, ones).jaxpr))

# an empty batch: empty output and gradients, as on one device
empty_q, empty_kv = jnp.zeros((0, S, Hq, D)), jnp.zeros((0, S, Hk, D))
empty_ring = lambda q, k, v: ring_attention(q, k, v, mesh=mesh, mask=CausalMask())
# compiled: dispatched op by op, the ring's shard_map took 23 s here
out["attention batch 0 shapes"] = [list(t.shape) for t in jax.jit(lambda *a: (
    empty_ring(*a), *jax.grad(lambda *a: jnp.sum(empty_ring(*a)), (0, 1, 2))(*a)))(
    empty_q, empty_kv, empty_kv)]

# memory: a 16k-token causal ring on 4 devices, forward and backward, compiled only
long_mesh = Mesh(np.array(jax.devices()[:4]), ("sequence",))
long = jax.ShapeDtypeStruct((1, 16384, 1, 16), jnp.float32,
                            sharding=NamedSharding(long_mesh, P(None, "sequence")))
long_grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(ring_attention(
    q, k, v, mesh=long_mesh, mask=CausalMask())), (0, 1, 2)))
out["long ring temp bytes"] = (
    long_grad.lower(long, long, long).compile().memory_analysis().temp_size_in_bytes)

L, W = 52, 6
delta, Bd, Cd, U = normal(B, L, W), normal(B, L, W), normal(B, L, W), normal(B, L, W)
log_lambda, Dd = normal(W, scale=0.5), normal(W)
out["diagonal ssm"] = compare(
    lambda *a: diagonal_ssm_sequence_parallel(*a, log_lambda, Dd, mesh=mesh),
    lambda *a: diagonal_ssm(*a, log_lambda, Dd), (delta, Bd, Cd, U))
# differentiated op by op (no jit) on this data x sequence mesh: the scans' shard_map, manual
# over `sequence` only, raised "out_specs ... refers to 'data'" until it was compiled
ssm_loss = lambda f: lambda U: jnp.sum(jnp.sin(f(delta, Bd, Cd, U, log_lambda, Dd)[0]))
try:
    eager = jax.grad(ssm_loss(lambda *a: diagonal_ssm_sequence_parallel(*a, mesh=mesh)))(split(U))
    out["diagonal ssm eager grad"] = float(jnp.max(jnp.abs(
        eager - jax.grad(ssm_loss(diagonal_ssm))(U))))
except ValueError as err:  # reported by its own test, not as every test's fixture error
    out["diagonal ssm eager grad"] = str(err)

d_inner, N = 6, 4
x, dt, z = normal(B, L, d_inner), normal(B, L, d_inner), normal(B, L, d_inner)
Bs, Cs = normal(B, L, 1, N), normal(B, L, 1, N)
A = -jnp.exp(normal(d_inner, N, scale=0.5))
h0 = normal(B, d_inner, N)
kw = dict(D=normal(d_inner), dt_bias=normal(d_inner, scale=0.3), dt_softplus=True)
out["mamba1 scan"] = compare(
    lambda x, dt, z, Bs, Cs: selective_scan_sequence_parallel(x, dt, A, Bs, Cs, z=z, mesh=mesh,
                                                              initial_state=h0, **kw),
    lambda x, dt, z, Bs, Cs: selective_scan(x, dt, A, Bs, Cs, z=z, initial_state=h0,
                                            return_final_state=True, implementation="sequential", **kw),
    (x, dt, z, Bs, Cs))

heads, p = 4, 3
x2, dt2 = normal(B, L, heads, p), normal(B, L, heads)
B2, C2 = normal(B, L, 2, N), normal(B, L, 2, N)
A2 = -jnp.exp(normal(heads, scale=0.5))
kw2 = dict(D=normal(heads), dt_bias=normal(heads, scale=0.3), dt_softplus=True)
for chunk in (None, 4):
    out[f"mamba2 ssd chunk={chunk}"] = compare(
        lambda x, dt, Bs, Cs: ssd_sequence_parallel(x, dt, A2, Bs, Cs, mesh=mesh, chunk_size=chunk, **kw2),
        lambda x, dt, Bs, Cs: ssd_reference(x, dt, A2, Bs, Cs, return_final_state=True, **kw2),
        (x2, dt2, B2, C2))

# packed documents: row 0 starts documents at a shard edge (13) and inside a shard, row 1 only
# inside shards; the shards are 13 long
docs = np.zeros((B, L), np.int32)
docs[0, 13:] += 1
docs[0, 20:] += 1
docs[1, 5:] += 1
docs[1, 40:] += 1
docs = jnp.asarray(docs)
out["mamba1 scan+segments"] = compare(
    lambda x, dt, z, Bs, Cs: selective_scan_sequence_parallel(
        x, dt, A, Bs, Cs, z=z, mesh=mesh, initial_state=h0, segment_ids=split(docs), **kw),
    lambda x, dt, z, Bs, Cs: selective_scan(
        x, dt, A, Bs, Cs, z=z, initial_state=h0, return_final_state=True,
        implementation="sequential", segment_ids=docs, **kw),
    (x, dt, z, Bs, Cs))
out["diagonal ssm+segments"] = compare(
    lambda *a: diagonal_ssm_sequence_parallel(*a, log_lambda, Dd, mesh=mesh, segment_ids=split(docs)),
    lambda *a: diagonal_ssm(*a, log_lambda, Dd, segment_ids=docs), (delta, Bd, Cd, U))
for chunk in (None, 4):
    out[f"mamba2 ssd chunk={chunk}+segments"] = compare(
        lambda x, dt, Bs, Cs: ssd_sequence_parallel(x, dt, A2, Bs, Cs, mesh=mesh, chunk_size=chunk,
                                                    segment_ids=split(docs), **kw2),
        lambda x, dt, Bs, Cs: ssd_reference(x, dt, A2, Bs, Cs, return_final_state=True,
                                            segment_ids=docs, **kw2),
        (x2, dt2, B2, C2))

errors = {}
for bad in (lambda: ring_attention(q[:, :50], k[:, :50], v[:, :50], mesh=mesh, mask=CausalMask()),
            lambda: diagonal_ssm_sequence_parallel(delta[:, :50], Bd[:, :50], Cd[:, :50], U[:, :50],
                                                   log_lambda, Dd, mesh=mesh),
            lambda: ring_attention(q[:, :52], k[:, :52], v[:, :52], mesh=mesh, layout="zigzag"),
            lambda: ring_attention(q, k, v, mesh=mesh, layout="striped"),
            lambda: ring_attention(q, k, v, mesh=mesh, part_tokens=0),
            lambda: ring_attention(q, k, v, mesh=mesh, segment_ids=segments[:, :40]),
            lambda: ring_attention(q, k, v, mesh=mesh, segment_ids=segments.astype(jnp.float32)),
            lambda: ring_attention(q, k, v, mesh=None),
            lambda: ring_attention(q, k, v, mesh=mesh, part_tokens=True)):
    try:
        bad()
    except ValueError as err:
        errors[len(errors)] = str(err)
out["errors"] = errors
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def sharded_ops():
    return run_python(OPS, devices=8)


MASKS = ["causal", "window", "window_bidirectional", "chunked", "longformer", "bigbird",
         "per_head", "causal+segments", "S!=T", "four parts"]
ATTENTION_CASES = [f"{mask} {layout}" for mask in MASKS for layout in ("contiguous", "zigzag")]


@pytest.mark.parametrize("case", ATTENTION_CASES + ["odd shards contiguous", "soft cap zigzag"])
def test_ring_attention_equals_single_device(sharded_ops, case):
    """Queries, keys and values split 4 ways along the sequence (and 2 ways along the batch):
    the ring exchange gives the single-device attention, forward and gradients (float32), in
    the contiguous and the zig-zag layout, with every mask, packed documents, fewer keys than
    queries (rows with nothing to attend to), shards of odd length (worked whole) and shards
    in four parts, with a logit soft cap and a custom scale."""
    result = sharded_ops["attention " + case]
    assert result["grad_scale"] > 1e-3  # the gradients compared are not trivially zero
    assert result["value"] < 1e-5 and result["grad"] < 1e-5, result


def test_ring_attention_in_bfloat16_accumulates_in_float32(sharded_ops):
    """bfloat16 q, k, v (zig-zag, causal): values and gradients within a few bfloat16 roundings
    (eps 2^-8 of the largest entry) of the float32 reference on the same rounded inputs."""
    result, eps = sharded_ops["attention bf16 zigzag"], 2.0**-8
    assert result["value"] < 2 * eps and result["grad"] < 4 * eps, result


def test_the_ring_exchanges_nothing_after_its_last_step(sharded_ops):
    """ppermutes executed (4 devices, contiguous): the forward moves keys, values and segment
    ids (3 arrays) between consecutive steps only — a causal window's 2 steps once, a causal
    ring's 4 steps 3 times; the backward moves those and the keys' two gradients (5 arrays)
    the same way, then sends the gradients home (2 more, `first + count - 1` devices back).
    Exchanging after the last step too took 6 / 18 and 12 / 32."""
    assert sharded_ops["exchanges"] == {"window": [3, 3 + 5 + 2], "causal": [9, 9 + 15 + 2]}


def test_ring_attention_of_an_empty_batch_is_empty(sharded_ops):
    """Batch 0: the output and the gradients of q, k, v have their inputs' shapes (the
    backward's per-row statistics once failed to reshape a size-0 array)."""
    assert sharded_ops["attention batch 0 shapes"] == [[0, 56, 4, 8], [0, 56, 4, 8],
                                                        [0, 56, 2, 8], [0, 56, 2, 8]]


def test_zigzag_halves_the_causal_ring_and_is_chosen_only_where_it_helps():
    """The critical path (part pairs, slowest device per step) of a causal ring over n devices
    in halves: contiguous 3 + 4(n-1) (the last device works whole chunk pairs at every step),
    zig-zag 3 + 2(n-1) (every device two of its four pairs); ``layout=None`` takes zig-zag for
    causal masks and stays contiguous for a sliding window, full attention (a tie) and shards
    that do not halve."""
    from jaxsparse.ops.attention.ring import choose_layout, critical_path, held_part, split_parts
    from jaxsparse.ops.masks import CausalMask, LocalMask

    for n in (2, 4, 8):
        length = 64 * n
        assert critical_path(CausalMask(), length, length, n, "contiguous", 2) == 3 + 4 * (n - 1)
        assert critical_path(CausalMask(), length, length, n, "zigzag", 2) == 3 + 2 * (n - 1)
        assert choose_layout(CausalMask(), length, length, n) == "zigzag"
        assert choose_layout(LocalMask(16, 0), length, length, n) == "contiguous"
        assert choose_layout(None, length, length, n) == "contiguous"
        # every part of the sequence is held by exactly one device, in either layout
        for layout in ("contiguous", "zigzag"):
            held = sorted(held_part(layout, n, 4, d, p) for d in range(n) for p in range(4))
            assert held == list(range(4 * n)), layout
    assert [held_part("zigzag", 4, 2, 1, p) for p in range(2)] == [1, 6]  # halves i, 2n-1-i
    assert choose_layout(CausalMask(), 4 * 13, 4 * 13, 4) == "contiguous"  # shards of 13
    # parts of about PART_TARGET = 128 tokens, even where the shards are; few long parts where
    # a shard length has few divisors (2 x 1031), never thousands of tiny ones
    assert [split_parts(13, 13), split_parts(14, 14), split_parts(4096, 4096)] == [1, 2, 32]
    assert split_parts(4096, 4096, part_tokens=256) == 16
    assert [split_parts(2062, 2062), split_parts(12, 18, part_tokens=4)] == [2, 6]


def test_ring_work_counts_the_non_empty_part_pairs_each_device_holds():
    """``ring_pair_kinds`` and ``ring_work`` (vectorised over devices) against the dense mask:
    at step s device d holds the keys of device (d - s) mod n; a pair of its query and key
    parts is empty when the mask allows no entry in it for any head, full when it allows every
    entry for every head, partial otherwise. Both layouts, a BigBird mask with random blocks
    and a per-head mask, 4 devices in 4 parts each."""
    from jaxsparse.ops.attention.ring import held_part, ring_pair_kinds, ring_work
    from jaxsparse.ops.masks import (EMPTY, FULL, PARTIAL, BigBirdMask, CausalMask, LocalMask,
                                     MultiHeadMask)

    n, parts, length = 4, 4, 96
    part = length // (n * parts)
    seen = set()
    for mask in (BigBirdMask(6, 1, 1, 2, 5), MultiHeadMask((CausalMask(), LocalMask(4, 0)))):
        dense = np.asarray(mask.to_dense(length, length)).reshape(-1, length, length)
        for layout in ("contiguous", "zigzag"):
            expected = np.zeros((n, n, parts, parts), np.int8)
            for step in range(n):
                for d in range(n):
                    for qp in range(parts):
                        for kp in range(parts):
                            qi = held_part(layout, n, parts, d, qp)
                            ki = held_part(layout, n, parts, (d - step) % n, kp)
                            tile = dense[:, qi * part:(qi + 1) * part, ki * part:(ki + 1) * part]
                            expected[step, d, qp, kp] = (FULL if tile.all() else
                                                         PARTIAL if tile.any() else EMPTY)
            kinds = ring_pair_kinds(mask, length, length, n, layout, parts)
            np.testing.assert_array_equal(kinds, expected, err_msg=f"{mask} {layout}")
            seen |= set(np.unique(kinds).tolist())
            np.testing.assert_array_equal(ring_work(mask, length, length, n, layout, parts),
                                          (expected != EMPTY).sum(axis=(2, 3)),
                                          err_msg=f"{mask} {layout}")
    assert seen == {EMPTY, PARTIAL, FULL}  # every kind was compared


def test_each_device_visits_exactly_its_live_part_pairs():
    """``ring_pair_lists``: at every step taken, each device's list holds its non-empty
    (query part, key part) pairs with their kinds, in row order, padded with EMPTY pairs to the
    longest list; a step with no work anywhere still gets one (EMPTY) slot."""
    from jaxsparse.ops.attention.ring import ring_pair_kinds, ring_pair_lists
    from jaxsparse.ops.masks import EMPTY, BigBirdMask, CausalMask, LocalMask

    n, parts, length = 4, 4, 128
    for mask, layout in ((LocalMask(12, 3), "contiguous"), (CausalMask(), "zigzag"),
                         (BigBirdMask(8, 1, 1, 1, 2), "contiguous")):
        kinds = ring_pair_kinds(mask, length, length, n, layout, parts)
        run = np.array([n - 1, 0, 1, 2])
        q_part, kv_part, kind = ring_pair_lists(kinds, run)
        width = max((kinds[s, d] != EMPTY).sum() for s in run for d in range(n))
        assert q_part.shape == kv_part.shape == kind.shape == (len(run), n, width)
        for t, step in enumerate(run):
            for d in range(n):
                live = [(i, j, kinds[step, d, i, j]) for i in range(parts) for j in range(parts)
                        if kinds[step, d, i, j] != EMPTY]
                listed = list(zip(q_part[t, d], kv_part[t, d], kind[t, d]))
                assert listed[:len(live)] == live, (mask, layout, step, d)
                assert listed[len(live):] == [(0, 0, EMPTY)] * (width - len(live))
    empty = ring_pair_kinds(CausalMask(-length), length, length, n, "contiguous", parts)
    assert [a.shape for a in ring_pair_lists(empty, np.array([0]))] == [(1, n, 1)] * 3


def test_steps_without_work_are_left_out_of_the_ring():
    """A causal window narrower than a shard needs the ring's first two steps (own keys and the
    previous shard's), a two-sided one the next shard's too (step n - 1), a causal mask every
    step; the steps in between are neither computed nor communicated."""
    from jaxsparse.ops.attention.ring import live_steps, ring_pair_kinds, step_run
    from jaxsparse.ops.masks import CausalMask, LocalMask

    n, parts, length = 8, 2, 256  # shards of 32
    def live(mask, layout):
        return live_steps(ring_pair_kinds(mask, length, length, n, layout, parts))
    assert live(LocalMask(20, 0), "contiguous") == [0, 1]
    assert live(LocalMask(20, 20), "contiguous") == [0, 1, n - 1]
    # zig-zag halves of 16: a late half (2n-1-i) reads halves held by devices i + 1, i + 2
    assert live(LocalMask(10, 0), "zigzag") == [0, 1, n - 1]
    assert live(LocalMask(20, 0), "zigzag") == [0, 1, 2, n - 2, n - 1]
    assert live(LocalMask(40, 0), "contiguous") == [0, 1, 2]
    assert live(CausalMask(), "zigzag") == list(range(n))
    assert live(CausalMask(-length), "contiguous") == []
    # the ring runs one scan over the shortest run of steps (mod n) holding the live ones
    assert [step_run(live(LocalMask(20, 0), "contiguous"), n),
            step_run(live(LocalMask(20, 20), "contiguous"), n),
            step_run(live(LocalMask(20, 0), "zigzag"), n),
            step_run(live(CausalMask(), "zigzag"), n),
            step_run([], n), step_run([3], n), step_run([1, 5], n)] == [
        (0, 2), (n - 1, 3), (n - 2, 5), (0, n), (0, 0), (3, 1), (1, 5)]


def test_ring_memory_holds_one_part_pair_of_logits_not_a_chunk_pair(sharded_ops):
    """A 16k-token causal ring on 4 devices (shards of 4096), forward and backward: the
    compiled temporaries stay below half the logits of one shard pair for a single head
    (32 MiB; 3 MiB here): the backward recomputes each part pair's probabilities from the
    saved log-sum-exp, one 128-token pair at a time. Scoring whole shard pairs took 405 MiB,
    four unrolled parts per shard 117 MiB, autodiff through checkpointed folds 8 MiB."""
    temp = sharded_ops["long ring temp bytes"]
    assert temp < 4096 * 4096 * 4 / 2, temp


@pytest.mark.parametrize("scan", ["diagonal ssm", "diagonal ssm+segments", "mamba1 scan", "mamba2 ssd chunk=None",
                                  "mamba2 ssd chunk=4", "mamba1 scan+segments",
                                  "mamba2 ssd chunk=None+segments", "mamba2 ssd chunk=4+segments"])
def test_ssm_scans_pass_chunk_states_across_shards(sharded_ops, scan):
    """Every shard scans its chunk; states cross shards; outputs, final states (and, for Mamba-1,
    a given initial state) and all gradients equal the single-device scan, also for packed
    documents (``+segments``: a document starting at a shard's first token drops the state
    entering the shard)."""
    result = sharded_ops[scan]
    assert result["grad_scale"] > 1e-3
    assert result["value"] < 1e-5 and result["grad"] < 1e-5, result


def test_sequence_parallel_scans_differentiate_without_jit(sharded_ops):
    """``jax.grad`` op by op (a notebook's first try) on a data x sequence mesh: the gradient
    of the diagonal SSM split over shards equals one device's (it raised inside shard_map)."""
    err = sharded_ops["diagonal ssm eager grad"]
    assert isinstance(err, float) and err < 1e-5, err


def test_sequence_parallel_ops_name_bad_lengths_layouts_and_segments(sharded_ops):
    errors = sharded_ops["errors"]
    assert "query length S=50 must be divisible by mesh axis 'sequence' of size 4" in errors["0"]
    assert "length 50 must be divisible by mesh axis 'sequence' of size 4" in errors["1"]
    assert ("query length S=52 must be divisible by twice the size of mesh axis 'sequence' (8) "
            "for layout='zigzag'") in errors["2"]
    assert "layout='striped': expected one of (None, 'contiguous', 'zigzag')" in errors["3"]
    assert "part_tokens=0: must be an integer >= 1" in errors["4"]
    assert "q segment_ids must have shape (2, 56), got (2, 40)" in errors["5"]
    assert "q segment_ids must be integers, got dtype float32" in errors["6"]
    # mesh=None failed with an AttributeError; part_tokens=True was taken as 1
    assert "mesh=None: ring attention needs a jax.sharding.Mesh" in errors["7"]
    assert "part_tokens=True: must be an integer >= 1" in errors["8"]


def test_every_ring_matmul_runs_at_the_highest_precision(sharded_ops):
    """Forward and backward: at the default precision TPUs and TF32 GPUs round float32 operands,
    and the ring drifted ~1e-3 from the single-device paths (which ask for HIGHEST); CPUs
    ignore the setting, so this reads the program instead of its numbers."""
    assert sharded_ops["ring dot precisions"] == ["(Precision.HIGHEST, Precision.HIGHEST)"]


PRESETS_VS_SINGLE = r"""
import json, sys, jax, numpy as np
from helpers import tiny_config
from jaxsparse.parallel import make_mesh
from jaxsparse.train.state import TrainSetup
from jaxsparse.train.step import make_train_step
from jaxsparse.data import make_stream

MOE = ("model.moe_experts=4", "model.moe_k=2", "model.moe_d_ff=32")
MODELS = {"dense": (), "sparse": ("model.attention_mask=heads:local:8;local:16;causal;longformer:8,2",),
          "mamba": ("model.name=mamba",), "hydra": HYDRA, "moe": MOE}
MESHES = {"data": ("mesh.data=8",),
          "fsdp": ("mesh.data=2", "mesh.fsdp=4"),
          "fsdp_tp": ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"),
          "fsdp_tp_ep": ("mesh.data=2", "mesh.expert=2", "mesh.tensor=2"),
          "fsdp_tp_sp": ("mesh.data=2", "mesh.sequence=2", "mesh.tensor=2"),
          "full": ("mesh.data=1", "mesh.fsdp=2", "mesh.sequence=2", "mesh.tensor=2")}
def losses(devices, *overrides, steps=2):
    cfg = tiny_config(*overrides)
    setup = TrainSetup(cfg, make_mesh(cfg.mesh, devices))
    state, step, stream = setup.init(), make_train_step(setup), make_stream(cfg)
    out = []
    for i in range(steps):
        batch = setup.global_batch(stream.batch(i))
        if i == 0:
            hlo = step.lower(state, batch).compile().as_text()
        state, metrics = step(state, batch)
        out.append(float(metrics["loss"]))
    return out, hlo

result, singles = {}, {}
for model, cases in CASES.items():
    for preset in cases:
        extra = MODELS[model] + (MOE if preset == "fsdp_tp_ep" else ())
        if extra not in singles:
            singles[extra] = losses(jax.devices()[:1], *extra)[0]
        sharded, hlo = losses(jax.devices(), *extra, f"mesh.preset={preset}", *MESHES[preset])
        result[f"{model} {preset}"] = {"single": singles[extra], "sharded": sharded,
                                       "ring_attention": "ring_attention" in hlo,
                                       "scan_across_shards": "scan_across_shards" in hlo}
print(json.dumps(result))
"""

HYDRA = ("model.name=hydra", "model.n_layers=2", "model.hydra_window=8", "model.hydra_max_global=4",
         "model.hydra_ssm_width=16", "model.hydra_sga_every=2", "model.hydra_ssm_conv=3")


def _presets_run(cases: dict) -> dict:
    code = PRESETS_VS_SINGLE.replace('"hydra": HYDRA', f'"hydra": {HYDRA!r}').replace(
        "for model, cases in CASES.items()", f"for model, cases in {cases!r}.items()")
    return run_python(code, devices=8)


PRESETS = ["data", "fsdp", "fsdp_tp", "fsdp_tp_ep", "fsdp_tp_sp", "full"]
RING_PRESETS = ["fsdp_tp_sp", "full"]  # the presets with a sequence axis


def _assert_presets_match_one_device(out, expected_runs):
    assert len(out) == expected_runs
    for name, run in out.items():
        np.testing.assert_allclose(run["sharded"], run["single"], rtol=2e-5, err_msg=name)
        # K/V blocks travel around the ring exactly when the sequence axis is in use
        assert run["ring_attention"] == name.endswith(("_sp", "full")), name


def test_every_mesh_axis_on_8_devices_matches_one_device():
    """Every mesh axis in use, through the two presets that combine them: the dense baseline
    under fsdp_tp_ep (data, tensor and expert axes, with MoE layers) and under full (FSDP,
    sequence with ring attention, tensor), and a sparse-attention Transformer (per-head
    windows, Longformer globals) under full give the same losses as one device. Each preset
    on its own: the slow tests below."""
    _assert_presets_match_one_device(_presets_run({"dense": ["fsdp_tp_ep", "full"],
                                                   "sparse": ["full"]}), 3)


@pytest.mark.slow  # ~70 s on 2 cores; the default run covers every axis through the composites
def test_every_preset_on_8_devices_matches_one_device():
    """The dense baseline under each of the other presets (data, FSDP, FSDP+TP, +sequence) and
    the sparse Transformer under fsdp_tp_sp."""
    others = [p for p in PRESETS if p not in ("fsdp_tp_ep", "full")]
    _assert_presets_match_one_device(_presets_run({"dense": others, "sparse": ["fsdp_tp_sp"]}),
                                     len(others) + 1)


@pytest.mark.slow  # ~40 s on 2 cores; the default run covers these presets with the dense model
def test_sparse_transformer_under_the_presets_without_a_sequence_axis_matches_one_device():
    others = [p for p in PRESETS if p not in RING_PRESETS]
    _assert_presets_match_one_device(_presets_run({"sparse": others}), len(others))


@pytest.mark.slow  # ~100 s on 2 cores; the op-level scans across shards are in the default run
def test_sequence_parallel_recurrent_models_match_one_device():
    """Mamba (Mamba-1 scan) and Hydra (diagonal SSM, sparse global attention, chunk-routed MoE,
    workspace) with the length split 2 ways under fsdp_tp_sp, and a MoE Transformer under FSDP
    (each device dispatching its own tokens): the losses of one device."""
    out = _presets_run({"mamba": ["fsdp_tp_sp"], "hydra": ["fsdp_tp_sp"], "moe": ["fsdp"]})
    for name, run in out.items():
        np.testing.assert_allclose(run["sharded"], run["single"], rtol=2e-5, err_msg=name)
    assert out["mamba fsdp_tp_sp"]["scan_across_shards"]  # chunk states cross shards
    assert out["hydra fsdp_tp_sp"]["scan_across_shards"]


PACKED_ON_A_SEQUENCE_MESH = r"""
import json, sys, tempfile, jax
from pathlib import Path
from helpers import tiny_config, short_documents
from jaxsparse.parallel import make_mesh
from jaxsparse.train.state import TrainSetup
from jaxsparse.train.step import make_train_step
from jaxsparse.data import make_stream

docs = short_documents(Path(tempfile.mkdtemp()))
def loss(devices, *overrides):
    cfg = tiny_config(*MODEL, *docs, *overrides)
    setup = TrainSetup(cfg, make_mesh(cfg.mesh, devices))
    state, step, stream = setup.init(), make_train_step(setup), make_stream(cfg)
    batch = setup.global_batch(stream.batch(0))
    hlo = step.lower(state, batch).compile().as_text()
    return float(step(state, batch)[1]["loss"]), "scan_across_shards" in hlo

packed = "data.packed_documents=true"
print(json.dumps({"single": loss(jax.devices()[:1], packed)[0],
                  "sharded": loss(jax.devices(), packed, "mesh.data=2", "mesh.sequence=2",
                                  "mesh.tensor=2")}))
"""


# Hydra with every branch that looks across positions: SSM + convolution, SGA, chunk-routed
# MoE, workspace (chunks of 4)
PACKED_HYDRA = HYDRA + ("model.moe_experts=4", "model.moe_k=2", "model.moe_d_ff=32",
                        "model.moe_chunk=4", "model.workspace_slots=3", "model.workspace_chunk=4")
PACKED_MODELS = {"mamba2": ("model.name=mamba2", "model.ssm_head_dim=16"), "hydra": PACKED_HYDRA}


# Mamba-2 on the mesh: slow (its scans across shards with segments are in the default op tests)
@pytest.mark.parametrize("model", [pytest.param("mamba2", marks=pytest.mark.slow), "hydra"])
def test_packed_documents_train_on_a_sequence_mesh_like_on_one_device(model):
    """Packed documents with the length split 2 ways (and data, tensor 2 ways): the shards'
    scans reset at document starts (a start at a shard's first token is covered by the
    ``+segments`` op tests) and Hydra's SGA, chunk routing and workspace keep to documents
    across shards, so the loss is the single device's. (That the segment ids change this
    batch's loss, one device: tests/test_train.py and tests/test_hydra_segments.py, same
    corpus and batch.)"""
    code = PACKED_ON_A_SEQUENCE_MESH.replace("import json,", f"MODEL = {PACKED_MODELS[model]!r}\nimport json,")
    result = run_python(code, devices=8)
    sharded, used_shards = result["sharded"]
    assert used_shards  # the scan really ran split over the sequence axis
    assert abs(sharded - result["single"]) < 1e-5 * result["single"], result


def test_sequence_parallel_scans_check_their_arguments_on_the_whole_arrays():
    """Inside the shards a bad initial state failed in the composition's broadcasting (a
    TypeError naming no argument), inputs of two lengths were reported in the shards'
    lengths, and mesh=None or a mesh without the axis was an AttributeError / KeyError.
    (A one-device mesh: the checks run before any shard does.)"""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh

    from jaxsparse.ops.diagonal_ssm import diagonal_ssm_sequence_parallel
    from jaxsparse.ops.ssm import selective_scan_sequence_parallel, ssd_sequence_parallel

    mesh = Mesh(np.array(jax.devices()[:1]), ("sequence",))
    normal = lambda *shape: jax.random.normal(jax.random.key(len(shape)), shape)  # noqa: E731
    d, lam, D = normal(2, 16, 3), normal(3), normal(3)
    x, dt, A, Bs = normal(2, 16, 3), normal(2, 16, 3), -jnp.ones((3, 2)), normal(2, 16, 1, 2)
    x2, dt2, Bs2 = normal(2, 16, 2, 4), normal(2, 16, 2), normal(2, 16, 1, 5)
    cases = [
        (lambda: diagonal_ssm_sequence_parallel(d, d, d, d, lam, D, mesh=mesh,
                                                initial_state=normal(3, 3)),
         r"initial_state of shape \(3, 3\): must be the scan's state, \(2, 3\)"),
        (lambda: selective_scan_sequence_parallel(x, dt, A, Bs, Bs, mesh=mesh,
                                                  initial_state=normal(3, 3, 2)),
         r"initial_state of shape \(3, 3, 2\): must be the scan's state, \(2, 3, 2\)"),
        (lambda: ssd_sequence_parallel(x2, dt2, -jnp.ones(2), Bs2, Bs2, mesh=mesh,
                                       initial_state=normal(2, 2, 4)),
         r"initial_state of shape \(2, 2, 4\): must be the scan's state, \(2, 2, 4, 5\)"),
        (lambda: selective_scan_sequence_parallel(x, dt, A, Bs[:, :12], Bs[:, :12], mesh=mesh),
         r"same batch and length; got \{'x': \(2, 16\), 'dt': \(2, 16\), 'B': \(2, 12\)"),
        (lambda: ssd_sequence_parallel(x2, dt2, -jnp.ones(2), Bs2, Bs2, mesh=None),
         "mesh=None: a sequence-parallel scan needs a jax.sharding.Mesh"),
        (lambda: diagonal_ssm_sequence_parallel(d, d, d, d, lam, D,
                                                mesh=Mesh(np.array(jax.devices()[:1]), ("data",))),
         r"mesh \{'data': 1\} has no axis 'sequence'"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    y, final = diagonal_ssm_sequence_parallel(d, d, d, d, lam, D, mesh=mesh,
                                              initial_state=normal(2, 3))
    assert y.shape == (2, 16, 3) and final.shape == (2, 3)
