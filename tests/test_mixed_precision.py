"""bfloat16 compute in the attention-style XLA ops (Hydra's sparse global attention and
workspace, routing attention): matmuls take bfloat16 operands and accumulate in float32,
forward and backward, and stay within bfloat16 error of float32 on the same rounded inputs;
float32 inputs give exactly the plain float32 computation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import matmuls
from jaxsparse.ops.mixed_precision import matmul_f32, weighted_sum

BF16 = ("bfloat16", "bfloat16")
EPS = 2.0**-8  # bfloat16's relative spacing


def normal(key, *shapes, dtype=jnp.float32):
    return [jax.random.normal(k, s).astype(dtype)
            for k, s in zip(jax.random.split(jax.random.key(key), len(shapes)), shapes)]


def operand_dtypes(fn, *args, leave_out=()):
    """The operand dtypes of ``fn``'s matmuls, but those with an operand of a shape in
    ``leave_out``."""
    return {m.dtypes for m in matmuls(fn, *args) if not set(m.shapes) & set(leave_out)}


def relative_error(got, want):
    got, want = (np.asarray(jnp.asarray(x, jnp.float32)) for x in (got, want))
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def sum_of_sines(fn):  # a loss whose cotangent differs per entry
    return lambda *a: jnp.sum(jnp.sin(fn(*a).astype(jnp.float32)))


EQUATION = "bqhd,bkhd->bhqk"
SHAPES = ((3, 5, 2, 7), (3, 9, 2, 7))  # odd sizes, a batch and a head axis


def test_float32_matmul_and_its_gradients_are_the_plain_einsum():
    a, b = normal(0, *SHAPES)
    plain = functools.partial(jnp.einsum, EQUATION, precision=jax.lax.Precision.HIGHEST)
    ours = functools.partial(matmul_f32, EQUATION)
    np.testing.assert_allclose(ours(a, b), plain(a, b), rtol=1e-6, atol=1e-6)
    got = jax.grad(sum_of_sines(ours), (0, 1))(a, b)
    want = jax.grad(sum_of_sines(plain), (0, 1))(a, b)
    for g, w in zip(got, want):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    # forward mode too (a custom_vjp on every dtype refused jvp, so jax.hessian of any model
    # built on these ops failed): the tangent is the plain einsum's, and so is weighted_sum's
    da, db = normal(3, *SHAPES)
    _, tangent = jax.jvp(ours, (a, b), (da, db))
    np.testing.assert_allclose(tangent, plain(da, b) + plain(a, db), rtol=1e-5, atol=1e-5)
    weights = jax.nn.softmax(ours(a, b), axis=-1)
    _, tangent = jax.jvp(lambda w: weighted_sum("bhqk,bkhd->bqhd", w, b), (weights,), (weights,))
    np.testing.assert_allclose(tangent, weighted_sum("bhqk,bkhd->bqhd", weights, b), rtol=1e-6)


def test_bfloat16_operands_stay_bfloat16_forward_and_backward():
    """The products of bfloat16 numbers are exact in float32: the result is the float32
    einsum of the same values. The gradients are bfloat16 (the operands' dtype) within
    bfloat16 rounding of the exact ones, and no matmul, forward or backward, is float32."""
    a, b = normal(1, *SHAPES, dtype=jnp.bfloat16)
    wide = [x.astype(jnp.float32) for x in (a, b)]
    plain = functools.partial(jnp.einsum, EQUATION, precision=jax.lax.Precision.HIGHEST)
    ours = functools.partial(matmul_f32, EQUATION)
    out = ours(a, b)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, plain(*wide), rtol=1e-6, atol=1e-5)
    got = jax.grad(sum_of_sines(ours), (0, 1))(a, b)
    want = jax.grad(sum_of_sines(plain), (0, 1))(*wide)
    for g, w in zip(got, want):
        assert g.dtype == jnp.bfloat16
        assert relative_error(g, w) < 4 * EPS
    assert operand_dtypes(jax.value_and_grad(sum_of_sines(ours), (0, 1)), a, b) == {BF16}


def test_weighted_sum_rounds_the_weights_to_the_values_dtype():
    """Softmax probabilities (float32) times bfloat16 values: the probabilities are rounded to
    bfloat16 for the matmul, as flash attention does; their gradient stays float32."""
    logits, v = normal(2, (3, 2, 5, 9), (3, 9, 2, 7))
    w, v = jax.nn.softmax(logits, axis=-1), v.astype(jnp.bfloat16)
    ours = functools.partial(weighted_sum, "bhqk,bkhd->bqhd")
    want = jnp.einsum("bhqk,bkhd->bqhd", w.astype(jnp.bfloat16).astype(jnp.float32),
                      v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(ours(w, v), want, rtol=1e-6, atol=1e-6)
    dw, dv = jax.grad(sum_of_sines(ours), (0, 1))(w, v)
    assert (dw.dtype, dv.dtype) == (jnp.float32, jnp.bfloat16)
    assert operand_dtypes(jax.value_and_grad(sum_of_sines(ours), (0, 1)), w, v) == {BF16}


def _sga(impl):
    from jaxsparse.ops.sga import sparse_global_attention

    return lambda q, k, v, scores: sparse_global_attention(
        q, k, v, scores, window=6, max_global=4, implementation=impl, block=8)


def _sga_decode(q, k, v, scores):
    from jaxsparse.ops.sga import sga_decode

    lengths = jnp.full((q.shape[0],), q.shape[1], jnp.int32)
    return sga_decode(q, k, v, scores, lengths, window=6, max_global=4)


def _sga_rings(q, k, v, scores):
    """A prompt of 30 tokens, then the rest one at a time from the rings."""
    from jaxsparse.ops.sga_rings import init_sga_rings, sga_ring_decode

    rings = init_sga_rings(q.shape[0], 6, 4, k.shape[2], k.shape[3], k.dtype)
    step = jax.jit(sga_ring_decode, static_argnames=("window", "max_global"))  # op by op: slow
    outs = []
    for start, stop in [(0, 30)] + [(t, t + 1) for t in range(30, q.shape[1])]:
        out, rings = step(q[:, start:stop], k[:, start:stop], v[:, start:stop],
                          scores[:, start:stop], rings, jnp.int32(start), window=6, max_global=4)
        outs.append(out)
    return jnp.concatenate(outs, axis=1)


def _routing_centroids(q):
    from jaxsparse.ops.routing import init_centroids

    return init_centroids(jax.random.key(7), q.shape[2], 4, q.shape[3])


def _routing(q, k, v, scores):
    from jaxsparse.ops.routing import causal_routing_attention

    return causal_routing_attention(q, k, v, _routing_centroids(q), window=5, query_chunk=16)[0]


def _routing_balanced(q, k, v, scores):
    from jaxsparse.ops.routing import balanced_routing_attention

    return balanced_routing_attention(q, k, v, _routing_centroids(q), window=8, causal=True)[0]


def _routing_decode(q, k, v, scores):
    from jaxsparse.ops.routing import assign, causal_routing_decode, routing_units

    centroids = _routing_centroids(q)
    clusters = assign(routing_units(k), centroids)
    lengths = jnp.full((q.shape[0],), q.shape[1], jnp.int32)
    return causal_routing_decode(q, k, v, clusters, lengths, centroids, window=5)


def _routing_rings(q, k, v, scores):
    """A prompt of 29 tokens, then the rest one at a time from the per-cluster rings."""
    from jaxsparse.ops.routing_rings import init_routing_rings, routing_ring_decode

    centroids = _routing_centroids(q)
    rings = init_routing_rings(q.shape[0], q.shape[2], 4, 5, q.shape[3], k.dtype)
    step = jax.jit(routing_ring_decode)  # op by op, the 8 steps took most of a minute
    outs = []
    for start, stop in [(0, 29)] + [(t, t + 1) for t in range(29, q.shape[1])]:
        out, rings = step(q[:, start:stop], k[:, start:stop], v[:, start:stop], rings,
                          centroids)
        outs.append(out)
    return jnp.concatenate(outs, axis=1)


ATTENTION = {"sga gather": _sga("gather"), "sga dense": _sga("dense"),
             "sga blocked": _sga("blocked"), "sga decode": _sga_decode,
             "sga ring decode": _sga_rings,
             "routing causal": _routing, "routing top-w": _routing_balanced,
             "routing decode": _routing_decode, "routing ring decode": _routing_rings}


@pytest.mark.parametrize("name", list(ATTENTION))
def test_attention_ops_compute_bfloat16_inputs_in_bfloat16(name):
    """bfloat16 q, k, v: every matmul of the forward and backward pass has bfloat16 operands
    (before, each op upcast its inputs and ran float32 matmuls) — but routing's k-means
    assignment (unit vectors against the float32 centroids ``[H, C, D]``, no gradient); values
    and gradients are within bfloat16 error of the float32 op on the same rounded inputs."""
    attend = ATTENTION[name]
    q, k, v, scores = normal(3, *[(2, 37, 2, 8)] * 3, (2, 37))   # several blocks and chunks
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    wide = [x.astype(jnp.float32) for x in (q, k, v)]
    out = attend(q, k, v, scores)
    assert out.dtype == jnp.bfloat16
    assert relative_error(out, attend(*wide, scores)) < 4 * EPS
    loss = sum_of_sines(lambda q, k, v: attend(q, k, v, scores))
    grads, grads_wide = jax.grad(loss, (0, 1, 2))(q, k, v), jax.grad(loss, (0, 1, 2))(*wide)
    for g, w in zip(grads, grads_wide):
        assert g.dtype == jnp.bfloat16 and relative_error(g, w) < 8 * EPS
    clustering = [_routing_centroids(q).shape] if name.startswith("routing") else []
    assert operand_dtypes(jax.value_and_grad(loss, (0, 1, 2)), q, k, v,
                          leave_out=clustering) == {BF16}


def test_workspace_projects_and_reads_in_bfloat16_around_a_float32_recurrence():
    """A bfloat16 workspace: outside the slot recurrence (the scan) — projecting every token's
    key and value, every token's read of the slots, and their gradients — all matmuls take
    bfloat16 operands (all were float32); the recurrence itself is float32; the reads are
    within bfloat16 error of a float32 workspace holding the same weights."""
    from jaxsparse.nn.workspace import WorkspaceMemory

    low = WorkspaceMemory(8, 3, 5, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    wide = WorkspaceMemory(8, 3, 5, rngs=nnx.Rngs(0))
    nnx.update(wide, jax.tree.map(lambda a: a.astype(jnp.float32), nnx.state(low, nnx.Param)))
    (x,) = normal(4, (2, 23, 8))
    out = low(x)
    assert out.dtype == jnp.float32  # the input's dtype
    assert relative_error(out, wide(x)) < 4 * EPS
    graph, params = nnx.split(low)
    loss = lambda p, x: jnp.sum(jnp.sin(nnx.merge(graph, p)(x)))  # noqa: E731
    found = matmuls(jax.value_and_grad(loss, (0, 1)), params, x)
    outside = {m.dtypes for m in found if "scan" not in m.enclosing}
    inside = {m.dtypes for m in found if "scan" in m.enclosing}
    assert outside == {BF16} and inside == {("float32", "float32")}
    cache = low.init_cache(2)
    steps, cache = low.decode(x[:, :7], cache, 0)
    rest, _ = low.decode(x[:, 7:], cache, 7)
    np.testing.assert_allclose(jnp.concatenate([steps, rest], 1), out, atol=4 * EPS)


def test_bfloat16_hydra_runs_almost_all_its_matmul_work_in_bfloat16():
    """hydra_tiny with ``model.dtype=bfloat16``: counted in FLOPs over a training step
    (forward and backward, every scan iteration), at least 90% of the matmul work has
    bfloat16 operands — 87% before the SGA and the workspace computed in bfloat16, 95% after;
    what stays float32 is the recurrence of the workspace slots, the product-key scores and
    the MoE router."""
    from jaxsparse import configs
    from jaxsparse.config import apply_overrides
    from jaxsparse.models.registry import build

    cfg = apply_overrides(configs.get("hydra_tiny"), [
        "model.dtype=bfloat16", "model.param_dtype=bfloat16", "data.seq_len=64"])
    model = build(cfg.model, nnx.Rngs(0))
    model.eval()
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    tokens = jnp.zeros((2, 64), jnp.int32)

    def loss(p):
        return jnp.mean(nnx.merge(graph, p, rest)(tokens).astype(jnp.float32))

    work = {}
    for m in matmuls(jax.grad(loss), params):
        work[m.dtypes] = work.get(m.dtypes, 0) + m.flops
    assert work[BF16] / sum(work.values()) >= 0.9, work


def test_float16_training_scales_the_loss_so_small_gradients_survive():
    """Unscaled, float16 cotangents fell below its normal range: Mamba's gradients were 8%
    off float32's at batch 32 x 128 (dt_proj 51%); at the loss scale's starting value they are
    within float16's rounding (bfloat16's own error here is ~1e-2)."""
    from jaxsparse import configs
    from jaxsparse.config import apply_overrides
    from jaxsparse.data import make_stream
    from jaxsparse.parallel import make_mesh
    from jaxsparse.train.loss_scale import INITIAL_SCALE
    from jaxsparse.train.step import make_gradients
    from jaxsparse.train.state import TrainSetup

    base = apply_overrides(configs.get("mamba_tiny"), ["model.n_layers=2", "model.d_model=64",
                                                       "data.batch_size=32", "data.seq_len=128"])
    reference = TrainSetup(base, make_mesh(base.mesh, jax.devices()[:1]))
    state = reference.init()
    batch = reference.global_batch(make_stream(base).batch(0))

    def gradients(dtype, scale):
        cfg = apply_overrides(base, [f"model.dtype={dtype}"])
        setup = TrainSetup(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
        grads, _ = jax.jit(make_gradients(setup))(state["params"], state["rest"], batch,
                                                  jnp.float32(scale))
        return jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads)])

    want = gradients("float32", 1.0)
    error = lambda got: float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))  # noqa: E731
    assert error(gradients("float16", INITIAL_SCALE)) < 5e-3
    assert error(gradients("float16", 1.0)) > 3e-2  # what the scale is for


@pytest.mark.parametrize("name, depths", [("transformer_tiny", (2, 24)), ("hydra_tiny", (2, 12))])
def test_bfloat16_error_does_not_grow_with_depth(name, depths):
    """The residual stream stays float32 under bfloat16 compute: rounded to bfloat16 after
    every block, the logits' error against float32 (same weights) grew with depth —
    Transformer 0.54% at 2 layers to 1.29% at 24, Hydra 0.41% at 2 blocks to 0.65% at 12; in
    float32 0.45% to 0.46% and 0.33% to 0.40%."""
    import dataclasses

    from jaxsparse import configs
    from jaxsparse.models.registry import build

    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, 256)
    errors = []
    for n_layers in depths:
        cfg = dataclasses.replace(configs.get(name).model, n_layers=n_layers,
                                  hydra_curriculum="", workspace_layers="0,1")
        logits = {}
        for dtype in ("float32", "bfloat16"):
            model = build(dataclasses.replace(cfg, dtype=dtype), nnx.Rngs(0))
            model.eval()
            logits[dtype] = np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens), np.float64)
        want = logits["float32"]
        errors.append(np.linalg.norm(logits["bfloat16"] - want) / np.linalg.norm(want))
    assert errors[0] < 1e-2 and errors[1] < 1.25 * errors[0], errors


@pytest.mark.parametrize("tie", [True, False])
def test_the_output_head_returns_float32_logits_from_bfloat16_operands(tie):
    """The head's matmul takes bfloat16 operands and returns its float32 sums: rounded to
    bfloat16 first, logits of ~25 lost up to 0.125 each (the mean log-sum-exp moved 0.024
    against float32's on hydra_tiny with trained-size logits, 0.010 now)."""
    import dataclasses

    from jaxsparse import configs
    from jaxsparse.models.registry import build

    cfg = dataclasses.replace(configs.get("transformer_tiny").model, dtype="bfloat16",
                              tie_embeddings=tie)
    model = build(cfg, nnx.Rngs(0))
    tokens = jnp.zeros((2, 8), jnp.int32)
    import jax.extend

    def dots(jaxpr):  # every dot_general, nested ones (custom_vjp, pjit) included
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                yield eqn
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from dots(sub)

    jaxpr = jax.make_jaxpr(lambda t: model(t))(tokens).jaxpr
    heads = [eqn for eqn in dots(jaxpr) if eqn.outvars[0].aval.shape[-1] == cfg.vocab_size]
    assert len(heads) == 1, heads
    head = heads[0]
    assert [str(v.aval.dtype) for v in head.invars] == ["bfloat16", "bfloat16"]
    assert head.outvars[0].aval.dtype == jnp.float32
    # ... and its backward matmuls stay bfloat16 (autodiff of a float32 result would take a
    # float32 cotangent and upcast both to a float32 matmul)
    graph, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        logits = nnx.merge(graph, p, rest)(tokens)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    found = [m for m in matmuls(jax.grad(loss), params) if cfg.vocab_size in
             [d for shape in m.shapes for d in shape]]
    assert len(found) == 3 and all(m.dtypes == BF16 for m in found), found
