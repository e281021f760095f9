"""Mixture of experts: router losses, priority dropping against a brute-force count, the
dropless and capacity paths against a dense all-experts computation (values and gradients),
expert choice, chunk-level routing causality, grouped matmuls, config errors, training."""

import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import tiny_config
from jaxsparse.config import ConfigError, validate
from jaxsparse.nn import MoE
from jaxsparse.ops.moe.grouped import kernel_grouped_matmul
from jaxsparse.nn.intermediates import run_capturing
from jaxsparse.ops.moe import (capacity_dispatch, chunk_pool, dropless_dispatch,
                               expert_capacity, expert_choice_capacity, expert_choice_dispatch,
                               expert_choice_routing, grouped_matmul, linear_k_schedule,
                               load_balancing_loss, pack, router_z_loss, slot_positions,
                               swiglu_experts, top_k_routing, unchunk, unpack)


def test_load_balancing_loss_is_one_at_perfect_balance_and_larger_otherwise():
    E, T, k = 4, 16, 2
    probs = jnp.full((T, E), 1.0 / E)
    balanced = jnp.stack([jnp.arange(T) % E, (jnp.arange(T) + 1) % E], axis=1)
    np.testing.assert_allclose(load_balancing_loss(probs, balanced), 1.0, rtol=1e-6)
    skewed_probs = jnp.tile(jnp.array([[0.7, 0.1, 0.1, 0.1]]), (T, 1))
    skewed = jnp.stack([jnp.zeros(T, jnp.int32), jnp.ones(T, jnp.int32)], axis=1)
    assert float(load_balancing_loss(skewed_probs, skewed)) > 1.5
    logits = jnp.array([[0.0, 0.0], [3.0, -3.0]])
    np.testing.assert_allclose(router_z_loss(logits), np.mean(np.log([2.0, np.exp(3) + np.exp(-3)]) ** 2),
                               rtol=1e-6)


def test_priority_dropping_matches_a_brute_force_count():
    rng = np.random.default_rng(0)
    T, E, k, capacity = 40, 4, 2, 9
    logits = jnp.asarray(rng.normal(size=(T, E)) + np.array([2.0, 0, 0, -1]))  # expert 0 popular
    choice = top_k_routing(logits, k)
    position = np.asarray(slot_positions(choice, E))
    index = np.asarray(choice.expert_index)
    fill, expected = np.zeros(E, int), np.zeros((T, k), int)
    for j in range(k):  # all first choices, then all second choices, each in token order
        for t in range(T):
            expected[t, j] = fill[index[t, j]]
            fill[index[t, j]] += 1
    np.testing.assert_array_equal(position, expected)
    dropped_brute = int((expected >= capacity).sum())
    assert dropped_brute > 0  # the test exercises dropping
    moe = MoE(8, 16, E, k, rngs=nnx.Rngs(0), capacity_factor=capacity * E / (T * k))
    assert expert_capacity(T, E, k, moe.capacity_factor) == capacity
    moe.router.kernel[...] = jnp.zeros_like(moe.router.kernel[...])
    # route with the fixed logits above through the layer's capacity path
    from jaxsparse.ops.moe import capacity_dispatch
    _, dropped = capacity_dispatch(jnp.ones((T, 8)), choice, moe._buffered_experts, capacity)
    np.testing.assert_allclose(float(dropped), dropped_brute / (T * k), rtol=1e-6)


def _every_expert(moe, x_TD):
    """``[T, E, D]``: every expert's SwiGLU on every token."""
    gate, up, down = moe._weights()
    hidden = jax.nn.silu(jnp.einsum("td,edh->teh", x_TD, gate)) * jnp.einsum("td,edh->teh", x_TD, up)
    return jnp.einsum("teh,ehd->ted", hidden, down)


def _dense_all_experts(moe, x_BLD):
    """Every expert on every token, combined with the routing weights (zero where unrouted)."""
    x = x_BLD.reshape(-1, x_BLD.shape[-1])
    choice = top_k_routing(moe.router(x.astype(jnp.float32)), moe.k)
    every = _every_expert(moe, x)
    combine = jnp.zeros(every.shape[:2]).at[jnp.arange(x.shape[0])[:, None], choice.expert_index].add(
        choice.weights)
    return jnp.einsum("te,ted->td", combine, every).reshape(x_BLD.shape)


@pytest.mark.parametrize("path", [dict(capacity_factor=None, grouped_impl="tiles"),
                                  dict(capacity_factor=None, grouped_impl="ragged_dot"),
                                  dict(capacity_factor=100.0)],
                         ids=["dropless-tiles", "dropless-ragged", "capacity-no-drops"])
def test_expert_paths_equal_the_dense_all_experts_computation(path):
    moe = MoE(16, 24, 6, 2, rngs=nnx.Rngs(1), **path)
    x = jax.random.normal(jax.random.key(2), (3, 11, 16))
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

    def run(params, x, fn):
        m = nnx.merge(graphdef, params, rest)
        m.eval()
        return jnp.sum(jnp.sin(fn(m, x)))

    def value_and_grads(fn):  # compiled: op by op the dispatch path took ~30 s
        return jax.jit(lambda p, x: jax.value_and_grad(run, argnums=(0, 1))(p, x, fn))(params, x)

    out = moe.__class__.__call__
    value, grads = value_and_grads(lambda m, x: out(m, x))
    ref, ref_grads = value_and_grads(_dense_all_experts)
    np.testing.assert_allclose(value, ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)


def test_expert_choice_gives_each_expert_exactly_c_distinct_tokens():
    logits = jax.random.normal(jax.random.key(0), (50, 5))
    choice = expert_choice_routing(logits, 7)
    assert choice.token_index.shape == (5, 7)
    for row in np.asarray(choice.token_index):
        assert len(set(row.tolist())) == 7
    moe = MoE(8, 16, 4, 2, rngs=nnx.Rngs(0), router="expert_choice", causal=False)
    assert moe(jnp.ones((2, 6, 8))).shape == (2, 6, 8)


def _dense_expert_choice(moe, x_BLD):
    """Expert choice by brute force: expert ``e`` takes the ``C`` tokens of highest probability
    for it (a sort, not top_k), every expert runs on every token, and a token's output is the
    probability-weighted sum over the experts that took it."""
    x = x_BLD.reshape(-1, x_BLD.shape[-1])
    tokens = x.shape[0]
    probs = jax.nn.softmax(moe.router(x.astype(jnp.float32)), axis=-1)  # [T, E]
    capacity = math.ceil(moe.k * tokens / moe.num_experts)
    taken = jnp.argsort(-jax.lax.stop_gradient(probs), axis=0)[:capacity]  # [C, E]
    combine = jnp.zeros_like(probs).at[taken, jnp.arange(moe.num_experts)].set(
        probs[taken, jnp.arange(moe.num_experts)])
    return jnp.einsum("te,ted->td", combine, _every_expert(moe, x)).reshape(x_BLD.shape)


def test_expert_choice_layer_equals_its_brute_force_definition():
    """The expert-choice path (gather each expert's tokens, run, scatter-add weighted) was only
    checked for shapes: a dispatch that dropped the weights or overwrote instead of adding
    passed. 21 tokens (odd), 4 experts taking 11 each, so most tokens are taken by several;
    values and gradients for every parameter and the input."""
    moe = MoE(16, 24, 4, 2, rngs=nnx.Rngs(1), router="expert_choice", causal=False)
    moe.eval()
    x = jax.random.normal(jax.random.key(2), (3, 7, 16))
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

    def value_and_grads(fn):
        def loss(params, x):
            return jnp.sum(jnp.sin(fn(nnx.merge(graphdef, params, rest), x)) * x)
        return jax.value_and_grad(loss, argnums=(0, 1))(params, x)

    value, grads = value_and_grads(lambda m, x: m(x))
    ref, ref_grads = value_and_grads(_dense_expert_choice)
    np.testing.assert_allclose(value, ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)


def test_chunk_routing_is_causal():
    moe = MoE(8, 16, 4, 1, rngs=nnx.Rngs(3), chunk=4, capacity_factor=None)
    moe.eval()
    x = jax.random.normal(jax.random.key(4), (1, 16, 8))
    forward = nnx.jit(lambda m, x: m(x))  # one compile instead of ~2 s of op-by-op dispatch
    base = forward(moe, x)
    changed = forward(moe, x.at[:, 9:].add(5.0))  # perturb tokens 9.. : outputs 0..8 must not move
    np.testing.assert_allclose(changed[:, :9], base[:, :9], rtol=1e-6, atol=1e-6)
    assert not np.allclose(changed[:, 12:], base[:, 12:])


def test_token_routing_is_causal_dropless_and_not_with_a_capacity():
    """Dropless, a token's output reads no later token. With a capacity, slots go to every
    first choice before any second: a later token's first choice can push out an earlier
    token's second, so outputs before a change move — the trade-off the README and the
    config's CapacityWarning state (Switch, GShard and MaxText's dropping mode share it)."""
    from jaxsparse.config import CapacityWarning, apply_overrides

    with pytest.warns(CapacityWarning, match="training is not strictly causal"):
        validate(apply_overrides(tiny_config(), ["model.moe_experts=4",
                                                 "model.moe_capacity_factor=1.25"]))
    x = jax.random.normal(jax.random.key(4), (1, 32, 8))
    later = x.at[:, 20:].set(jax.random.normal(jax.random.key(5), (1, 12, 8)))
    for capacity_factor, moves in ((None, False), (0.5, True)):
        moe = MoE(8, 16, 4, 2, rngs=nnx.Rngs(3), capacity_factor=capacity_factor)
        moe.eval()
        moved = float(jnp.abs(moe(later)[:, :20] - moe(x)[:, :20]).max())
        assert (moved > 1e-3) == moves, (capacity_factor, moved)


def test_statistics_reach_a_capture_and_are_dropped_outside_one():
    """Training-mode calls report the balance loss and loads to ``nnx.capture`` (what the
    training step uses); called plainly, the layer stores nothing on itself and warns nothing."""
    import warnings

    moe = MoE(8, 16, 4, 2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 6, 8))
    y, sown = run_capturing(moe, "__call__", x)
    assert set(sown) == {"aux_loss", "moe_load", "moe_dropped"}
    assert float(sown["aux_loss"][0]) > 0 and sown["moe_load"][0].shape == (4,)
    np.testing.assert_allclose(float(jnp.sum(sown["moe_load"][0])), 1.0, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(moe(x), y, rtol=1e-6, atol=1e-6)
    assert not jax.tree.leaves(nnx.state(moe, nnx.Intermediate))


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_eval_k_changes_eval_mode_only(capacity_factor):
    """SMoE-Dropout trains with few experts and evaluates with more. ``eval_k`` must not touch
    training — output, balance loss, loads and drops of a training call equal those of the
    layer without it (it once routed every training token to eval_k experts, and sized the
    capacity buffers for them) — and in eval mode the layer is the k=eval_k layer."""
    x = jax.random.normal(jax.random.key(0), (2, 6, 8))
    layer = lambda k, **kw: MoE(8, 16, 4, k, rngs=nnx.Rngs(0),  # noqa: E731 — same weights
                                capacity_factor=capacity_factor, **kw)
    slimmable, trained_k, eval_k = layer(1, eval_k=3), layer(1), layer(3)
    y, sown = run_capturing(slimmable, "__call__", x)
    y_want, sown_want = run_capturing(trained_k, "__call__", x)
    np.testing.assert_allclose(y, y_want, rtol=1e-6, atol=1e-6)
    for name in ("aux_loss", "moe_load", "moe_dropped"):
        np.testing.assert_allclose(sown[name][0], sown_want[name][0], rtol=1e-6, err_msg=name)
    if capacity_factor is not None:  # k=1 at factor 1 drops; with eval_k's buffers it did not
        assert float(sown["moe_dropped"][0]) > 0
    slimmable.eval(), eval_k.eval()
    np.testing.assert_allclose(slimmable(x), eval_k(x), rtol=1e-6, atol=1e-6)
    assert not np.allclose(slimmable(x), y, atol=1e-3)


def test_random_router_is_fixed_and_its_k_grows():
    moe = MoE(8, 16, 8, 2, rngs=nnx.Rngs(0), router="random", k_end=8, k_schedule_steps=10)
    assert not isinstance(moe.router.kernel, nnx.Param)  # not trained
    assert [int(linear_k_schedule(s, k_start=2, k_end=8, steps=10)) for s in (0, 5, 10, 50)] == [2, 5, 8, 8]
    x = jnp.ones((1, 4, 8))
    for _ in range(3):
        moe(x)
    assert int(moe.step[...]) == 3


def test_grouped_matmul_returns_lhs_dtype_on_every_implementation():
    """bfloat16 rows against float32 weights: every implementation gives bfloat16 (ragged_dot
    gave float32, its operands' promoted type)."""
    lhs = jnp.ones((10, 8), jnp.bfloat16)
    rhs = jnp.ones((2, 8, 16), jnp.float32)
    sizes = jnp.array([4, 6], jnp.int32)
    for impl in (None, "dense", "ragged_dot", "tiles", "pallas_interpret"):  # native: f32 only
        out = grouped_matmul(lhs, rhs, sizes, implementation=impl)
        assert out.dtype == jnp.bfloat16, impl
        np.testing.assert_array_equal(out.astype(jnp.float32), 8.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_grouped_matmul_implementations_agree(dtype):
    rng = np.random.default_rng(0)
    m, k, n = 203, 24, 40
    sizes = jnp.array([0, 61, 3, 0, 100, 39], jnp.int32)  # empty groups, sizes not in tiles
    lhs = jnp.asarray(rng.normal(size=(m, k)), dtype)
    rhs = jnp.asarray(rng.normal(size=(6, k, n)), dtype)
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5

    def loss(lhs, rhs, impl):
        if impl == "tpu_interpret":  # the TPU kernel's logic, in interpret mode
            out = kernel_grouped_matmul(lhs, rhs, sizes, backend="tpu", interpret=True)
        else:
            out = grouped_matmul(lhs, rhs, sizes, implementation=impl,
                                 tile=16 if impl == "tiles" else None)
        return jnp.sum(jnp.sin(out.astype(jnp.float32))), out

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True),
                             static_argnums=2)
    (_, ref), ref_g = value_and_grad(lhs, rhs, "dense")
    for impl in ("ragged_dot", "tiles", "pallas_interpret", "tpu_interpret"):
        (_, out), g = value_and_grad(lhs, rhs, impl)
        scale = float(jnp.abs(ref.astype(jnp.float32)).max())
        np.testing.assert_allclose(out.astype(jnp.float32), ref.astype(jnp.float32),
                                   atol=tol * scale, rtol=tol)
        for a, b in zip(g, ref_g):
            s = float(jnp.abs(b.astype(jnp.float32)).max())
            np.testing.assert_allclose(a.astype(jnp.float32), b.astype(jnp.float32),
                                       atol=2 * tol * s, rtol=2 * tol)


def test_grouped_matmul_of_no_rows_is_empty_in_every_implementation():
    from jaxsparse.ops.moe.grouped import GMM_IMPLEMENTATIONS

    lhs, rhs = jnp.ones((0, 16)), jnp.ones((3, 16, 8))
    for impl in GMM_IMPLEMENTATIONS:
        out = grouped_matmul(lhs, rhs, jnp.zeros((3,), jnp.int32), implementation=impl)
        assert out.shape == (0, 8) and out.dtype == jnp.float32, impl


@pytest.mark.parametrize("impl", ["tiles", "native"])
def test_grouped_matmul_rows_past_the_groups_give_zeros_and_no_gradient(impl):
    """Under jit the sizes may sum to fewer rows than lhs has (expert parallelism's receive
    buffer): those rows give zeros and take no gradient, and the rest equal the reference."""
    rng = np.random.default_rng(1)
    lhs = jnp.asarray(rng.normal(size=(90, 12)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(3, 12, 20)), jnp.float32)
    sizes = jnp.array([17, 0, 40], jnp.int32)  # 57 of 90 rows
    probe = jnp.asarray(rng.normal(size=(90, 20)), jnp.float32)

    def loss(lhs, rhs, sizes, impl):
        out = grouped_matmul(lhs, rhs, sizes, implementation=impl, tile=8 if impl == "tiles" else None)
        return jnp.sum(out * probe), out

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=3)
    (_, out), (d_lhs, d_rhs) = grad(lhs, rhs, sizes, impl)
    (_, ref), (ref_lhs, ref_rhs) = grad(lhs, rhs, sizes, "dense")
    assert not np.any(np.asarray(out[57:])) and not np.any(np.asarray(d_lhs[57:]))
    for got, want in ((out, ref), (d_lhs, ref_lhs), (d_rhs, ref_rhs)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("sizes", [[40, 60, 30], [40, 60, 30, 20]])
def test_grouped_matmul_groups_past_the_rows_end_with_them_in_every_implementation(sizes):
    """Traced sizes summing past the rows (64 here, one GPU tile; 130 > the TPU kernel's 128
    padded rows too): every implementation cuts the groups at the last row, forward and both
    gradients. The kernels' transposed pass read the tiles past the last (wrapping around, in
    interpret mode) and gave d_rhs off by ~20. A group that starts past the TPU kernel's
    padded rows (the fourth: rows 130..150) has none, and no visit: its d_rhs block was never
    written (NaN in interpret mode, leftover memory on a TPU)."""
    rng = np.random.default_rng(2)
    lhs = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(len(sizes), 32, 64)), jnp.float32)
    sizes = jnp.array(sizes, jnp.int32)

    def loss(lhs, rhs, sizes, impl):
        if impl == "tpu_interpret":
            out = kernel_grouped_matmul(lhs, rhs, sizes, backend="tpu", interpret=True)
        else:
            out = grouped_matmul(lhs, rhs, sizes, implementation=impl)
        return jnp.sum(jnp.sin(out)), out

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=3)
    (_, ref), ref_grads = grad(lhs, rhs, sizes, "dense")
    for impl in ("ragged_dot", "tiles", "pallas_interpret", "tpu_interpret"):
        (_, out), grads = grad(lhs, rhs, sizes, impl)
        for got, want in ((out, ref), *zip(grads, ref_grads)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()),
                                       err_msg=impl)


def _custom_calls(fn, args, platform):
    pattern = r"__gpu\$xla\.gpu\.triton" if platform == "cuda" else r"tpu_custom_call"
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    return len(re.findall(pattern, text))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_grouped_matmul_kernels_lower_for_cuda_and_tpu(platform, tpu_lowering_target):
    lhs = jnp.zeros((300, 200), jnp.bfloat16)
    rhs = jnp.zeros((8, 200, 150), jnp.bfloat16)
    sizes = jnp.array([40, 0, 100, 60, 0, 50, 30, 20], jnp.int32)

    def f(lhs, rhs):
        return grouped_matmul(lhs, rhs, sizes, implementation="pallas").astype(jnp.float32).sum()

    assert _custom_calls(f, (lhs, rhs), platform) == 1
    # forward, d_lhs (a grouped matmul with rhs transposed), d_rhs (the transposed kernel)
    assert _custom_calls(jax.value_and_grad(f, argnums=(0, 1)), (lhs, rhs), platform) == 3


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match=r"k=5: must be an int in \[1, num_experts=4\]"):
        top_k_routing(jnp.zeros((3, 4)), 5)
    with pytest.raises(ValueError, match="capacity_factor=0"):
        expert_capacity(10, 4, 2, 0)
    with pytest.raises(ValueError, match="leaks the future"):
        MoE(8, 16, 4, 2, rngs=nnx.Rngs(0), router="expert_choice")
    with pytest.raises(ValueError, match=r"probs \(8, 4\), expert_index \(7, 2\)"):
        load_balancing_loss(jnp.zeros((8, 4)), jnp.zeros((7, 2), jnp.int32))
    with pytest.raises(ValueError, match="steps=0: each must be an integer >= 1"):
        linear_k_schedule(3, k_start=1, k_end=2, steps=0)
    with pytest.raises(ValueError, match="num_experts=0"):
        MoE(8, 16, 0, 1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"MoE input of shape \(1, 4, 7\): expected .*d_model=8"):
        MoE(8, 16, 4, 2, rngs=nnx.Rngs(0))(jnp.zeros((1, 4, 7)))
    with pytest.raises(ValueError, match="sum to at most the 5 rows of lhs; got sum 7"):
        grouped_matmul(jnp.ones((5, 2)), jnp.ones((2, 2, 3)), jnp.array([4, 3]))
    with pytest.raises(ConfigError, match="model.moe_router='expert_choice'"):
        validate(tiny_config("model.moe_experts=4", "model.moe_router=expert_choice"))
    with pytest.raises(ConfigError, match="model.moe_k=5"):
        validate(tiny_config("model.moe_experts=4", "model.moe_k=5"))
    with pytest.raises(ConfigError, match="model.moe_capacity_factor=-1.0"):
        validate(tiny_config("model.moe_experts=4", "model.moe_capacity_factor=-1.0"))


def test_bad_dispatch_and_kernel_arguments_name_the_argument_and_value():
    logits, x = jnp.zeros((6, 4)), jnp.ones((6, 8))
    token_choice, expert_choice = top_k_routing(logits, 2), expert_choice_routing(logits, 3)
    same = lambda buffers: buffers  # noqa: E731
    other_tokens = r"x_TD of shape \(5, 8\): expected \[tokens=6, d\]"
    lhs, rhs, sizes = jnp.ones((2, 3)), jnp.ones((2, 3, 4)), jnp.array([1, 1])
    cases = [
        (lambda: expert_choice_dispatch(x[:5], expert_choice, same), other_tokens),
        (lambda: capacity_dispatch(x[:5], token_choice, same, 4), other_tokens),
        (lambda: dropless_dispatch(x[:5], token_choice, lambda rows, n: rows), other_tokens),
        (lambda: capacity_dispatch(x[None], token_choice, same, 4), r"x_TD of shape \(1, 6, 8\)"),
        (lambda: grouped_matmul(lhs.astype(jnp.int32), rhs, sizes, implementation="dense"),
         "lhs has dtype int32; needs floating point"),
        (lambda: grouped_matmul(lhs, rhs.astype(jnp.int32), sizes, implementation="tiles"),
         "rhs has dtype int32; needs floating point"),
        (lambda: grouped_matmul(lhs, rhs, sizes, implementation="tiles", tile=0),
         r"tile=0: must be an integer >= 1"),
        (lambda: grouped_matmul(lhs, rhs, sizes, implementation="tiles", tile=-4), "tile=-4"),
        (lambda: load_balancing_loss(jnp.full((1, 4), 0.25), jnp.array([[0, 4]])),
         r"expert_index holds values in \[0, 4\]: must be in \[0, num_experts=4\)"),
        (lambda: expert_capacity(8, 0, 2, 1.0), "num_experts=0: must be an integer >= 1"),
        (lambda: expert_capacity(-1, 4, 2, 1.0), "num_tokens=-1: must be an integer >= 0"),
        (lambda: expert_capacity(8, 4, 2, float("inf")), "capacity_factor=inf: must be a finite"),
        (lambda: expert_capacity(8, 4, 2, "1.25"), "capacity_factor='1.25': must be a finite"),
        (lambda: expert_capacity(8, 4, 5, 1.0), r"k=5: must be an integer in \[1, num_experts=4\]"),
        (lambda: expert_choice_capacity(8, 0, 1.0), "num_experts=0: must be an integer >= 1"),
        (lambda: pack(x, token_choice, 0), "capacity=0: must be an integer >= 1"),
        (lambda: pack(x, token_choice, 2.5), "capacity=2.5: must be an integer >= 1"),
        (lambda: capacity_dispatch(x, token_choice, same, -1), "capacity=-1"),
        (lambda: swiglu_experts(jnp.ones((2, 3, 4)), jnp.ones((2, 5, 6)), jnp.ones((2, 5, 6)),
                                jnp.ones((2, 6, 4))),
         r"swiglu_experts needs x_ECD \[E, C, D\].*; got \(2, 3, 4\), \(2, 5, 6\)"),
        (lambda: chunk_pool(x[None], 1.5, causal=True), "chunk=1.5: must be an integer"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    assert top_k_routing(logits, np.int64(2)).expert_index.shape == (6, 2)  # numpy ints are ints
    no_tokens = top_k_routing(logits[:0], 2)  # an empty batch gets capacity 0 and no buffers
    assert pack(x[:0], no_tokens, expert_capacity(0, 4, 2, 1.0))[0].shape == (4, 0, 8)


def test_bad_moe_options_are_refused_when_the_layer_is_built():
    cases = [(dict(jitter=3.0), r"jitter=3.0: must be in \[0, 1\)"),
             (dict(jitter=-1), r"jitter=-1: must be in \[0, 1\)"),
             (dict(chunk=2.5), "chunk=2.5: must be an integer >= 0"),
             (dict(chunk=-2), "chunk=-2: must be an integer >= 0"),
             (dict(k=2.0), r"k=2.0: must be an integer in \[1, num_experts=4\]"),
             (dict(grouped_impl="megablox"), "grouped_impl='megablox': allowed"),
             (dict(capacity_factor=float("inf")), "capacity_factor=inf: must be a finite"),
             # NaN/inf built non-finite experts, -1 a math domain error
             (dict(out_init_scale=float("nan")), "out_init_scale=nan: must be a finite number"),
             (dict(out_init_scale=-1.0), "out_init_scale=-1.0: must be a finite number >= 0")]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            MoE(8, 16, 4, **{"k": 2, **options}, rngs=nnx.Rngs(0))
    moe = MoE(8, 16, 4, np.int64(2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="MoE input has dtype int32; needs floating point"):
        moe(jnp.ones((1, 4, 8), jnp.int32))
    assert moe(jnp.ones((0, 4, 8))).shape == (0, 4, 8)  # an empty batch (dropless)
    with pytest.raises(ValueError, match="capacity_factor='1.0': must be a finite number > 0"):
        MoE(8, 16, 4, 2, capacity_factor="1.0", rngs=nnx.Rngs(0))  # was a bare TypeError


def test_moe_call_arguments_are_checked_and_an_empty_batch_passes_every_router():
    """Router inputs of another shape were routed silently from the wrong tokens (transposed)
    or failed inside an einsum; a non-scalar ``active`` failed deep in a trace; expert choice
    on an empty batch raised a ZeroDivisionError."""
    moe = MoE(8, 16, 4, 2, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 3, 8))
    for router_inputs in (jnp.ones((3, 2, 8)), jnp.ones((2, 3, 5))):
        with pytest.raises(ValueError, match=r"router_inputs of shape \(\d, \d, \d\): expected "
                                             r"\(2, 3, 8\), one router input per token"):
            moe(x, router_inputs=router_inputs)
    with pytest.raises(ValueError, match=r"active of shape \(2,\): must be a scalar"):
        moe(x, active=jnp.ones(2))
    chooser = MoE(8, 16, 4, 2, router="expert_choice", causal=False, rngs=nnx.Rngs(0))
    y, sown = run_capturing(chooser, "__call__", jnp.ones((0, 4, 8)))
    assert y.shape == (0, 4, 8) and float(sown["aux_loss"][0]) == 0.0
    # top-k on an empty batch: the statistics' means over no token were a NaN aux loss, and a
    # capacity's dropped fraction was 1
    for capacity_factor in (None, 1.0):
        top_k = MoE(8, 16, 4, 2, capacity_factor=capacity_factor, rngs=nnx.Rngs(0))
        y, sown = run_capturing(top_k, "__call__", jnp.ones((0, 4, 8)))
        assert y.shape == (0, 4, 8) and float(sown["aux_loss"][0]) == 0.0
        assert float(sown["moe_dropped"][0]) == 0.0
    list_sizes = grouped_matmul(jnp.ones((5, 8)), jnp.ones((2, 8, 3)), [2, 3], implementation="dense")
    np.testing.assert_array_equal(list_sizes, 8.0)  # a list of sizes (an AttributeError before)


def test_top_1_with_renormalised_gates_warns_that_the_router_learns_nothing_from_the_task():
    """Renormalised, a single gate is p / p = 1: the task loss has no gradient for the router
    (the Hydra presets trained so, their routers moved by the balance loss only). Switch
    weights by the probability; so do the presets now."""
    from jaxsparse.nn.moe import UntrainedRouterWarning

    x = jax.random.normal(jax.random.key(0), (2, 6, 8))

    def router_gradient(moe):
        def task_loss(moe):
            return jnp.sum(jnp.sin(moe(x)))
        return nnx.grad(task_loss)(moe).router.kernel[...]

    with pytest.warns(UntrainedRouterWarning, match="renormalize=True with k=1"):
        renormalised = MoE(8, 16, 4, 1, rngs=nnx.Rngs(0), aux_weight=0.0, z_weight=0.0)
    renormalised.eval()
    assert float(jnp.abs(router_gradient(renormalised)).max()) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedRouterWarning)
        weighted = MoE(8, 16, 4, 1, rngs=nnx.Rngs(0), renormalize=False, aux_weight=0.0,
                       z_weight=0.0)
        MoE(8, 16, 4, 2, rngs=nnx.Rngs(0))  # two gates share the weight: both learn
        MoE(8, 16, 4, 1, rngs=nnx.Rngs(0), router="random", k_end=2)  # fixed: nothing to learn
        from jaxsparse import configs
        from jaxsparse.models.registry import build
        for preset in configs.names():
            cfg = configs.get(preset)
            if cfg.model.moe_experts and preset.endswith("tiny"):
                build(cfg.model, nnx.Rngs(0))
    weighted.eval()
    assert float(jnp.abs(router_gradient(weighted)).max()) > 1e-2


MOE_JITTER_ON_MESHES = r"""
import json, jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import Mesh
from jaxsparse.nn import MoE
from jaxsparse.parallel import PRESETS, activation_sharding
x = jax.random.normal(jax.random.key(1), (4, 8, 16))
x = x.at[1].set(x[0])  # two equal rows: their noise must differ, as on one device
out = {}
for name, axes, shape, preset in [("data", ("data",), (4,), "data"),
                                  ("expert", ("data", "expert"), (2, 2), "fsdp_tp_ep")]:
    for chunk in (0, 4):
        moe = MoE(16, 24, 4, 2, rngs=nnx.Rngs(0), jitter=0.5, chunk=chunk)
        one = nnx.clone(moe)(x)  # training mode: jittered
        mesh = Mesh(np.array(jax.devices()).reshape(shape), axes)
        with activation_sharding(mesh, PRESETS[preset].rules):
            split = moe(x)
        out[f"{name}, chunk {chunk}"] = {
            "err": float(jnp.abs(split - one).max()),
            "equal_rows_differ": float(jnp.abs(split[0] - split[1]).max())}
print(json.dumps(out))
"""


def test_router_jitter_on_a_mesh_is_the_one_device_noise():
    """Drawn inside each device's shard from the same key, the jitter was the same on every
    device (two equal rows on two devices got equal noise); it is drawn for the whole batch."""
    from helpers import run_python
    for name, result in run_python(MOE_JITTER_ON_MESHES, devices=4).items():
        assert result["err"] < 1e-5 and result["equal_rows_differ"] > 1e-3, (name, result)


@pytest.mark.parametrize("implementation", ["dense", "ragged_dot", "tiles", "native",
                                            "pallas_interpret"])
def test_rows_past_the_groups_give_zeros_eagerly_too(implementation):
    """Concrete sizes that sum to fewer than the rows were refused eagerly, though every
    implementation gives zeros there (as under jit)."""
    lhs = jax.random.normal(jax.random.key(0), (7, 4))
    rhs = jax.random.normal(jax.random.key(1), (2, 4, 3))
    sizes = jnp.array([2, 3], jnp.int32)
    out = grouped_matmul(lhs, rhs, sizes, implementation=implementation)
    want = jnp.concatenate([lhs[:2] @ rhs[0], lhs[2:5] @ rhs[1], jnp.zeros((2, 3))])
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)


def test_settings_the_layer_would_misread_are_refused_or_said():
    """A string ``renormalize`` read as True (``"no"`` renormalised); an expert-choice layer
    stored ``eval_k`` / ``k_end`` and ran as trained; evaluating with another k than training's
    under ``renormalize=False`` changes the gates' sum, so the output's scale, unannounced."""
    from jaxsparse.nn.moe import EvalScaleWarning

    for name in ("renormalize", "causal"):
        with pytest.raises(ValueError, match=rf"{name}='no': must be True or False"):
            MoE(8, 16, 4, 2, rngs=nnx.Rngs(0), **{name: "no"})
    for extra in ({"eval_k": 4}, {"k_end": 3}):
        with pytest.raises(ValueError, match=r"router='expert_choice' takes no eval_k"):
            MoE(8, 16, 4, 1, rngs=nnx.Rngs(0), router="expert_choice", causal=False, **extra)
    with pytest.warns(EvalScaleWarning, match=r"eval_k=4 with renormalize=False .*top-1"):
        layer = MoE(8, 16, 4, 1, rngs=nnx.Rngs(0), renormalize=False, eval_k=4)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8))
    train_gates = layer.route(x)[0].weights.sum(-1)
    layer.eval()
    eval_gates = layer.route(x)[0].weights.sum(-1)
    assert float(jnp.max(train_gates)) < 0.99 and np.allclose(eval_gates, 1.0, atol=1e-6)
    with warnings.catch_warnings():  # renormalised gates sum to 1 whatever k: nothing to say
        warnings.simplefilter("error", EvalScaleWarning)
        MoE(8, 16, 4, 2, rngs=nnx.Rngs(0), eval_k=4)
        MoE(8, 16, 4, 1, rngs=nnx.Rngs(0), renormalize=False, eval_k=1)


@pytest.mark.filterwarnings("ignore::jaxsparse.nn.moe.EvalScaleWarning")
def test_zero_weight_choices_are_not_run_through_the_experts(monkeypatch):
    """The router always takes k_max choices (eval_k, the k schedule's k_end); in training
    the ones past the active k have weight 0 and were still sorted into the groups and
    computed, forward and backward (eval_k=4 over k=1: 4x the expert rows). Values and
    gradients are those of running them."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8))
    moe = MoE(8, 16, 4, 1, rngs=nnx.Rngs(0), eval_k=4, renormalize=False)
    rows = []
    original = MoE._grouped_experts

    def spy(self, rows_in, group_sizes, weights=None):
        rows.append(int(jnp.sum(group_sizes)))
        return original(self, rows_in, group_sizes, weights)

    monkeypatch.setattr(MoE, "_grouped_experts", spy)
    loss = lambda moe: jnp.sum(jnp.sin(run_capturing(moe, "__call__", x)[0]))  # noqa: E731
    value, grads = nnx.value_and_grad(loss)(nnx.clone(moe))
    assert rows == [16]  # the 16 tokens' one active choice, not 64
    monkeypatch.setattr(MoE, "_grouped_experts", original)
    plain = MoE(8, 16, 4, 1, rngs=nnx.Rngs(0), renormalize=False)  # k_max 1: nothing to skip
    want_value, want_grads = nnx.value_and_grad(loss)(plain)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    for name in ("w_gate", "w_up", "w_down"):
        np.testing.assert_allclose(getattr(grads, name)[...], getattr(want_grads, name)[...],
                                   atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(grads.router.kernel[...], want_grads.router.kernel[...],
                               atol=1e-6, rtol=1e-5)


def test_loss_weights_are_checked_when_built_and_decode_inputs_when_decoding():
    """A NaN loss weight was accepted (and poisons the loss); a cache of another batch failed in
    the scan's carry, and a negative index shifted the chunk boundaries silently."""
    for options, message in [(dict(aux_weight=float("nan")), "aux_weight=nan: must be a finite "
                                                             "number >= 0"),
                             (dict(aux_weight=-1.0), "aux_weight=-1.0"),
                             (dict(z_weight=float("inf")), "z_weight=inf")]:
        with pytest.raises(ValueError, match=message):
            MoE(8, 16, 4, 1, **options, rngs=nnx.Rngs(0))
    moe = MoE(8, 16, 4, 1, chunk=2, rngs=nnx.Rngs(0))
    moe.eval()
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    moe.decode(x, moe.init_cache(2), 0)  # the valid baseline
    with pytest.raises(ValueError, match="batch=0: must be an integer >= 1"):
        moe.init_cache(0)
    for batch in (1, 3):
        with pytest.raises(ValueError, match=rf"cache\['sum'\] of shape \({batch}, 8\): made "
                                             r"for another batch size than the input's 2"):
            moe.decode(x, moe.init_cache(batch), 0)
    for index, message in [(-3, "cache_index: index=-3: must be >= 0"),
                           (1.5, r"cache_index: index of shape \(\) and dtype float32")]:
        with pytest.raises(ValueError, match=message):
            moe.decode(x, moe.init_cache(2), index)


@pytest.mark.parametrize("extra", [
    pytest.param([], id="dropless"),
    pytest.param(["model.moe_capacity_factor=1.0", "model.moe_jitter=0.01"], id="capacity",
                 marks=pytest.mark.slow),
    pytest.param(["model.moe_router=random", "model.moe_k=1", "model.moe_k_end=4"],
                 id="smoe-dropout", marks=pytest.mark.slow)])
def test_moe_transformer_trains_and_logs_expert_statistics(tmp_path, extra):
    from jaxsparse.train.loop import train
    from jaxsparse.train.metrics import read_metrics

    cfg = tiny_config("model.moe_experts=4", "model.moe_k=2", "model.moe_d_ff=32",
                      "train.steps=25", "optimizer.lr=1e-2", *extra)
    result = train(cfg, tmp_path, sample=True, quiet=True)
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    train_rows = [r for r in read_metrics(tmp_path) if r["split"] == "train"]
    assert {"moe_max_load", "moe_dropped", "aux_loss"} <= set(train_rows[-1])
    assert train_rows[-1]["moe_max_load"] >= 1.0
    if "model.moe_router=random" not in extra:
        assert train_rows[-1]["aux_loss"] > 0


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU (run experiments/gpu_check.sh on one)")
def test_grouped_matmul_kernel_on_gpu_matches_the_reference():
    rng = np.random.default_rng(1)
    sizes = jnp.array([0, 700, 33, 0, 1200, 167], jnp.int32)
    lhs = jnp.asarray(rng.normal(size=(2100, 256)), jnp.bfloat16)
    rhs = jnp.asarray(rng.normal(size=(6, 256, 384)), jnp.bfloat16)
    loss = lambda impl: lambda a, b: jnp.sum(jnp.sin(  # noqa: E731
        grouped_matmul(a, b, sizes, implementation=impl).astype(jnp.float32)))
    value, grads = jax.value_and_grad(loss("pallas"), argnums=(0, 1))(lhs, rhs)
    ref, ref_grads = jax.value_and_grad(loss("ragged_dot"), argnums=(0, 1))(lhs, rhs)
    np.testing.assert_allclose(value, ref, rtol=2e-2)
    for g, r in zip(grads, ref_grads):
        scale = float(jnp.abs(r.astype(jnp.float32)).max())
        np.testing.assert_allclose(g.astype(jnp.float32), r.astype(jnp.float32),
                                   atol=4e-2 * scale, rtol=4e-2)


def _routed(tokens=7, experts=5, d=3):
    logits = jax.random.normal(jax.random.key(0), (tokens, experts))
    x = jax.random.normal(jax.random.key(1), (tokens, d))
    return logits, x


def test_an_expert_callback_of_the_wrong_shape_is_named():
    # a buffer of fewer slots was gathered as zeros (dropped_fraction none the wiser), another
    # width came back as a wrong-shaped output, and dropless failed deep inside a broadcast
    logits, x = _routed()
    token_choice, expert_choice = top_k_routing(logits, 2), expert_choice_routing(logits, 3)
    cases = [
        (lambda: capacity_dispatch(x, token_choice, lambda b: b[:, :1], 3),
         r"the experts callback returned shape \(5, 1, 3\); expected \(5, 3, 3\)"),
        (lambda: capacity_dispatch(x, token_choice, lambda b: b[..., :2], 3),
         r"the experts callback returned shape \(5, 3, 2\); expected \(5, 3, 3\)"),
        (lambda: capacity_dispatch(x, token_choice, lambda b: b.astype(jnp.int32), 3),
         "the experts callback returned dtype int32; expected a floating-point dtype"),
        (lambda: dropless_dispatch(x, token_choice, lambda rows, sizes: rows[:5]),
         r"the grouped callback returned shape \(5, 3\); expected \(14, 3\)"),
        (lambda: dropless_dispatch(x, token_choice, lambda rows, sizes: rows[:, :1]),
         r"the grouped callback returned shape \(14, 1\); expected \(14, 3\)"),
        (lambda: expert_choice_dispatch(x, expert_choice, lambda b: b[:, :2]),
         r"the experts callback returned shape \(5, 2, 3\); expected \(5, 3, 3\)"),
        (lambda: unpack(jnp.ones((4, 3, 3)), token_choice, *pack(x, token_choice, 3)[1:]),
         r"out_ECD of shape \(4, 3, 3\): expected \[num_experts=5, capacity, d\]"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    same = lambda b: b  # noqa: E731
    assert capacity_dispatch(x, token_choice, same, 3)[0].shape == (7, 3)
    assert dropless_dispatch(x, token_choice, lambda rows, sizes: rows).shape == (7, 3)
    assert expert_choice_dispatch(x, expert_choice, same).shape == (7, 3)


def test_integer_activations_are_refused_by_every_dispatch():
    # the float router weights were cast to the activations' int dtype: all zeros
    logits, x = _routed()
    x = jnp.ones(x.shape, jnp.int32)
    token_choice, expert_choice = top_k_routing(logits, 2), expert_choice_routing(logits, 3)
    same = lambda b: b  # noqa: E731
    for call in (lambda: capacity_dispatch(x, token_choice, same, 3),
                 lambda: dropless_dispatch(x, token_choice, lambda rows, sizes: rows),
                 lambda: expert_choice_dispatch(x, expert_choice, same)):
        with pytest.raises(ValueError, match="x_TD has dtype int32; MoE dispatch needs "
                                             "floating-point inputs"):
            call()


@pytest.mark.parametrize("causal", [True, False])
def test_chunk_pool_of_an_empty_sequence_is_empty(causal):
    # causal pooling padded an empty [B, 0, D] into one chunk of zeros
    assert chunk_pool(jnp.ones((2, 0, 3)), 2, causal=causal).shape == (2, 0, 3)
    x = jnp.arange(12.0).reshape(1, 4, 3)
    expected = [[[0, 0, 0], [1.5, 2.5, 3.5]]] if causal else [[[1.5, 2.5, 3.5], [7.5, 8.5, 9.5]]]
    np.testing.assert_allclose(chunk_pool(x, 2, causal=causal), expected)


def test_routing_hyper_parameters_are_checked():
    logits, _ = _routed()
    for active_k in (5, 3, 0, -1, 1.5, True):
        with pytest.raises(ValueError, match=rf"active_k={active_k!r}: must be an integer in "
                                             r"\[1, k=2\]"):
            top_k_routing(logits, 2, active_k=active_k)
    for active_k, message in ((jnp.int32(3), r"active_k=3: must be an integer in \[1, k=2\]"),
                              (jnp.float32(1.0), r"active_k of shape \(\) and dtype float32"),
                              (jnp.array([1, 2]), r"active_k of shape \(2,\) and dtype int32")):
        with pytest.raises(ValueError, match=message):
            top_k_routing(logits, 2, active_k=active_k)
    one = top_k_routing(logits, 2, active_k=1).weights
    np.testing.assert_allclose(one[:, 1], 0.0)
    np.testing.assert_allclose(one[:, 0], 1.0, rtol=1e-6)
    traced = jax.jit(lambda a: top_k_routing(logits, 2, active_k=a).weights)(jnp.int32(1))
    np.testing.assert_allclose(traced, one)  # traced: no value check, same answer
    for kwargs, message in ((dict(k_start=1.5, k_end=2, steps=2.5),
                             "k_start=1.5, steps=2.5: each must be an integer >= 1"),
                            (dict(k_start=True, k_end=2, steps=2),
                             "k_start=True: each must be an integer >= 1"),
                            (dict(k_start=1, k_end=2.0, steps=False),
                             "k_end=2.0, steps=False: each must be an integer >= 1")):
        with pytest.raises(ValueError, match=message):
            linear_k_schedule(1, **kwargs)
    for chunk in (-1, 0, 2.0, True):
        with pytest.raises(ValueError, match=rf"chunk={chunk!r}: must be an integer >= 1"):
            unchunk(jnp.ones((2, 4, 3)), chunk)
    assert unchunk(jnp.ones((2, 4, 3)), 2).shape == (2, 8, 3)
    for minimum in (0, -1, 1.5):
        with pytest.raises(ValueError, match=rf"minimum={minimum!r}: must be an integer >= 1"):
            expert_capacity(0, 4, 2, 1.0, minimum=minimum)
    assert expert_capacity(0, 4, 2, 1.0, minimum=1) == 0  # (capped at the token count)
    assert expert_capacity(3, 4, 1, 0.1, minimum=1) == 1


def test_grouped_matmul_of_no_experts_is_refused_clearly():
    # building the error message took the min of an empty group_sizes and crashed
    from jaxsparse.ops.moe.grouped import GMM_IMPLEMENTATIONS

    for impl in GMM_IMPLEMENTATIONS:
        for m in (7, 0):
            with pytest.raises(ValueError, match=r"rhs \(0, 5, 3\) and group_sizes \(0,\) "
                                                 r"have E=0 groups: grouped_matmul needs at "
                                                 r"least one expert"):
                grouped_matmul(jnp.ones((m, 5)), jnp.ones((0, 5, 3)), jnp.zeros((0,), jnp.int32),
                               implementation=impl)


def test_grouped_matmul_with_an_empty_contraction_or_output_in_every_implementation():
    # the Pallas kernel sliced a block wider than the zero-width operand (a deep TypeError)
    from jaxsparse.ops.moe.grouped import GMM_IMPLEMENTATIONS

    sizes = jnp.array([3, 4])
    for impl in GMM_IMPLEMENTATIONS:
        out = grouped_matmul(jnp.ones((7, 5)), jnp.ones((2, 5, 0)), sizes, implementation=impl)
        assert out.shape == (7, 0) and out.dtype == jnp.float32, impl
        out = grouped_matmul(jnp.ones((7, 0)), jnp.ones((2, 0, 3)), sizes, implementation=impl)
        np.testing.assert_array_equal(out, np.zeros((7, 3)), err_msg=str(impl))


@pytest.mark.parametrize("packed", [False, True])
def test_causal_chunk_routing_leaves_the_contextless_chunks_out_of_losses_and_load(packed):
    """The first chunk of a row (or of a document) pools no earlier tokens: its router input is
    zeros, its probabilities uniform, and top-1 takes expert 0 on the tie at gate 1/E — a fixed
    choice, not the router's. It is left out of the balance and z losses and the load (counted,
    it was 12.5% of hydra_tiny's decisions, all on expert 0, and the balance loss pushed the
    learned routing away from expert 0). Reference: those statistics over the other tokens."""
    moe = MoE(32, 64, 4, 1, rngs=nnx.Rngs(0), renormalize=False, chunk=16)
    x = jax.random.normal(jax.random.key(1), (4, 64, 32))
    # two documents a row, the second starting inside chunk 2: its tokens there pool nothing
    segment_ids = jnp.broadcast_to((jnp.arange(64) >= 40).astype(jnp.int32), (4, 64))
    kwargs = {"segment_ids": segment_ids} if packed else {}
    _, sown = run_capturing(moe, "__call__", x, **kwargs)

    inputs = moe.chunk_router_inputs(x, segment_ids if packed else None).reshape(-1, 32)
    counted = np.asarray(jnp.any(inputs != 0, axis=-1))
    first = np.arange(64) < 16
    expected_uncounted = first | ((np.arange(64) >= 40) & (np.arange(64) < 48)) if packed else first
    np.testing.assert_array_equal(counted, ~np.tile(expected_uncounted, 4))
    logits = np.asarray(inputs @ moe.router.kernel[...], np.float64)[counted]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    f = np.bincount(probs.argmax(-1), minlength=4) / len(probs)
    lse = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
    want_aux = 0.01 * 4 * np.sum(f * probs.mean(0)) + 1e-3 * np.mean(lse ** 2)
    np.testing.assert_allclose(np.asarray(sown["moe_load"][0]), f, rtol=1e-6)
    np.testing.assert_allclose(float(sown["aux_loss"][0]), want_aux, rtol=1e-5)


def test_a_sequence_inside_the_first_chunk_reports_a_uniform_load_and_no_balance_loss():
    """Nothing routed (every token in causal chunk routing's first chunk): the load is uniform,
    as for an empty batch (it read all zeros: moe_max_load 0, below the balanced 1), and the
    balance and z losses count nothing."""
    moe = MoE(32, 64, 4, 1, rngs=nnx.Rngs(0), renormalize=False, chunk=16)
    _, sown = run_capturing(moe, "__call__", jax.random.normal(jax.random.key(0), (2, 16, 32)))
    np.testing.assert_array_equal(np.asarray(sown["moe_load"][0]), np.full(4, 0.25))
    assert float(sown["aux_loss"][0]) == 0.0
