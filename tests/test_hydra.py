"""Hydra: the diagonal SSM against its recurrence, the whole model's causality and cached
decoding, parameter accounting against a formula, the curriculum (stages, switching, resume
through the training loop) and config errors raised before anything compiles."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsparse import configs, models
from jaxsparse.config import ConfigError, apply_overrides, validate
from jaxsparse.models.curriculum import active_components, parse_curriculum, stage_at, stages
from jaxsparse.models.hydra import parameter_accounting
from jaxsparse.nn.diagonal_ssm import DiagonalSSM
from jaxsparse.nn.moe import MoE
from jaxsparse.ops.diagonal_ssm import diagonal_ssm, diagonal_ssm_reference, linear_scan

from helpers import TINY, run_python

# TINY without its d_ff: every feed-forward layer here is MoE, of width moe_d_ff
SMALL = [o for o in TINY if not o.startswith("model.d_ff=")] + [
    "model.name=hydra", "model.n_layers=3", "model.expand=1", "model.hydra_window=4",
    "model.hydra_max_global=3", "model.moe_experts=4", "model.moe_k=2", "model.moe_every=1",
    "model.moe_chunk=4", "model.moe_d_ff=32", "model.pkm_layers=1", "model.pkm_slots=64",
    "model.pkm_heads=2", "model.pkm_k_dim=8", "model.pkm_knn=4", "model.workspace_slots=3",
    "model.workspace_chunk=5", "model.hydra_ssm_conv=3",
]


def small_config(*extra):
    return apply_overrides(configs.get("transformer_tiny"), SMALL + list(extra))


def tokens(seed, length=23, batch=2):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, 256, jnp.int32)


@pytest.mark.parametrize("impl", ["sequential", "associative"])
def test_diagonal_ssm_equals_its_recurrence_with_gradients(impl):
    ks = jax.random.split(jax.random.key(0), 6)
    delta, B, C, U = (jax.random.normal(k, (2, 37, 6)) for k in ks[:4])
    log_lambda, D = jax.random.normal(ks[4], (6,)), jax.random.normal(ks[5], (6,))
    args = (delta, B, C, U, log_lambda, D)
    got = diagonal_ssm(*args, implementation=impl)[0]
    np.testing.assert_allclose(got, diagonal_ssm_reference(*args), atol=1e-5, rtol=1e-5)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
    g = jax.jit(jax.grad(loss(lambda *a: diagonal_ssm(*a, implementation=impl)[0]),
                         argnums=range(6)))(*args)
    g_ref = jax.grad(loss(diagonal_ssm_reference), argnums=range(6))(*args)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_ssm_convolution_mixes_each_channel_with_its_predecessors_only():
    """The SSM mixer with a width-3 convolution equals the same mixer without one applied to
    the input convolved by hand: y_t = b + sum_k w[k] x[t - 2 + k], zeros before the start."""
    ssm = DiagonalSSM(6, 5, conv_width=3, rngs=nnx.Rngs(3))
    x = np.asarray(jax.random.normal(jax.random.key(4), (2, 11, 6)))
    w, b = np.asarray(ssm.conv_w[...]), np.asarray(ssm.conv_b[...])
    padded = np.concatenate([np.zeros((2, 2, 6)), x], axis=1)
    by_hand = b + sum(w[k] * padded[:, k:k + 11] for k in range(3))
    got, _ = ssm(jnp.asarray(x))
    ssm.conv_width = 0
    expected, _ = ssm(jnp.asarray(by_hand, jnp.float32))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="conv_width=-1: must be an integer >= 0"):
        DiagonalSSM(6, 5, conv_width=-1, rngs=nnx.Rngs(0))


def test_linear_scan_carries_an_initial_state_and_refuses_bad_input():
    a = jax.random.uniform(jax.random.key(1), (1, 9, 3))
    b = jax.random.normal(jax.random.key(2), (1, 9, 3))
    h0 = jnp.ones((1, 3))
    whole, _ = linear_scan(a, b, h0)
    first, mid = linear_scan(a[:, :4], b[:, :4], h0, implementation="associative")
    second, _ = linear_scan(a[:, 4:], b[:, 4:], mid)
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), whole, atol=1e-6)
    with pytest.raises(ValueError, match="implementation=.cuda."):
        linear_scan(a, b, implementation="cuda")
    with pytest.raises(ValueError, match="must share one shape"):
        linear_scan(a, b[:, :3])


@pytest.fixture(scope="module")
def hydra():
    model = models.build(small_config().model, nnx.Rngs(0))
    model.eval()
    return model


def test_future_tokens_do_not_change_past_logits(hydra):
    forward = nnx.jit(lambda m, x: m(x))
    a = tokens(1)
    base = forward(hydra, a)
    for t in (0, 6, 12, 21):
        b = a.at[:, t + 1:].set((a[:, t + 1:] + 7) % 256)
        changed = forward(hydra, b)
        np.testing.assert_allclose(changed[:, :t + 1], base[:, :t + 1], atol=1e-5)
        assert not np.allclose(changed[:, t + 1:], base[:, t + 1:], atol=1e-4)


def forward_and_decoded(model, x):
    """``(one forward pass, the same tokens decoded in pieces)``: a prefill and single tokens
    across chunk boundaries of the MoE router (4), the workspace (5) and the SGA window (4)."""
    full = nnx.jit(lambda m, x: m(x))(model, x)
    cache = model.init_cache(2, 32)
    decode = nnx.jit(lambda m, x, cache: m.decode(x, cache))
    pieces = []
    for start, stop in [(0, 9), (9, 10), (10, 11), (11, 17), (17, 23)]:
        logits, cache = decode(model, x[:, start:stop], cache)
        pieces.append(logits)
    return full, jnp.concatenate(pieces, 1)


def test_cached_decoding_equals_the_forward_pass(hydra):
    """SSM states and convolution inputs, SGA key/value/score caches, the workspace's slots and
    chunk buffer and the router's pooled chunk all carry over."""
    full, decoded = forward_and_decoded(hydra, tokens(2))
    np.testing.assert_allclose(decoded, full, atol=1e-4, rtol=1e-4)


def test_cached_decoding_equals_the_forward_pass_in_bfloat16():
    """Under bfloat16 compute both paths round the same values at the same places, so they
    agree to float32 rounding, not bfloat16's: the SSM convolution's carried inputs were kept
    in the cache's bfloat16 while the full pass convolved the block's float32 normed
    residual (1.3e-3 apart on these logits; every other family decodes exactly)."""
    model = models.build(small_config("model.dtype=bfloat16").model, nnx.Rngs(0))
    model.eval()
    full, decoded = forward_and_decoded(model, tokens(2))
    np.testing.assert_allclose(decoded, full, atol=2e-5, rtol=2e-5)


def test_workspace_read_by_some_blocks_is_shared_causal_and_decodes_like_the_forward():
    """``workspace_layers`` picks the reading blocks: only they get a workspace gate and cache,
    the one workspace is shared, and causality and cached decoding still hold."""
    model = models.build(small_config("model.workspace_layers=0,2").model, nnx.Rngs(3))
    model.eval()
    assert [b.use_workspace for b in model.blocks] == [True, False, True]
    assert model.blocks[1].gate_workspace is None and model.blocks[0].gate_workspace is not None
    x = tokens(4)
    full = nnx.jit(lambda m, x: m(x))(model, x)
    changed = nnx.jit(lambda m, x: m(x))(model, x.at[:, 12:].set(5))
    np.testing.assert_allclose(changed[:, :12], full[:, :12], atol=1e-5)
    cache = model.init_cache(2, 32)
    assert [("workspace" in c) for c in cache["layers"]] == [True, False, True]
    decode = nnx.jit(lambda m, x, cache: m.decode(x, cache))
    pieces = []
    for start, stop in [(0, 7), (7, 8), (8, 23)]:
        logits, cache = decode(model, x[:, start:stop], cache)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=1e-4, rtol=1e-4)
    # every block reads it when the list is empty; none exists without slots
    assert all(b.use_workspace for b in models.build(small_config().model, nnx.Rngs(0)).blocks)
    with pytest.raises(ConfigError, match=r"model.workspace_layers='1': names blocks that read "
                                          r"the workspace, but model.workspace_slots=0"):
        validate(small_config("model.workspace_layers=1", "model.workspace_slots=0"))


def test_routing_trace_reports_each_blocks_experts_and_memory_slots(hydra):
    x = tokens(5, length=16)
    trace = nnx.jit(lambda m, t: m.routing_trace(t))(hydra, x)
    assert len(trace["experts"]) == 3 and len(trace["pkm_slots"]) == 3
    for experts, probs in zip(trace["experts"], trace["router_probs"]):
        assert experts.shape == (32,) and 0 <= int(experts.min()) and int(experts.max()) < 4
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    # causal chunk routing: the first chunk of each row has no earlier chunk to route from
    chunk = hydra.blocks[0].ffn.chunk
    assert chunk and len(trace["routed"]) == len(trace["decisions_routed"]) == 3
    for routed, decided in zip(trace["routed"], trace["decisions_routed"]):
        np.testing.assert_array_equal(routed, np.tile(np.arange(16) >= chunk, 2))
        np.testing.assert_array_equal(decided, np.tile(np.arange(16 // chunk) > 0, 2))
    assert trace["pkm_slots"][0] is None and trace["pkm_slots"][1].shape == (2, 16, 2, 4)
    # the slots are the block's own product-key lookup of its normalised input (compiled:
    # a Hydra block dispatched op by op took 7 s)
    @nnx.jit
    def second_blocks_slots(model, x):
        h = model.blocks[0](model.embed(x), jnp.broadcast_to(jnp.arange(16), x.shape),
                            active=model.active(), workspace=model.workspace)[0]
        return model.blocks[1].pkm.lookup(model.blocks[1].norm(h))[1]

    slots = second_blocks_slots(hydra, x)
    np.testing.assert_array_equal(trace["pkm_slots"][1], slots)


def test_routing_trace_takes_lengths_that_are_no_multiple_of_the_moe_chunk(hydra):
    """Routed as the forward pass routes them (padded chunks): 18 tokens in chunks of 4 were
    refused ("chunk=4 must divide the sequence length 18"). Chunk routing is causal, so the
    first 16 tokens keep the experts a trace of those 16 alone gives."""
    trace = nnx.jit(lambda m, t: m.routing_trace(t))
    x = tokens(6, length=18)
    whole, prefix = trace(hydra, x), trace(hydra, x[:, :16])
    for long, short in zip(whole["experts"], prefix["experts"]):
        assert long.shape == (36,)
        np.testing.assert_array_equal(long.reshape(2, 18)[:, :16], short.reshape(2, 16))


def test_routing_trace_has_one_entry_per_block_and_changes_no_state():
    """With dense blocks (moe_every=2) the MoE lists held only the MoE blocks' entries, so
    entry i was another block's (the notebook labelled block 1's experts as block 0's); a
    training-mode trace advanced the routers' step counters (the SMoE-Dropout k schedule),
    and 1-D tokens failed with an IndexError."""
    model = models.build(small_config("model.moe_every=2", "model.n_layers=4", "model.d_ff=64",
                                      "model.moe_k=1", "model.moe_k_end=4").model, nnx.Rngs(0))
    is_moe = [isinstance(block.ffn, MoE) for block in model.blocks]
    assert is_moe == [False, True, False, True]
    before = [int(block.ffn.step[...]) for block, moe in zip(model.blocks, is_moe) if moe]
    trace = nnx.jit(lambda m, t: m.routing_trace(t))(model, tokens(5, length=16))  # train mode
    for key in ("experts", "router_probs", "routed", "decisions_routed", "pkm_slots"):
        assert len(trace[key]) == 4, key
    for key in ("experts", "router_probs", "routed", "decisions_routed"):
        assert [entry is not None for entry in trace[key]] == is_moe, key
    assert [int(block.ffn.step[...]) for block, moe in zip(model.blocks, is_moe) if moe] == before
    with pytest.raises(ValueError, match=r"tokens must be an integer \[batch, length\] array"):
        model.routing_trace(jnp.zeros((16,), jnp.int32))


def test_decode_caches_of_bad_sizes_or_dtypes_are_refused(hydra):
    """HydraLM builds its own cache (a workspace per block): checked as LanguageModel's is.
    An integer cache truncated the SGA's keys and values (decoding went 0.056 off)."""
    for args, message in [((2, 8, jnp.int32), "dtype='int32': a decode cache must have a "
                                              "floating-point dtype"),
                          ((2, 8, jnp.bool_), "dtype='bool'"),
                          ((0, 8), "batch=0: must be an integer >= 1"),
                          ((2, -4), "max_len=-4: must be an integer >= 1"),
                          ((2, 2.5), "max_len=2.5: must be an integer >= 1")]:
        with pytest.raises(ValueError, match=message):
            hydra.init_cache(*args)
    with pytest.raises(ValueError, match="dtype='int32'"):
        hydra.blocks[0].ssm.init_cache(2, 8, jnp.int32)


def test_bad_ssm_mixer_options_are_refused_when_built():
    for kw, message in [(dict(conv_width=2.5), "conv_width=2.5: must be an integer >= 0"),
                        (dict(conv_width=True), "conv_width=True: must be an integer >= 0"),
                        (dict(implementation="bogus"), "implementation='bogus': allowed")]:
        with pytest.raises(ValueError, match=message):
            DiagonalSSM(6, 5, rngs=nnx.Rngs(0), **kw)


def _formula(m) -> dict[str, int]:
    """Parameter counts written out from the architecture (independent of the modules)."""
    d, layers, width = m.d_model, m.n_layers, m.hydra_ssm_width or m.expand * m.d_model
    hd = m.resolved_head_dim
    sga_layers = sum(1 for i in range(layers) if i % m.hydra_sga_every == m.hydra_sga_every - 1)
    pkm_layers = len([p for p in m.pkm_layers.split(",") if p.strip()])
    # blocks reading the workspace (each has a gate): the listed ones, or all when none listed
    reading = len([p for p in m.workspace_layers.split(",") if p.strip()]) or layers
    # MoE in every moe_every-th block (layers moe_every-1, 2·moe_every-1, ...), SwiGLU elsewhere
    moe_layers = sum(1 for i in range(layers) if i % m.moe_every == m.moe_every - 1
                     ) if m.moe_experts else 0
    moe = m.moe_experts * 3 * d * (m.moe_d_ff or m.d_ff) + d * m.moe_experts
    counts = {
        "embedding": m.vocab_size * d * (1 if m.tie_embeddings else 2),
        "ssm": layers * (d * 4 * width + width * d + 2 * width + (m.hydra_ssm_conv + 1) * d
                         * (m.hydra_ssm_conv > 0)),
        "sga": sga_layers * (2 * d * m.n_heads * hd + 2 * d * m.n_kv_heads * hd + d),
        "ffn": moe_layers * moe + (layers - moe_layers) * 3 * d * m.d_ff,
        "pkm": pkm_layers * (d * m.pkm_heads * m.pkm_k_dim + m.pkm_heads * math.isqrt(m.pkm_slots)
                             * m.pkm_k_dim + m.pkm_slots * d),
        "workspace": (m.workspace_slots * d + 5 * d * d + d) if m.workspace_slots else 0,
        "norms_and_gates": d * (layers + 1) + d * (2 * layers + sga_layers + pkm_layers
                                                   + (reading if m.workspace_slots else 0)),
    }
    counts["total"] = sum(counts.values())
    return counts


@pytest.mark.parametrize("name", ["hydra_tiny", "hydra_29m", "hydra_1p6b"])
def test_parameter_accounting_equals_the_formula_and_the_model(name):
    m = configs.get(name).model
    accounting = parameter_accounting(m)
    assert accounting == _formula(m)
    assert accounting["total"] == models.count_params(m)


@pytest.mark.parametrize("moe_every", [2, 3])
def test_parameter_accounting_follows_moe_every(moe_every):
    """With ``moe_every > 1`` the blocks alternate dense SwiGLU and MoE feed-forwards (as in
    the Transformer), not MoE everywhere."""
    m = small_config(f"model.moe_every={moe_every}").model
    kinds = [type(b.ffn).__name__ for b in models.build(m, nnx.Rngs(0)).blocks]
    assert kinds == ["MoE" if i % moe_every == moe_every - 1 else "SwiGLU" for i in range(3)]
    accounting = parameter_accounting(m)
    assert accounting == _formula(m)
    assert accounting["total"] == models.count_params(m)


def test_named_configs_are_at_their_advertised_scales():
    small, large = (models.count_params(configs.get(n).model) for n in ("hydra_29m", "hydra_1p6b"))
    assert small > 25e6 and small < 31e6
    assert large > 1.5e9 and large < 1.7e9


def test_curriculum_spec_stages_and_switches():
    spec = "sga:10,moe:20,memory:30"
    assert parse_curriculum(spec) == {"ssm": 0, "sga": 10, "ffn": 20, "pkm": 30, "workspace": 30}
    assert stages(spec) == [(0, ("ssm",)), (10, ("ssm", "sga")), (20, ("ssm", "sga", "ffn")),
                            (30, ("ssm", "sga", "ffn", "pkm", "workspace"))]
    assert [stage_at(spec, s) for s in (0, 9, 10, 29, 30, 999)] == [0, 0, 1, 2, 3, 3]
    assert stages("") == [(0, ("ssm", "sga", "ffn", "pkm", "workspace"))]
    on = active_components(spec, jnp.asarray(15))
    assert {k: float(v) for k, v in on.items()} == {"ssm": 1, "sga": 1, "ffn": 0, "pkm": 0,
                                                    "workspace": 0}
    for bad, message in [("attention:3", "unknown component 'attention'"),
                         ("sga", "expected component:start_step"), ("sga:-1", ">= 0"),
                         ("sga:x", "must be an int"),
                         # a component named twice, directly or through an alias
                         ("sga:10,sga:20", "component 'sga' is staged twice, by 'sga:10' and "
                                           "by 'sga:20'"),
                         ("pkm:5,memory:10", "component 'pkm' is staged twice, by 'pkm:5' and "
                                             "by 'memory:10'"),
                         ("memory:5,workspace:10", "component 'workspace' is staged twice, by "
                                                   "'memory:5' and by 'workspace:10'"),
                         ("moe:1,ffn:1", "component 'ffn' is staged twice")]:
        with pytest.raises(ValueError, match=message):
            parse_curriculum(bad)


def test_a_switched_off_branch_neither_contributes_nor_learns():
    cfg = small_config("model.hydra_curriculum=sga:5,memory:5").model
    model = models.build(cfg, nnx.Rngs(0))
    x = tokens(3)

    @nnx.jit
    def gradients(model):
        return nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)

    grads = gradients(model)  # step 0: SGA, PKM and workspace off
    sga = grads["blocks"][2]["sga"]
    assert all(float(jnp.abs(g[...]).max()) == 0 for g in jax.tree.leaves(sga, is_leaf=lambda v: isinstance(v, nnx.Variable)))
    assert float(jnp.abs(grads["workspace"]["wq"][...]).max()) == 0
    assert float(jnp.abs(grads["blocks"][0]["ssm"]["in_proj"]["kernel"][...]).max()) > 0
    assert int(model.curriculum_step[...]) == 1  # the training call counted a step
    model.curriculum_step[...] = jnp.asarray(5)
    grads = gradients(model)
    assert float(jnp.abs(grads["workspace"]["wq"][...]).max()) > 0
    model.eval()
    before = int(model.curriculum_step[...])
    nnx.jit(lambda m: m(x))(model)
    assert int(model.curriculum_step[...]) == before  # evaluation does not count


@pytest.mark.parametrize("overrides, idle", [
    (["model.hydra_curriculum=memory:50", "model.pkm_layers=", "model.workspace_slots=0"],
     r"its entry 'memory:50' switches nothing on: the model builds no product-key memory "
     r"\(model.pkm_layers=''\) and no workspace \(model.workspace_slots=0\)"),
    (["model.hydra_curriculum=moe:4,sga:10", "model.hydra_sga_every=4"],
     r"its entry 'sga:10' switches nothing on: the model builds no sparse global attention "
     r"\(model.hydra_sga_every=4, 3 blocks\)"),
    (["model.hydra_curriculum=pkm:5", "model.pkm_layers="],
     r"its entry 'pkm:5' switches nothing on: the model builds no product-key memory"),
])
def test_staging_a_component_the_model_does_not_build_is_reported(overrides, idle):
    from jaxsparse.config_usage import UnreadKeyWarning

    with pytest.warns(UnreadKeyWarning, match=r"model.hydra_curriculum=.*" + idle):
        validate(small_config(*overrides))


def test_staging_components_the_model_builds_is_not_reported():
    import warnings

    from jaxsparse.config_usage import UnreadKeyWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnreadKeyWarning)
        # memory: the workspace is there though the product-key memory is not (whose own
        # settings are then reported unread)
        validate(small_config("model.hydra_curriculum=sga:2,moe:3,memory:4", "model.pkm_layers="))
    reported = [str(w.message) for w in caught if issubclass(w.category, UnreadKeyWarning)]
    assert reported and not any("hydra_curriculum" in message for message in reported)


def test_a_switched_off_moe_branch_adds_no_auxiliary_loss_and_no_gradient():
    """``moe:1000``: at step 0 the MoE's load-balancing and z losses, collected as the train
    step collects them, are 0 and send no gradient — neither to the routers nor, through the
    blocks' normalised inputs, to the shared embedding; its statistics read 0 and its step
    counter stays. At step 1000 the same losses are back and the counter moves."""
    from jaxsparse.nn.intermediates import run_capturing
    from jaxsparse.train.step import _aux_losses

    model = models.build(small_config("model.hydra_curriculum=moe:1000").model, nnx.Rngs(0))
    x = tokens(3)

    @nnx.jit
    def aux_and_grads(model):
        def aux(m):
            _, sown = run_capturing(m, "__call__", x)
            return _aux_losses(sown)

        return nnx.value_and_grad(aux, has_aux=True)(model)

    def largest(grads, *path):
        for key in path:
            grads = grads[key]
        return float(jnp.abs(grads[...]).max())

    (aux, stats), grads = aux_and_grads(model)
    assert float(aux) == 0
    assert float(stats["moe_max_load"]) == 0 and float(stats["moe_dropped"]) == 0
    for i in range(3):
        assert largest(grads, "blocks", i, "ffn", "router", "kernel") == 0
        assert largest(grads, "blocks", i, "norm", "scale") == 0
    assert largest(grads, "embed", "embedding") == 0
    # nor does it count training steps (the SMoE-Dropout k schedule waits for it)
    assert all(int(model.blocks[i].ffn.step[...]) == 0 for i in range(3))
    model.curriculum_step[...] = jnp.asarray(1000)
    (aux, stats), grads = aux_and_grads(model)
    assert float(aux) > 0 and float(stats["moe_max_load"]) >= 1
    assert all(largest(grads, "blocks", i, "ffn", "router", "kernel") > 0 for i in range(3))
    assert largest(grads, "embed", "embedding") > 0
    assert all(int(model.blocks[i].ffn.step[...]) == 1 for i in range(3))


def test_a_switched_off_branch_stays_exactly_as_it_was_through_train_steps():
    """AdamW's decoupled weight decay shrinks a matrix whose gradient is 0: the train step
    leaves the parameters and gates of the components that are off untouched, by the flags
    of the step it trains (the model counts that step in its forward pass). ``sga:2``: SGA
    is as initialised after steps 0 and 1 and trains from step 2; ``memory:1000``: the
    product-key memory and the shared workspace never change; the rest trains from step 0."""
    from jaxsparse.data import make_stream
    from jaxsparse.parallel import make_mesh
    from jaxsparse.train.state import TrainSetup
    from jaxsparse.train.step import make_train_step

    cfg = small_config("model.hydra_curriculum=sga:2,memory:1000", "optimizer.weight_decay=0.5",
                       "optimizer.warmup_steps=0", "train.steps=3", "data.batch_size=2",
                       "data.seq_len=16")
    setup = TrainSetup(cfg, make_mesh(cfg.mesh))
    state, step, stream = setup.init(), make_train_step(setup), make_stream(cfg)
    params = [jax.device_get(state["params"])]
    for i in range(3):
        state, _ = step(state, setup.global_batch(stream.batch(i)))
        params.append(jax.device_get(state["params"]))

    def parts(p, names):  # {path: array} of the named parts of the blocks and the model
        out = {}
        for i, block in enumerate(p["blocks"].values() if isinstance(p["blocks"], dict)
                                  else p["blocks"]):
            for name in names:
                if name in block:
                    for path, leaf in jax.tree_util.tree_leaves_with_path(block[name]):
                        out[f"blocks/{i}/{name}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
        for name in names:
            if name in p:
                for path, leaf in jax.tree_util.tree_leaves_with_path(p[name]):
                    out[f"{name}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
        return out

    def changed(names, before, after):
        a, b = parts(params[before], names), parts(params[after], names)
        assert a and a.keys() == b.keys()
        return {path for path in a if not np.array_equal(a[path], b[path])}

    sga, memories = ("sga", "gate_sga"), ("pkm", "gate_pkm", "workspace", "gate_workspace")
    assert changed(sga, 0, 2) == set()  # steps 0 and 1: off
    assert changed(sga, 2, 3) == set(parts(params[0], sga))  # step 2: on, all of it trains
    assert changed(memories, 0, 3) == set()
    on = ("ssm", "ffn", "gate_ssm", "gate_ffn", "embed")
    assert changed(on, 0, 1) == set(parts(params[0], on))


def test_curriculum_survives_an_interrupted_run(tmp_path):
    from jaxsparse.train import train
    from jaxsparse.train.metrics import read_metrics

    cfg = validate(small_config("model.hydra_curriculum=sga:2,memory:4", "train.steps=5",
                                "data.batch_size=4", "data.seq_len=16"))
    first = train(cfg, tmp_path, should_stop=lambda step: step == 3, quiet=True, sample=False)
    assert first.stopped_early and first.step == 3
    second = train(cfg, tmp_path, quiet=True, sample=False)
    assert second.step == 5
    assert int(second.state["rest"]["curriculum_step"]) == 5
    records = [r for r in read_metrics(tmp_path) if r["split"] == "curriculum"]
    # logged at the start, at each switch, and again where the resumed run picked up
    assert [(r["step"], r["stage"]) for r in records] == [(0, 0), (2, 1), (3, 1), (4, 2)]
    losses = [r["loss"] for r in read_metrics(tmp_path) if r["split"] == "train"]
    assert np.isfinite(losses).all()


@pytest.mark.parametrize("override,message", [
    ("model.hydra_sga_every=0", r"model.hydra_sga_every=0: must be >= 1"),
    ("model.hydra_max_global=33", r"model.hydra_max_global=33: the global-token budget must be "
                                  r"in \[0, data.seq_len=32\]"),
    ("model.pkm_slots=60", r"model.pkm_slots=60: must be a perfect square"),
    ("model.pkm_knn=9", r"model.pkm_knn=9: must be in \[1, sqrt\(model.pkm_slots\)=8\]"),
    ("model.pkm_layers=3", r"model.pkm_layers='3': indices must be in \[0, model.n_layers=3\)"),
    ("model.pkm_layers=a", r"model.pkm_layers='a': comma-separated layer indices"),
    ("model.hydra_curriculum=moe:x", r"model.hydra_curriculum='moe:x'.*must be an int"),
    ("model.hydra_curriculum=pkm:5,memory:10",
     r"model.hydra_curriculum='pkm:5,memory:10': component 'pkm' is staged twice, by 'pkm:5' "
     r"and by 'memory:10'"),
    ("model.workspace_chunk=0", r"model.workspace_chunk=0: must be >= 1"),
    ("model.hydra_ssm_conv=-1", r"model.hydra_ssm_conv=-1: the SSM's convolution width must be "
                                r">= 0"),
    ("model.workspace_layers=3",
     r"model.workspace_layers='3': indices must be in \[0, model.n_layers=3\)"),
    ("model.workspace_layers=x", r"model.workspace_layers='x': comma-separated layer indices"),
    ("model.hydra_sga_impl=flash", r"model.hydra_sga_impl='flash': allowed \(None, 'gather', "
                                   r"'dense', 'blocked', 'core'\)"),
])
def test_impossible_hydra_configs_are_refused_before_compiling(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(small_config(override))


@pytest.mark.parametrize("override, message", [
    ("model.pkm_slots=60", r"must be a perfect square"),  # built 49 slots silently
    ("model.moe_every=0", r"model.moe_every=0"),  # ZeroDivisionError
    ("model.hydra_sga_every=0", r"model.hydra_sga_every=0"),  # ZeroDivisionError
    ("model.workspace_layers=7", r"indices must be in \[0, model.n_layers=3\)"),  # read by none
])
def test_a_model_class_built_directly_checks_its_config(override, message):
    """Only models.build validated: a notebook's HydraLM(cfg) took impossible settings."""
    from jaxsparse.models.hydra import HydraLM

    with pytest.raises(ConfigError, match=message):
        HydraLM(small_config(override).model, rngs=nnx.Rngs(0))


# ~40 s on 2 cores: the default run checks every implementation against the others at the op
# (tests/test_sga.py, values and gradients) and that the model reads the key (test_config_usage)
@pytest.mark.slow
def test_every_sga_implementation_gives_the_model_the_same_logits_and_gradients():
    """``model.hydra_sga_impl``: the window on the attention core merged with the global keys
    (``core``) and the masked L×L logits (``dense``) give the logits and parameter gradients of
    ``blocked`` (the automatic choice at this length, several query blocks)."""
    x = tokens(4, length=140)
    results = {}
    for impl in ("blocked", "core", "dense"):
        model = models.build(small_config("model.max_seq_len=140", "data.seq_len=140",
                                          f"model.hydra_sga_impl={impl}").model, nnx.Rngs(2))
        model.eval()  # no curriculum step counting inside the traced loss
        graph, params, rest = nnx.split(model, nnx.Param, ...)

        @jax.jit
        def logits_and_grads(p, graph=graph, rest=rest):
            def loss(p):
                return jnp.mean(jnp.sin(nnx.merge(graph, p, rest)(x)))
            return nnx.merge(graph, p, rest)(x), jax.grad(loss)(p)

        results[impl] = logits_and_grads(params)
    want_logits, want_grads = results["blocked"]
    for impl in ("core", "dense"):
        logits, grads = results[impl]
        np.testing.assert_allclose(logits, want_logits, atol=2e-5, rtol=2e-5, err_msg=impl)
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
            np.testing.assert_allclose(got, want, atol=2e-6, rtol=2e-4, err_msg=impl)


def test_jaxsparse_configs_prints_the_hydra_accounting(capsys):
    from jaxsparse.cli import main

    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("hydra_1p6b ") and "ssm=" in ln)
    total = parameter_accounting(configs.get("hydra_1p6b").model)["total"]
    assert f"total={total / 1e6:.2f}M" in line and "pkm=" in line and "workspace=" in line
    json.dumps(total)  # plain ints


HYDRA_PARALLEL = r"""
import json, jax, numpy as np
from jaxsparse import configs
from jaxsparse.config import apply_overrides
from jaxsparse.parallel import make_mesh
from jaxsparse.train.state import TrainSetup
from jaxsparse.train.step import make_train_step
from jaxsparse.data import make_stream
from test_hydra import SMALL

def run(devices, *mesh):
    # two blocks, the second with every branch (SGA, product-key memory, MoE; the workspace
    # in both): a third block only added compile time
    two_blocks = ["model.n_layers=2", "model.hydra_sga_every=2", "model.hydra_curriculum=sga:1"]
    cfg = apply_overrides(configs.get("transformer_tiny"), SMALL + two_blocks + list(mesh))
    setup = TrainSetup(cfg, make_mesh(cfg.mesh, devices))
    state, step, stream = setup.init(), make_train_step(setup), make_stream(cfg)
    metrics = []
    for i in range(2):
        state, m = step(state, setup.global_batch(stream.batch(i)))
        metrics.append({k: float(m[k]) for k in ("loss", "aux_loss")})
    return state, metrics

single, single_metrics = run(jax.devices()[:1])
state, metrics = run(jax.devices(), "mesh.data=2", "mesh.fsdp=2", "mesh.expert=2")
# SGA's window on the attention core, run per device on its rows and heads (heads_local)
_, core_metrics = run(jax.devices(), "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                      "model.hydra_sga_impl=core")
diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                     single["params"], state["params"])
gate = state["params"]["blocks"][0]["ffn"]["w_gate"]
print(json.dumps({"single": single_metrics, "sharded": metrics, "core": core_metrics,
                  "max_param_diff": max(jax.tree.leaves(diffs)),
                  "expert_spec": str(gate.sharding.spec),
                  "curriculum_step": int(state["rest"]["curriculum_step"])}))
"""


def test_hydra_trains_on_8_devices_with_data_fsdp_and_expert_sharding_like_on_one():
    """Also with SGA on the attention core (``hydra_sga_impl=core``) under tensor parallelism:
    the same losses as one device."""
    from helpers import run_python

    out = run_python(HYDRA_PARALLEL, devices=8)
    for key in ("loss", "aux_loss"):
        for run in ("sharded", "core"):
            np.testing.assert_allclose([m[key] for m in out[run]],
                                       [m[key] for m in out["single"]], rtol=2e-5,
                                       err_msg=f"{run} {key}")
    assert out["max_param_diff"] < 1e-5
    assert "expert" in out["expert_spec"]  # experts really are split
    assert out["curriculum_step"] == 2  # the stage switch at step 1 happened on the mesh too


def test_ssm_under_tensor_parallelism_keeps_its_channel_split():
    """fsdp2 × tensor4 (8 emulated devices), channels W split over tensor: the projection to
    [Δ, B, C, U] is taken apart without re-laying out W (a [B, L, 4·W] view interleaved the
    shards: all-to-alls and collective-permutes of activations), and the gradients equal one
    device's."""
    code = """
import json, jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P
from helpers import sharded_gradient_check
from jaxsparse.nn.diagonal_ssm import DiagonalSSM
from jaxsparse.parallel import PRESETS, activation_sharding
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("fsdp", "tensor"))
rules = PRESETS["fsdp_tp"].rules
graphdef, state = nnx.split(DiagonalSSM(64, 128, rngs=nnx.Rngs(0), conv_width=4))
params = nnx.to_pure_dict(state)
x = jax.random.normal(jax.random.key(1), (4, 96, 64))

def loss(p, x, mesh=None):
    with activation_sharding(mesh, rules):
        return jnp.sum(nnx.merge(graphdef, p)(x)[0] ** 2)

collectives, err = sharded_gradient_check(loss, params, state, x, mesh, rules, P("fsdp"))
print(json.dumps({"collectives": sorted(collectives), "err": err}))
"""
    out = run_python(code, devices=8)
    assert set(out["collectives"]) <= {"all-gather", "all-reduce", "reduce-scatter"}, out
    assert out["err"] < 1e-5, out


def test_tensor_and_sequence_parallelism_split_the_row_local_branches_instead_of_repeating_them():
    """fsdp2 × tensor4 and fsdp2 × sequence2 × tensor2 on 8 emulated devices: the branches
    that are not split over tensor themselves (MoE dispatch, product-key memory, workspace)
    take a share of each device's rows per tensor (and sequence) rank, so the per-device FLOPs
    of a forward+backward are an eighth of one device's, as under pure FSDP (before: 1.74x
    pure FSDP's under fsdp_tp, every tensor rank repeating them), and the gradients equal one
    device's under both."""
    code = """
import json, jax, jax.numpy as jnp, numpy as np
from helpers import worst
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxsparse import models
from jaxsparse.parallel import PRESETS, activation_sharding, param_shardings
from test_hydra import small_config
# two blocks, the second with every branch: a third block only added compile time
model = models.build(small_config("model.n_layers=2", "model.hydra_sga_every=2").model, nnx.Rngs(0))
model.eval()  # the same computation, without the training-time counters
graphdef, state, rest = nnx.split(model, nnx.Param, ...)
params = nnx.to_pure_dict(state)
tokens = jax.random.randint(jax.random.key(1), (8, 40), 0, 256)

def loss(p, t, mesh=None, rules=None):
    with activation_sharding(mesh, rules):
        return jnp.mean(nnx.merge(graphdef, p, rest)(t) ** 2)

one_device = jax.jit(jax.grad(loss)).lower(params, tokens).compile()
want = one_device(params, tokens)
out = {"one_device": {"flops": one_device.cost_analysis()["flops"]}}
for name, shape, axes in (("fsdp_tp", (2, 4), ("fsdp", "tensor")),
                          ("fsdp_tp_sp", (2, 2, 2), ("fsdp", "sequence", "tensor"))):
    mesh, rules = Mesh(np.array(jax.devices()).reshape(shape), axes), PRESETS[name].rules
    grad = jax.jit(jax.grad(lambda p, t: loss(p, t, mesh, rules)))
    length_axis = "sequence" if "sequence" in axes else None
    args = (jax.device_put(params, param_shardings(state, mesh, rules)),
            jax.device_put(tokens, NamedSharding(mesh, P("fsdp", length_axis))))
    compiled = grad.lower(*args).compile()
    got = compiled(*args)
    out[name] = {"flops": compiled.cost_analysis()["flops"],
                 "err": worst(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))}
print(json.dumps(out))
"""
    out = run_python(code, devices=8)
    assert all(out[name]["err"] < 1e-5 for name in ("fsdp_tp", "fsdp_tp_sp")), out
    an_eighth = out["one_device"]["flops"] / 8
    assert out["fsdp_tp"]["flops"] <= 1.15 * an_eighth, out
    assert out["fsdp_tp_sp"]["flops"] <= 1.15 * an_eighth, out
