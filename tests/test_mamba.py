"""Mamba-1 / Mamba-2 blocks and LMs: the short convolution's hand-written backward,
initialisation, causality, cached decoding, training."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsparse import models
from jaxsparse.models.generate import generate
from jaxsparse.ops.conv import causal_depthwise_conv1d, window_sum, window_sum_reference
from jaxsparse.train.state import decay_mask

from helpers import tiny_config

SSM = {"mamba": ["model.name=mamba", "model.d_state=8"],
       "mamba2": ["model.name=mamba2", "model.d_state=8", "model.ssm_head_dim=16",
                  "model.ssm_chunk=8"]}


def build(kind, *extra):
    return models.build(tiny_config(*SSM[kind], *extra).model, nnx.Rngs(0))


def tokens(seed, length=21):
    return jax.random.randint(jax.random.key(seed), (2, length), 0, 256, jnp.int32)


@pytest.mark.parametrize("width,length,dtype", [(4, 37, jnp.float32), (1, 5, jnp.float32),
                                                (3, 2, jnp.float32), (4, 19, jnp.bfloat16)])
def test_conv_window_sum_backward_equals_autodiff_of_the_plain_sum(width, length, dtype):
    """Odd lengths, width 1, a sequence shorter than the window, bfloat16; the gradient reaches
    the carried-over state too."""
    ks = jax.random.split(jax.random.key(width * 100 + length), 4)
    full = jax.random.normal(ks[0], (3, length + width - 1, 5)).astype(dtype)
    w = jax.random.normal(ks[1], (width, 5)).astype(dtype)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(window_sum(full, w), np.float32),
                               np.asarray(window_sum_reference(full, w), np.float32), atol=tol)
    loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b).astype(jnp.float32)))  # noqa: E731
    got = jax.jit(jax.grad(loss(window_sum), argnums=(0, 1)))(full, w)
    want = jax.jit(jax.grad(loss(window_sum_reference), argnums=(0, 1)))(full, w)
    for g, r in zip(got, want):
        assert g.dtype == r.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                                   atol=tol * width * 3, rtol=tol)
    x, state = full[:, width - 1:], full[:, :width - 1]
    d_state = jax.jit(jax.grad(lambda s: jnp.sum(jnp.sin(causal_depthwise_conv1d(
        x, w, None, s)[0].astype(jnp.float32)))))(state)
    np.testing.assert_allclose(np.asarray(d_state, np.float32),
                               np.asarray(want[0][:, :width - 1], np.float32), atol=tol * 3)


def test_mamba1_initialisation_follows_the_paper():
    mixer = build("mamba").blocks[0].mixer
    np.testing.assert_allclose(jnp.exp(mixer.A_log[...])[0], np.arange(1, 9), rtol=1e-6)  # S4D-real
    np.testing.assert_array_equal(mixer.D[...], 1.0)
    dt = jax.nn.softplus(mixer.dt_bias[...])
    assert float(dt.min()) >= 1e-3 * 0.999 and float(dt.max()) <= 0.1 * 1.001
    assert mixer.dt_rank == 2  # ceil(32 / 16)


def test_mamba2_initialisation_follows_the_paper():
    mixer = build("mamba2").blocks[0].mixer
    minus_a = jnp.exp(mixer.A_log[...])
    assert mixer.heads == 4 and float(minus_a.min()) >= 1.0 and float(minus_a.max()) <= 16.0
    np.testing.assert_array_equal(mixer.D[...], 1.0)


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_no_weight_decay_on_a_log_d_and_dt_bias(kind):
    model = build(kind)
    mask = decay_mask(nnx.state(model, nnx.Param))
    mixer = mask["blocks"][0]["mixer"]
    assert not mixer["A_log"] and not mixer["D"] and not mixer["dt_bias"]
    assert mixer["in_proj"]["kernel"] and mixer["out_proj"]["kernel"]


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_causal_and_cached_decoding_equals_the_forward_pass(kind):
    model = build(kind)
    forward = nnx.jit(lambda m, x: m(x))  # one compile per shape instead of op-by-op dispatch
    decode = nnx.jit(lambda m, x, cache: m.decode(x, cache))
    a = tokens(1)
    b = a.at[:, 12:].set((a[:, 12:] + 9) % 256)
    full = forward(model, a)
    np.testing.assert_allclose(full[:, :12], forward(model, b)[:, :12], atol=1e-5)
    cache = model.init_cache(2, 64)
    first, cache = decode(model, a[:, :10], cache)  # prefill through the chunked path
    steps = []
    for t in range(10, 21):
        logits, cache = decode(model, a[:, t:t + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate([first] + steps, 1), full, atol=1e-4, rtol=1e-4)
    if kind != "mamba":
        return  # generation over a recurrent cache is the same code for both; check it once
    greedy = generate(model, a[:, :4], 6, temperature=0.0)
    seq = jnp.zeros((2, 10), jnp.int32).at[:, :4].set(a[:, :4])
    for t in range(4, 10):  # causal model: logits at t-1 of the padded sequence see only seq[:t]
        seq = seq.at[:, t].set(jnp.argmax(forward(model, seq)[:, t - 1], -1).astype(jnp.int32))
    np.testing.assert_array_equal(greedy, seq[:, 4:])


def test_mamba2_block_equals_its_definition_with_a_norm_per_group():
    """Mamba-2 (Dao & Gu 2024; state-spaces/mamba's Mamba2) written out: in-projection to
    (z, xBC, dt); causal convolution + SiLU over xBC; SSD with a scalar A per head (its naive
    recurrence here); ``y * silu(z)`` RMS-normalised per group of heads (``group_size =
    d_inner / ngroups``, eps 1e-5: it was normalised over all of d_inner); out-projection."""
    from jaxsparse.nn import Mamba2
    from jaxsparse.ops.ssm import ssd_reference

    mixer = Mamba2(16, d_state=4, head_dim=8, groups=2, rngs=nnx.Rngs(0))  # 4 heads of 8
    mixer.norm_scale[...] = jax.random.uniform(jax.random.key(2), (32,), minval=0.5, maxval=1.5)
    x = jax.random.normal(jax.random.key(1), (2, 11, 16))

    def definition(m, x):
        z, xbc, dt = jnp.split(m.in_proj(x), [32, 32 + 48], axis=-1)
        padded = jnp.pad(xbc, ((0, 0), (3, 0), (0, 0)))
        conv = sum(m.conv_w[...][j][None, None] * padded[:, j:j + 11] for j in range(4))
        conv = conv + m.conv_b[...][None, None]
        xs, B, C = jnp.split(jax.nn.silu(conv), [32, 40], axis=-1)
        y = ssd_reference(xs.reshape(2, 11, 4, 8), dt, -jnp.exp(m.A_log[...]),
                          B.reshape(2, 11, 2, 4), C.reshape(2, 11, 2, 4), D=m.D[...],
                          dt_bias=m.dt_bias[...], dt_softplus=True).reshape(2, 11, 32)
        gated = (y * jax.nn.silu(z)).reshape(2, 11, 2, 16)  # two groups of two heads
        normed = gated / jnp.sqrt(jnp.mean(gated ** 2, axis=-1, keepdims=True) + 1e-5)
        return m.out_proj(normed.reshape(2, 11, 32) * m.norm_scale[...][None, None])

    got, _ = nnx.jit(lambda m, x: m(x))(mixer, x)
    np.testing.assert_allclose(got, nnx.jit(definition)(mixer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_a_scan_can_carry_the_decode_cache(kind):
    """A bfloat16 block returned its convolution state in bfloat16 from a float32 cache (the
    default of ``init_cache``), so a ``lax.scan`` decoding loop failed: carry types differ."""
    mixer = build(kind, "model.dtype=bfloat16").blocks[0].mixer
    x = jax.random.normal(jax.random.key(0), (2, 5, 32))

    def step(cache, x_t):
        y, cache = mixer(x_t[:, None], cache=cache)
        return cache, y[:, 0]

    cache = mixer.init_cache(2, 8)
    final, ys = jax.jit(lambda c, x: jax.lax.scan(step, c, x.swapaxes(0, 1)))(cache, x)
    assert jax.tree.map(lambda a: a.dtype, final) == jax.tree.map(lambda a: a.dtype, cache)
    full, _ = mixer(x)
    np.testing.assert_allclose(ys.swapaxes(0, 1).astype(jnp.float32), full.astype(jnp.float32),
                               atol=3e-2 * float(jnp.max(jnp.abs(full.astype(jnp.float32)))))


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_bfloat16_compute_and_parameters_reach_the_mixers(kind):
    """``model.dtype``/``model.param_dtype`` = bfloat16: the projections, the convolution and
    the norms hold bfloat16 weights and the mixer computes in bfloat16 (both were float32 whatever
    the config said); A_log, D and the dt bias stay float32 (an lr-sized step would round away in
    bfloat16). Logits match a float32 model holding the same rounded weights within bfloat16
    error, and cached decoding still equals the forward pass."""
    model = build(kind, "model.dtype=bfloat16", "model.param_dtype=bfloat16")
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        recurrence = path[-1] in ("A_log", "D", "dt_bias")
        assert var[...].dtype == (jnp.float32 if recurrence else jnp.bfloat16), path
    forward = nnx.jit(lambda m, x: m(x))  # op by op these passes and steps took 7 s
    decode = nnx.jit(lambda m, x, cache: m.decode(x, cache))
    mixed, _ = forward(model.blocks[0].mixer, jax.random.normal(jax.random.key(0), (2, 9, 32)))
    assert mixed.dtype == jnp.bfloat16  # the float32 residual stream is cast at the projection

    reference = build(kind)  # float32 everywhere, given the bfloat16 model's weights
    nnx.update(reference, jax.tree.map(lambda a: a.astype(jnp.float32),
                                       nnx.state(model, nnx.Param)))
    a = tokens(3)
    out, want = forward(model, a), forward(reference, a)
    np.testing.assert_allclose(out, want, atol=2e-2 * float(jnp.max(jnp.abs(want))))
    cache = model.init_cache(2, 32)
    first, cache = decode(model, a[:, :10], cache)
    steps = [first]
    for t in range(10, a.shape[1]):
        logits, cache = decode(model, a[:, t:t + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), out,
                               atol=2e-2 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize("impl", ["associative", "chunked"])
def test_mamba1_scan_implementations_give_the_same_model(impl):
    forward = nnx.jit(lambda m, x: m(x))  # op by op a forward pass took ~1 s
    ref = forward(build("mamba"), tokens(2))
    out = forward(build("mamba", f"model.ssm_impl={impl}", "model.ssm_chunk=5"), tokens(2))
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


def test_mamba_configs_train(tmp_path):
    from jaxsparse import configs
    from jaxsparse.config import apply_overrides
    from jaxsparse.train import train
    from helpers import TINY

    from jaxsparse.train.metrics import read_metrics

    tiny = [o for o in TINY if not o.startswith("model.d_ff=")]  # no MLP in these models
    for name, sizes in (("mamba_tiny", []), ("mamba2_tiny", ["model.ssm_head_dim=16"])):
        cfg = apply_overrides(configs.get(name), tiny + sizes + [
            "train.steps=20", "model.d_state=8", "model.ssm_chunk=8", "optimizer.lr=1e-2"])
        result = train(cfg, tmp_path / name, quiet=True)
        evals = [r["loss"] for r in read_metrics(tmp_path / name) if r["split"] == "eval"]
        assert evals[-1] < evals[0] - 0.3, (name, evals)  # held-out loss at step 0 vs 20
        assert result.sample is not None


def test_bad_ssm_config_is_named():
    from jaxsparse.config import ConfigError

    with pytest.raises(ConfigError, match="ssm_head_dim=48"):
        build("mamba2", "model.ssm_head_dim=48")
    with pytest.raises(ConfigError, match="model.ssm_impl='fast'"):
        build("mamba", "model.ssm_impl=fast")


def test_bad_block_sizes_and_input_widths_are_named():
    from jaxsparse.nn import Attention, Mamba, Mamba2

    with pytest.raises(ValueError, match="d_state=0: each must be an integer >= 1"):
        Mamba(16, d_state=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="groups=0"):
        Mamba2(16, head_dim=8, groups=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="n_heads=3, n_kv_heads=2"):
        Attention(16, 3, 2, 8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"input of shape \(1, 8, 15\) must end in .*\(16,\)"):
        Mamba(16, rngs=nnx.Rngs(0))(jnp.zeros((1, 8, 15)))
    for block in (Mamba(16, rngs=nnx.Rngs(0)), Mamba2(16, head_dim=8, rngs=nnx.Rngs(0))):
        with pytest.raises(ValueError,
                           match=r"x must be \[batch, length, d_model\]; got \(8, 16\)"):
            block(jnp.zeros((8, 16)))


def test_bad_convolution_inputs_are_named():
    x, w = jnp.ones((1, 6, 8)), jnp.ones((4, 8))
    with pytest.raises(ValueError, match=r"x must be \[batch, length, channels\]; got \(6, 8\)"):
        causal_depthwise_conv1d(x[0], w)
    with pytest.raises(ValueError, match=r"w must be \[width >= 1, channels=8\], got \(0, 8\)"):
        causal_depthwise_conv1d(x, w[:0])
    with pytest.raises(ValueError, match=r"b must be \[channels=8\], got \(7,\)"):
        causal_depthwise_conv1d(x, w, jnp.ones(7))


def test_integer_convolution_input_is_refused():
    # the float weights were cast to x's integer dtype: 0.5 became 0, every output 0
    with pytest.raises(ValueError, match="x has dtype int32; the convolution needs "
                                         "floating-point inputs"):
        causal_depthwise_conv1d(jnp.ones((1, 3, 1), jnp.int32), jnp.full((2, 1), 0.5))
    y, _ = causal_depthwise_conv1d(jnp.ones((1, 3, 1)), jnp.full((2, 1), 0.5))
    np.testing.assert_allclose(y[0, :, 0], [0.5, 1.0, 1.0])


def test_the_mamba2_output_gate_is_formed_in_float32_under_bfloat16():
    """state-spaces/mamba's RMSNormGated multiplies y by silu(z) in float32 before the norm's
    statistics (as the Mamba-1 mixer here gates): formed in bfloat16, the product was rounded
    first (0.43% off float32 against 0.29%). The gate is the mixer's only float32 sigmoid;
    the convolution's SiLU stays in the compute dtype."""
    mixer = build("mamba2", "model.dtype=bfloat16").blocks[0].mixer
    x = jax.random.normal(jax.random.key(0), (2, 9, 32))
    jaxpr = jax.make_jaxpr(lambda x: mixer(x)[0])(x)

    def sigmoid_dtypes(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "logistic":
                yield eqn.invars[0].aval.dtype
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from sigmoid_dtypes(sub)

    dtypes = list(sigmoid_dtypes(jaxpr.jaxpr))
    assert jnp.float32 in dtypes and jnp.bfloat16 in dtypes, dtypes
