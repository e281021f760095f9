import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxsparse import models
from jaxsparse.models.generate import generate

from helpers import tiny_config


@pytest.fixture(scope="module")
def model():
    return models.build(tiny_config().model, nnx.Rngs(0))


def tokens(seed, batch=2, length=24, vocab=256):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab, jnp.int32)


def test_logits_shape_and_dtype(model):
    logits = nnx.jit(lambda m, x: m(x))(model, tokens(0))  # op by op it took ~3.5 s
    assert logits.shape == (2, 24, 256) and logits.dtype == jnp.float32
    # at initialisation the prediction is close to uniform: loss ~ ln(256)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens(1)).mean()
    assert abs(float(loss) - np.log(256)) < 0.5


@pytest.mark.parametrize("t", [0, 7, 22])
def test_causality_future_tokens_do_not_change_past_logits(model, t):
    a = tokens(2)
    b = a.at[:, t + 1:].set((a[:, t + 1:] + 17) % 256)
    forward = nnx.jit(lambda m, x: m(x))  # one compile instead of op-by-op dispatch
    la, lb = forward(model, a), forward(model, b)
    np.testing.assert_allclose(la[:, :t + 1], lb[:, :t + 1], atol=1e-5)
    assert not np.allclose(la[:, t + 1:], lb[:, t + 1:], atol=1e-3)


def test_decode_with_cache_matches_full_forward(model):
    x = tokens(3, length=20)
    full = nnx.jit(lambda m, x: m(x))(model, x)
    cache = model.init_cache(2, 32)
    decode = nnx.jit(lambda m, x, c: m.decode(x, c))  # op by op it took ~20 s
    parts = []
    for start, stop in [(0, 9), (9, 10), (10, 20)]:
        logits, cache = decode(model, x[:, start:stop], cache)
        parts.append(logits)
    np.testing.assert_allclose(jnp.concatenate(parts, axis=1), full, atol=1e-4, rtol=1e-4)
    assert int(cache["index"]) == 20


@pytest.mark.parametrize("chunk", [2, 3])
def test_a_transformer_with_chunk_routed_experts_decodes_as_it_runs(chunk):
    """A Transformer block decoded its chunk-routed MoE as a plain call: each call's tokens were
    routed from their own pooled inputs, not from the chunk before (logits off by 0.25 on this
    model, and generate() sampled other tokens). The block now carries the MoE's decode state,
    as Hydra's blocks do: every split of the sequence gives the full pass's logits."""
    from jaxsparse.config import ModelConfig

    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32,
                      max_seq_len=32, moe_experts=4, moe_k=2, moe_every=1, moe_chunk=chunk)
    moe_model = models.build(cfg, nnx.Rngs(0))
    moe_model.eval()
    x = jax.random.randint(jax.random.key(1), (2, 7), 0, 32)
    full = moe_model(x)
    for split in ([1] * 7, [3, 4], [2, 2, 3]):
        cache, parts, start = moe_model.init_cache(2, 16), [], 0
        for size in split:
            logits, cache = moe_model.decode(x[:, start:start + size], cache)
            parts.append(logits)
            start += size
        np.testing.assert_allclose(jnp.concatenate(parts, axis=1), full, atol=1e-5, rtol=1e-5,
                                   err_msg=str(split))


def test_generate_greedy_equals_argmax_rollout(model):
    prompt = tokens(4, batch=1, length=5)
    out = generate(model, prompt, 6, temperature=0.0)
    forward = nnx.jit(lambda m, x: m(x))  # one compile instead of op-by-op dispatch
    seq = jnp.zeros((1, 11), jnp.int32).at[:, :5].set(prompt)
    for t in range(5, 11):  # causal model: logits at t-1 of the padded sequence see only seq[:t]
        seq = seq.at[:, t].set(jnp.argmax(forward(model, seq)[:, t - 1], -1).astype(jnp.int32))
    np.testing.assert_array_equal(out, seq[:, 5:])
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=64"):
        generate(model, prompt, 100)
    with pytest.raises(ValueError, match="temperature=-0.5: must be a finite number >= 0"):
        generate(model, prompt, 2, temperature=-0.5)
    with pytest.raises(ValueError, match=r"top_k=257: must be an int in \[0, vocab_size=256\]"):
        generate(model, prompt, 2, top_k=257)
    with pytest.raises(ValueError, match="temperature=True: must be a finite number"):
        generate(model, prompt, 2, temperature=True)
    # inside the compiled loop the embedding sees traced tokens and cannot check them: an id
    # past the vocabulary sampled zeros, and float prompts were truncated without a word
    with pytest.raises(ValueError, match=r"prompt tokens range over \[1, 300\]; the "
                                         r"vocabulary is \[0, 256\)"):
        generate(model, jnp.array([[300, 1]]), 2)
    with pytest.raises(ValueError, match="prompt must hold integer token ids, got dtype float32"):
        generate(model, jnp.array([[1.7, 2.2]]), 2)


def _greedy_rollout(model, prompt, new_tokens, total=16):
    forward = nnx.jit(lambda m, x: m(x))  # one compile: every call has the padded length
    seq = jnp.zeros((prompt.shape[0], total), jnp.int32).at[:, :prompt.shape[1]].set(prompt)
    for t in range(prompt.shape[1], prompt.shape[1] + new_tokens):
        seq = seq.at[:, t].set(jnp.argmax(forward(model, seq)[:, t - 1], -1).astype(jnp.int32))
    return seq[:, prompt.shape[1]:prompt.shape[1] + new_tokens]


def test_prompts_of_one_bucket_share_a_compiled_program(model):
    """Whole buckets of the prompt run in one pass, the rest token by token: prompts of 9, 10
    and 11 tokens (bucket 4: 8 in one pass, then 1-3 one by one) compile once, and each
    greedy continuation equals the argmax rollout of the full forward pass. Sampled
    continuations equal those of prompt_bucket=1 (the whole prompt in one pass) drawn with
    the same key: the new tokens use the same random numbers however the prompt was fed."""
    from jaxsparse.models.generate import _generate

    prompt = tokens(6, batch=2, length=11)
    compiled = None
    for length in (9, 10, 11):
        out = generate(model, prompt[:, :length], 5, temperature=0.0, prompt_bucket=4)
        compiled = _generate._cache_size() if compiled is None else compiled
        np.testing.assert_array_equal(out, _greedy_rollout(model, prompt[:, :length], 5))
    assert _generate._cache_size() == compiled
    key = jax.random.key(3)
    np.testing.assert_array_equal(
        generate(model, prompt, 5, rng=key, temperature=1.5, prompt_bucket=4),
        generate(model, prompt, 5, rng=key, temperature=1.5, prompt_bucket=1))
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"prompt_bucket={bad!r}: must be an int >= 1"):
            generate(model, prompt, 2, prompt_bucket=bad)
    with pytest.raises(ValueError, match="max_new_tokens=2.0: must be an int >= 1"):
        generate(model, prompt, 2.0)


def test_top_k_sampling_draws_from_exactly_k_tokens_even_when_tied():
    """Tokens 1, 2 and 3 tie for the second-highest logit: top-2 keeps token 0 and the first
    of them (index order, as ``lax.top_k``); a threshold at the k-th value kept all four."""
    from jaxsparse.models.generate import sample_logits

    logits = jnp.tile(jnp.array([[2.0, 1.0, 1.0, 1.0, 0.0]]), (512, 1))
    picked = np.asarray(sample_logits(logits, jax.random.key(0), 1.0, 2))
    assert set(picked.tolist()) == {0, 1}
    # traced k and temperature (what generate compiles once) pick the same tokens
    traced = jax.jit(sample_logits)(logits, jax.random.key(0), jnp.float32(1.0), jnp.int32(2))
    np.testing.assert_array_equal(traced, picked)
    greedy = jax.jit(sample_logits)(logits, jax.random.key(0), jnp.float32(0.0), jnp.int32(2))
    np.testing.assert_array_equal(greedy, np.zeros(512))


def _nucleus_reference(logits, temperature, top_k, top_p):
    """The tokens nucleus sampling may draw, per row, in float64 numpy: temperature, then the
    k best (index order among ties), then the fewest best holding top_p of what is left."""
    allowed = []
    for row in np.asarray(logits, np.float64) / temperature:
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))
        if top_k:
            order = order[:top_k]
        probs = np.exp(row[order] - row[order].max())
        probs /= probs.sum()
        count = int(np.searchsorted(np.cumsum(probs), top_p - 1e-9) + 1)  # mass reaches top_p
        allowed.append(set(order[:count]))
    return allowed


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 0.5), (0.7, 0, 0.9), (1.3, 5, 0.8), (1.0, 0, 1e-6), (1.0, 3, 0.999)])
def test_nucleus_sampling_draws_exactly_the_smallest_set_holding_top_p(temperature, top_k,
                                                                        top_p):
    """Every draw lies in the reference nucleus and, over many draws, every token of it shows
    (so it is not a subset); traced p samples the same tokens as a concrete one."""
    from jaxsparse.models.generate import sample_logits

    logits = jax.random.normal(jax.random.key(3), (4, 12)) * 2.0
    allowed = _nucleus_reference(logits, temperature, top_k, top_p)
    keys = jax.random.split(jax.random.key(0), 2000)
    draws = np.asarray(jax.vmap(lambda key: sample_logits(logits, key, temperature, top_k,
                                                          top_p))(keys))
    for row in range(4):
        seen = set(draws[:, row].tolist())
        assert seen == allowed[row], (row, seen, allowed[row])
    traced = jax.jit(sample_logits)(logits, keys[0], jnp.float32(temperature),
                                    jnp.int32(top_k), jnp.float32(top_p))
    np.testing.assert_array_equal(traced, draws[0])


def test_generate_takes_top_p_traced_and_refuses_bad_values(model):
    from jaxsparse.models.generate import _generate

    prompt = tokens(5, batch=1, length=4)
    generate(model, prompt, 3, temperature=0.7, top_p=0.9)
    before = _generate._cache_size()
    for top_p in (0.5, np.float32(0.95), 0.2):
        assert generate(model, prompt, 3, temperature=0.7, top_p=top_p).shape == (1, 3)
    assert _generate._cache_size() == before
    # a nucleus of one token is greedy whatever the temperature
    np.testing.assert_array_equal(generate(model, prompt, 3, temperature=5.0, top_p=1e-9),
                                  generate(model, prompt, 3, temperature=0.0))
    for bad in (0.0, 1.5, float("nan"), True, "0.9"):
        with pytest.raises(ValueError, match=r"top_p=.*: must be a number in \(0, 1\]"):
            generate(model, prompt, 3, top_p=bad)


def test_generate_compiles_once_for_every_temperature_and_top_k(model):
    """Sweeping the sampling temperature or k (as one does in a notebook) reuses the compiled
    program; only the mode (greedy, full distribution, top-k) is part of it."""
    from jaxsparse.models.generate import _generate

    prompt = tokens(5, batch=1, length=4)
    generate(model, prompt, 3, temperature=0.7, top_k=5)
    before = _generate._cache_size()
    for temperature, top_k in ((0.9, 5), (np.float32(1.3), np.int64(9)), (2.0, 1)):
        out = generate(model, prompt, 3, temperature=temperature, top_k=top_k)
        assert out.shape == (1, 3)
    assert _generate._cache_size() == before
    # top_k=1 is greedy whatever the temperature
    np.testing.assert_array_equal(generate(model, prompt, 3, temperature=5.0, top_k=1),
                                  generate(model, prompt, 3, temperature=0.0))


@pytest.mark.parametrize("temperature", [1e-45, 1e-39, 1e-300, 1e-30])
def test_a_tiny_temperature_samples_the_argmax(temperature):
    """logits / 1e-45 alone overflows to inf - inf = NaN inside the softmax and samples
    garbage; the limit of a vanishing temperature is greedy decoding."""
    from jaxsparse.models.generate import sample_logits

    logits = jax.random.normal(jax.random.key(7), (16, 256)) * 5
    for seed in range(3):
        picked = sample_logits(logits, jax.random.key(seed), temperature, 0)
        np.testing.assert_array_equal(picked, jnp.argmax(logits, axis=-1))
        picked = sample_logits(logits, jax.random.key(seed), temperature, 5)
        np.testing.assert_array_equal(picked, jnp.argmax(logits, axis=-1))


def test_nan_logits_sample_minus_one_and_eager_generation_says_so(model):
    """argmax and categorical both read an all-NaN row as token 0: a model gone non-finite, or
    out-of-range ids under jit (the embedding gives NaN rows on purpose), generated zeros that
    looked like text."""
    from jaxsparse.models.generate import sample_logits

    logits = jax.random.normal(jax.random.key(0), (5, 16)).at[1].set(jnp.nan).at[2, 5].set(
        jnp.nan).at[3, 5].set(jnp.inf).at[4].set(-jnp.inf)  # +inf: NaN after the max shift
    for temperature, top_k, top_p in ((0.0, 0, 1.0), (1.0, 0, 1.0), (1.0, 4, 1.0), (1.0, 0, 0.9)):
        for sampler in (sample_logits, jax.jit(sample_logits)):
            picked = np.asarray(sampler(logits, jax.random.key(1), temperature, top_k, top_p))
            assert (picked[1:] == -1).all() and 0 <= picked[0] < 16, picked
    traced = jax.jit(lambda p: generate(model, p, 4, temperature=0.8))(jnp.array([[300, 3]]))
    np.testing.assert_array_equal(traced, -1)  # was [[0, 0, 0, 0]]
    graphdef, state = nnx.split(model)
    broken = nnx.merge(graphdef, jax.tree.map(lambda a: a * jnp.nan if jnp.issubdtype(
        a.dtype, jnp.floating) else a, state))
    with pytest.raises(FloatingPointError, match=r"logits are not finite \(NaN, \+inf or all "
                                                 r"-inf; rows \[0\], from new token 0 on\)"):
        generate(broken, jnp.array([[1, 2, 3]]), 3)


def test_every_parameter_carries_logical_axes(model):
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("logical_axes")
        assert names is not None and len(names) == var[...].ndim, path


def test_untied_head_and_bf16_compute():
    cfg = tiny_config("model.dtype=bfloat16").model
    m = models.build(cfg, nnx.Rngs(1))
    assert hasattr(m, "lm_head")
    out = nnx.jit(lambda m, x: m(x))(m, tokens(5))  # op by op it took ~3.5 s
    assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
    assert m.lm_head.kernel[...].dtype == jnp.float32  # parameters stay float32


# parameters kept in float32 whatever model.param_dtype says: the recurrences' O(1) values,
# where bfloat16's spacing would round an optimiser step away (jaxsparse.nn.mamba)
FLOAT32_ALWAYS = {"A_log", "D", "dt_bias", "log_lambda"}


@pytest.mark.parametrize("name", ["transformer_tiny", "transformer_sparse_tiny", "moe_tiny",
                                  "monarch_tiny", "routing_tiny", "mamba_tiny", "mamba2_tiny",
                                  "hydra_tiny"])
def test_param_dtype_reaches_every_parameter_of_every_family(name):
    """model.param_dtype=bfloat16 gives bfloat16 parameters everywhere but the recurrences'
    own (the Mamba mixers once stayed float32 whatever the config said)."""
    from jaxsparse import configs
    from jaxsparse.config import apply_overrides

    cfg = apply_overrides(configs.get(name), ["model.param_dtype=bfloat16",
                                              "model.dtype=bfloat16"])
    model = nnx.eval_shape(lambda: models.build(cfg.model, nnx.Rngs(0)))
    seen = set()
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        expected = jnp.float32 if path[-1] in FLOAT32_ALWAYS else jnp.bfloat16
        assert var.get_value().dtype == expected, (name, path)
        seen.add(var.get_value().dtype)
    assert jnp.dtype(jnp.bfloat16) in seen


def test_tied_embeddings_have_no_separate_head():
    m = models.build(tiny_config("model.tie_embeddings=true").model, nnx.Rngs(2))
    assert not hasattr(m, "lm_head")
    assert nnx.jit(lambda m, x: m(x))(m, tokens(6)).shape == (2, 24, 256)  # one compile


def test_bad_tokens_are_refused(model):
    with pytest.raises(ValueError, match="integer"):
        model(jnp.zeros((2, 3), jnp.float32))
    # out of range, the embedding gather would return NaN rows (checked where values are known)
    with pytest.raises(ValueError, match=r"tokens range over \[0, 256\]; the vocabulary is \[0, 256\)"):
        model(jnp.array([[0, 256]], jnp.int32))


def test_zero_sizes_and_wrong_widths_are_named():
    from jaxsparse.nn import RMSNorm, SwiGLU

    with pytest.raises(ValueError, match=r"Linear\(16,\) -> \(0,\): every size must be >= 1"):
        SwiGLU(16, 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"RMSNorm\(16,\): input of shape \(2, 15\)"):
        RMSNorm(16)(jnp.ones((2, 15)))



def test_rms_norm_per_group_normalises_each_slice_on_its_own():
    """``groups``: each equal slice of the last axis has its own statistics (Mamba-2's gated
    norm), the scale stays per channel; one group is the plain norm."""
    from jaxsparse.ops.normalization import rms_norm

    x = jax.random.normal(jax.random.key(0), (3, 5, 12)) * jnp.array([1.0, 10.0, 0.1]).repeat(4)[None, None]
    scale = jax.random.uniform(jax.random.key(1), (12,), minval=0.5, maxval=1.5)
    slices = [rms_norm(x[..., 4 * g:4 * g + 4], scale[4 * g:4 * g + 4], 1e-5) for g in range(3)]
    np.testing.assert_allclose(rms_norm(x, scale, 1e-5, groups=3), jnp.concatenate(slices, -1),
                               rtol=1e-6, atol=1e-6)
    mean_square = jnp.mean(x ** 2, axis=-1, keepdims=True)
    np.testing.assert_allclose(rms_norm(x, scale), x / jnp.sqrt(mean_square + 1e-6) * scale[None, None],
                               rtol=1e-5, atol=1e-6)


def test_layer_options_and_inputs_that_cannot_work_are_named():
    """Refused when the layer is built (options) or called (inputs), never a NaN or a
    truncated integer result."""
    from jaxsparse.nn import Attention, Linear, RMSNorm
    from jaxsparse.ops.normalization import rms_norm
    from jaxsparse.ops.rotary import apply_rotary

    with pytest.raises(ValueError, match=r"eps=-1.0: must be a finite number > 0"):
        RMSNorm(4, eps=-1.0)  # a negative eps can take the root of a negative number
    with pytest.raises(ValueError, match=r"eps=0: must be a finite number > 0"):
        rms_norm(jnp.zeros((1, 4)), jnp.ones(4), eps=0)  # an all-zero row was 0/0 = NaN
    with pytest.raises(ValueError, match="x has dtype int32; RMSNorm needs floating-point"):
        rms_norm(jnp.arange(8).reshape(2, 4), jnp.ones(4))
    with pytest.raises(ValueError, match=r"scale of shape \(3,\): must be \[4\]"):
        rms_norm(jnp.ones((2, 4)), jnp.ones(3))
    with pytest.raises(ValueError, match="groups=3 must divide x's last dimension 4"):
        rms_norm(jnp.ones((2, 4)), jnp.ones(4), groups=3)
    with pytest.raises(ValueError, match="groups=0: must be an integer >= 1"):
        rms_norm(jnp.ones((2, 4)), jnp.ones(4), groups=0)
    x, positions = jnp.ones((1, 3, 2, 4)), jnp.arange(3)[None]
    with pytest.raises(ValueError, match="x has dtype int32; rotary embeddings need floating"):
        apply_rotary(x.astype(jnp.int32), positions)
    with pytest.raises(ValueError, match=r"theta=0: must be a finite number > 0"):
        apply_rotary(x, positions, theta=0)
    with pytest.raises(ValueError, match=r"x of shape \(3, 2, 4\): expected \[batch, length"):
        apply_rotary(x[0], positions)
    # a jax scalar is a number too, and a traced one (a learnt base or eps) cannot be checked
    np.testing.assert_array_equal(apply_rotary(x, positions, jnp.float32(500.0)),
                                  jax.jit(lambda t: apply_rotary(x, positions, t))(500.0))
    assert np.isfinite(jax.grad(lambda e: rms_norm(x, jnp.ones(4), e).sum())(1e-6))
    build = dict(rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"rope_theta=0.0: must be a finite number > 0"):
        Attention(8, 2, 2, 4, rope_theta=0.0, **build)
    with pytest.raises(ValueError, match="implementation='flash' is not available"):
        Attention(8, 2, 2, 4, implementation="flash", **build)
    with pytest.raises(ValueError, match=r"in_shape=4.0: expected an int or a sequence of ints"):
        Linear(4.0, 4, logical_axes=("embed", "mlp"), **build)
    assert Linear(np.int64(4), (2, 3), logical_axes=("embed", "heads", "kv"),
                  **build).in_shape == (4,)


def test_init_cache_refuses_sizes_and_dtypes_that_cannot_work(model):
    """Checked once for every architecture: a negative or float size failed deep inside JAX,
    batch 0 at the first decode step (numpy's "zero-size array to reduction"), and an integer
    or bool cache silently truncated keys and values."""
    for args, message in [((2, -4), "max_len=-4: must be an integer >= 1"),
                          ((2, 0), "max_len=0"), ((2, 2.5), "max_len=2.5"),
                          ((-1, 8), "batch=-1: must be an integer >= 1"), ((0, 8), "batch=0"),
                          ((True, 8), "batch=True"),
                          ((2, 8, jnp.int32), "dtype='int32': a decode cache must have a "
                                              r"floating-point dtype \(e.g. float32, bfloat16\)"),
                          ((2, 8, jnp.bool_), "dtype='bool'")]:
        with pytest.raises(ValueError, match=message):
            model.init_cache(*args)
    assert model.init_cache(np.int64(2), 8, jnp.bfloat16)["index"].shape == ()


def test_generate_names_an_empty_batch_a_bad_rng_and_takes_array_temperatures(model):
    prompt = tokens(7, batch=1, length=5)
    with pytest.raises(ValueError, match=r"prompt must be a non-empty \[batch, length\] array "
                                         r"\(each >= 1\), got \(0, 5\)"):
        generate(model, jnp.zeros((0, 5), jnp.int32), 3)
    with pytest.raises(ValueError, match=r"rng=0: expected one PRNG key, e.g. jax.random.key"):
        generate(model, prompt, 3, rng=0)
    with pytest.raises(ValueError, match=r"temperature=Array\(nan, dtype=float32\): must be a "
                                         r"finite number >= 0"):
        generate(model, prompt, 3, temperature=jnp.float32(float("nan")))
    rng = jax.random.key(3)
    expected = generate(model, prompt, 3, temperature=0.5, rng=rng)
    for temperature in (jnp.float32(0.5), np.float32(0.5)):  # a JAX array was refused
        np.testing.assert_array_equal(
            generate(model, prompt, 3, temperature=temperature, rng=rng), expected)
    assert generate(model, prompt, 3, rng=jax.random.PRNGKey(3)).shape == (1, 3)  # raw keys too


def test_generate_draws_only_ids_below_the_vocab_limit():
    """A byte-level model with its vocabulary padded past 256 (the 1B-scale configs use 32000)
    printed its samples with ids >= 256 wrapped modulo 256, bytes it never sampled; the text
    sampler (``sample_bytes``) now asks for byte ids only."""
    padded = models.build(tiny_config("model.vocab_size=512").model, nnx.Rngs(0))
    prompt, rng = tokens(8, length=5), jax.random.key(1)
    assert int(generate(padded, prompt, 32, rng=rng).max()) >= 256  # untrained: near uniform
    assert int(generate(padded, prompt, 32, rng=rng, vocab_limit=256).max()) < 256
    with pytest.raises(ValueError, match=r"vocab_limit=600: must be None or an int in \[1, "
                                         r"vocab_size=512\]"):
        generate(padded, prompt, 3, vocab_limit=600)


@pytest.mark.parametrize("preset", ["transformer_tiny", "hydra_tiny"])
def test_a_decode_chunk_longer_than_the_cache_is_named_under_jit(preset):
    """Eagerly the index check named it; under jit (a traced index) the write failed inside
    XLA's dynamic_update_slice. More new tokens than slots is known from the shapes."""
    from jaxsparse import configs
    model = models.build(configs.get(preset).model, nnx.Rngs(0))
    model.eval()
    cache = model.init_cache(2, 8)
    with pytest.raises(ValueError, match=r"12 new tokens need index \+ 12 <= 8, the cache's "
                                         r"slots: more than the cache holds"):
        nnx.jit(lambda m, x, c: m.decode(x, c))(model, jnp.zeros((2, 12), jnp.int32), cache)


def test_sampling_text_refuses_a_prompt_as_long_as_the_model_by_its_length():
    """The continuation's cut made max_new_tokens 0 or negative, and generate named that."""
    from jaxsparse.parallel import make_mesh
    from jaxsparse.train.loop import sample_bytes
    from jaxsparse.train.state import TrainSetup
    cfg = tiny_config("model.max_seq_len=32", "data.seq_len=16")
    setup = TrainSetup(cfg, make_mesh(cfg.mesh))
    state = setup.init()
    for prompt in ("x" * 32, "x" * 40, ""):
        with pytest.raises(ValueError, match=rf"the prompt is {len(prompt)} bytes: sampling "
                                             r"needs 1 to model.max_seq_len - 1 = 31"):
            sample_bytes(setup, state, cfg, prompt=prompt, max_new_tokens=4)
    assert len(sample_bytes(setup, state, cfg, prompt="x" * 30, max_new_tokens=4)) == 32


def test_layer_sizes_and_scales_are_checked_when_built():
    """Floats and bools as sizes failed deep inside JAX or built a layer of size 1; a negative
    init scale gave "math domain error", a NaN one NaN weights; an unknown implementation
    failed only at the first call."""
    from jaxsparse.nn import Embed, Linear, Mamba, MonarchLinear, RMSNorm

    build = dict(rngs=nnx.Rngs(0))
    for make, message in [
            (lambda: RMSNorm(2.5), "dim=2.5: must be an integer >= 1"),
            (lambda: RMSNorm(True), "dim=True: must be an integer >= 1"),
            (lambda: Embed(2.5, 4, **build), "vocab_size=2.5: must be an integer >= 1"),
            (lambda: Embed(True, 4, **build), "vocab_size=True"),
            (lambda: Embed(4, 4, init_std=float("nan"), **build), "init_std=nan: must be a "
                                                                  "finite number >= 0"),
            (lambda: Linear(4, 4, logical_axes=("a", "b"), init_scale=-1.0, **build),
             "init_scale=-1.0: must be a finite number >= 0"),
            (lambda: Linear(4, 4, logical_axes=("a", "b"), init_scale=float("nan"), **build),
             "init_scale=nan"),
            (lambda: MonarchLinear(2.5, 16, **build), "in_shape=2.5: expected an int or a "
                                                      "sequence of ints"),
            (lambda: MonarchLinear(16, 16, init_scale=float("nan"), **build), "init_scale=nan"),
            (lambda: Mamba(16, implementation="bogus", **build), "implementation='bogus': "
                                                                 "allowed")]:
        with pytest.raises(ValueError, match=message):
            make()


def test_count_params_without_allocation():
    cfg = tiny_config().model
    built = models.build(cfg, nnx.Rngs(0))
    expected = sum(x.size for x in jax.tree.leaves(nnx.state(built, nnx.Param)))
    assert models.count_params(cfg) == expected


SPARSE_SPECS = ["heads:local:4;local:8;causal;longformer:3,2", "bigbird:4,3,1,1,7", "strided:5",
                "chunked:6", "fixed:8,2", "heads:local:4;local:8;chunked:6;local:1"]
# masks that read at most this many recent positions decode from a ring buffer of that size
WINDOW_CACHE_SLOTS = {"chunked:6": 6, "heads:local:4;local:8;chunked:6;local:1": 8}


@pytest.mark.parametrize("spec", SPARSE_SPECS)
def test_sparse_masks_stay_causal_and_decode_matches_forward(spec):
    """Decoding a prompt of 11 tokens, then 3, then one at a time equals the full pass; with
    a bounded mask (a window, chunks) from a ring buffer of that many slots, which the
    prompt overruns and the later tokens wrap around."""
    cfg = tiny_config(f"model.attention_mask={spec}").model
    m = models.build(cfg, nnx.Rngs(3))
    a = tokens(7, length=24)
    b = a.at[:, 13:].set((a[:, 13:] + 5) % 256)
    forward = nnx.jit(lambda m, x: m(x))
    decode = nnx.jit(lambda m, x, c: m.decode(x, c))  # op by op: ~10 s per mask
    np.testing.assert_allclose(forward(m, a)[:, :13], forward(m, b)[:, :13], atol=1e-5)
    full = forward(m, a)
    cache = m.init_cache(2, 40)  # a longer cache than the sequence: patterns must not shift
    slots = {leaf.shape[2] for leaf in jax.tree.leaves(cache) if leaf.ndim == 4}
    assert slots == {WINDOW_CACHE_SLOTS.get(spec, 40)}
    first, cache = decode(m, a[:, :11], cache)
    second, cache = decode(m, a[:, 11:14], cache)
    rest = []
    for t in range(14, 24):
        logits, cache = decode(m, a[:, t:t + 1], cache)
        rest.append(logits)
    np.testing.assert_allclose(jnp.concatenate([first, second] + rest, axis=1), full, atol=1e-4,
                               rtol=1e-4)


@pytest.mark.parametrize("overrides", [[], ["model.n_kv_heads=1"],
                                       ["model.attention_mask=local:5"]])
def test_one_sequence_decodes_from_caches_without_size_one_axes(overrides):
    """At batch 1 the layers keep their caches without the size-1 batch axis — XLA:CPU copied
    such a cache several times a step (nn.cache_layout) — but with one key/value head, and
    decoding still equals the full pass, from a full cache and from a ring buffer."""
    m = models.build(tiny_config(*overrides).model, nnx.Rngs(4))
    x = tokens(9, batch=1, length=17)
    full = nnx.jit(lambda m, x: m(x))(m, x)
    cache = m.init_cache(1, 24)
    kv_heads = m.cfg.n_kv_heads
    slots = 5 if "local" in str(overrides) else 24
    # head_dim 32 / 4 heads; with one kv head the cache stays 4-d (it decoded faster so)
    expected = (kv_heads, slots, 8) if kv_heads > 1 else (1, 1, slots, 8)
    assert {leaf.shape for leaf in jax.tree.leaves(cache["layers"])} == {expected}
    decode = nnx.jit(lambda m, x, c: m.decode(x, c))
    parts = []
    for start, stop in [(0, 7), (7, 8), (8, 9), (9, 17)]:
        logits, cache = decode(m, x[:, start:stop], cache)
        parts.append(logits)
    np.testing.assert_allclose(jnp.concatenate(parts, axis=1), full, atol=1e-4, rtol=1e-4)
    assert {leaf.shape for leaf in jax.tree.leaves(cache["layers"])} == {expected}


def test_sparse_mask_changes_the_model():
    dense = models.build(tiny_config().model, nnx.Rngs(3))
    sparse = models.build(tiny_config("model.attention_mask=local:2").model, nnx.Rngs(3))
    x = tokens(8, length=24)
    forward = nnx.jit(lambda m, x: m(x))  # one compile per model instead of op-by-op dispatch
    np.testing.assert_allclose(forward(dense, x)[:, :2], forward(sparse, x)[:, :2],
                               atol=1e-5)  # window covers all
    assert not np.allclose(forward(dense, x)[:, 5:], forward(sparse, x)[:, 5:], atol=1e-3)


@pytest.mark.parametrize("spec, fragment", [
    ("nope", "unknown mask spec 'nope'"),
    ("heads:causal*3", "gives 3 heads; the model has 4"),
    ("local:0", "the window must be >= 1"),
])
def test_bad_mask_specs_name_the_config_key(spec, fragment):
    from jaxsparse.config import ConfigError

    import re

    with pytest.raises(ConfigError, match=re.escape(f"model.attention_mask={spec!r}") + ".*" + re.escape(fragment)):
        models.build(tiny_config(f"model.attention_mask={spec}").model, nnx.Rngs(0))
