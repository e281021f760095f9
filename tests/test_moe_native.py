"""The C++ CPU grouped matmul (jaxsparse/ops/native/grouped_matmul_cpu.cc): equal to the dense
reference for every edge of its work split (forward and both gradients), the default on CPU
for float32 only, absent from programs lowered for accelerators, repeatable bit for bit, and
what the dropless MoE layer runs on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import run_python
from jaxsparse.ops.moe.grouped import grouped_matmul

TARGETS = ("jaxsparse_grouped_matmul_f32", "jaxsparse_grouped_matmul_rhs_grad_f32")


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


# (m, k, n, group sizes). The kernel's edges: groups starting inside a 48-row tile and inside
# a 6-row block; empty groups first, between and last; rows past the last group (zeros);
# output widths with 64-wide, 16-wide and scalar column blocks (83 = 64 + 16 + 3) and more
# than one 256-column panel (300); contraction deeper than one 128-deep block (300); a lhs
# column count that leaves a partial 48-row block of the weight gradient (70).
CASES = [
    (1, 1, 1, [1]),
    (37, 5, 17, [0, 10, 0, 20, 7]),
    (50, 70, 300, [3, 0, 30]),          # 17 rows past the groups
    (203, 24, 83, [0, 61, 3, 0, 100, 39]),
    (200, 300, 129, [100, 0, 99]),
    (9, 3, 2, [0, 0]),                  # no row in any group
]


@pytest.mark.parametrize("m,k,n,sizes", CASES)
def test_kernel_equals_the_dense_reference_forward_and_gradients(m, k, n, sizes):
    rng = np.random.default_rng(m * 1000 + n)
    lhs = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(len(sizes), k, n)), jnp.float32)
    ct = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
    group_sizes = jnp.asarray(sizes, jnp.int32)

    def run(impl):
        # sizes traced (as routing produces them): rows past their sum are allowed then
        fn = jax.jit(lambda a, b, s: grouped_matmul(a, b, s, implementation=impl))
        out, vjp = jax.vjp(lambda a, b: fn(a, b, group_sizes), lhs, rhs)
        return (out,) + vjp(ct)

    got, want = run("native"), run("dense")
    for name, g, w in zip(("out", "d_lhs", "d_rhs"), got, want):
        assert g.shape == w.shape and g.dtype == jnp.float32, name
        if np.abs(np.asarray(w)).max() == 0:
            np.testing.assert_array_equal(g, 0.0)
        else:
            assert rel_err(g, w) < 1e-5, (name, rel_err(g, w))  # float32: a few ulps of sums
    past = sum(sizes)
    np.testing.assert_array_equal(got[0][past:], 0.0)  # rows past every group
    np.testing.assert_array_equal(got[1][past:], 0.0)


def test_group_sizes_may_be_traced_and_any_integer_dtype():
    rng = np.random.default_rng(1)
    lhs = jnp.asarray(rng.normal(size=(60, 16)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(3, 16, 32)), jnp.float32)
    f = jax.jit(lambda s: grouped_matmul(lhs, rhs, s, implementation="native"))
    for sizes in ([20, 20, 20], [0, 60, 0], [59, 0, 1]):
        want = grouped_matmul(lhs, rhs, jnp.asarray(sizes), implementation="dense")
        for dtype in (jnp.int32, jnp.int16, jnp.uint8):  # (int64 needs jax_enable_x64)
            sizes_arr = jnp.asarray(sizes, dtype)
            assert sizes_arr.dtype == dtype
            assert rel_err(f(sizes_arr), want) < 1e-6, dtype


def _hlo(fn, *args, platform=None):
    traced = jax.jit(fn).trace(*args)
    lowered = traced.lower(lowering_platforms=(platform,)) if platform else traced.lower()
    return lowered.as_text()


def test_default_takes_the_kernel_on_cpu_for_float32_only():
    lhs, rhs, sizes = jnp.ones((10, 4)), jnp.ones((2, 4, 8)), jnp.array([4, 6], jnp.int32)
    grad = jax.grad(lambda a, b: grouped_matmul(a, b, sizes).sum(), (0, 1))
    text = _hlo(grad, lhs, rhs)
    assert all(target in text for target in TARGETS)
    bf = lambda a: a.astype(jnp.bfloat16)  # noqa: E731
    assert TARGETS[0] not in _hlo(lambda a, b: grouped_matmul(a, b, sizes), bf(lhs), bf(rhs))
    assert TARGETS[0] not in _hlo(
        lambda a, b: grouped_matmul(a, b, sizes, implementation="tiles"), lhs, rhs)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_programs_lowered_for_accelerators_do_not_call_the_cpu_kernel(platform):
    lhs, rhs, sizes = jnp.ones((10, 4)), jnp.ones((2, 4, 8)), jnp.array([4, 6], jnp.int32)
    grad = jax.grad(lambda a, b: grouped_matmul(a, b, sizes, implementation="native").sum(),
                    (0, 1))
    text = _hlo(grad, lhs, rhs, platform=platform)
    assert not any(target in text for target in TARGETS) and "dot_general" in text


def test_explicit_native_refuses_other_dtypes():
    with pytest.raises(ValueError, match=r"implementation='native'.*float32.*bfloat16"):
        grouped_matmul(jnp.ones((4, 4), jnp.bfloat16), jnp.ones((1, 4, 4), jnp.bfloat16),
                       jnp.array([4]), implementation="native")


def test_results_are_bitwise_reproducible():
    """Each output element is owned by one task that sums its group's rows in order."""
    rng = np.random.default_rng(2)
    lhs = jnp.asarray(rng.normal(size=(1000, 96)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(4, 96, 300)), jnp.float32)
    ct = jnp.asarray(rng.normal(size=(1000, 300)), jnp.float32)
    sizes = jnp.array([400, 13, 0, 587], jnp.int32)
    run = jax.jit(lambda a, b: jax.vjp(
        lambda a, b: grouped_matmul(a, b, sizes, implementation="native"), a, b)[1](ct))
    first = run(lhs, rhs)
    for _ in range(3):
        for a, b in zip(first, run(lhs, rhs)):
            np.testing.assert_array_equal(a, b)


def test_without_the_kernel_the_default_falls_back_and_explicit_native_errors():
    code = """
import json, jax.numpy as jnp
from jaxsparse.ops.moe.grouped import grouped_matmul
lhs = jnp.arange(40.0).reshape(10, 4); rhs = jnp.ones((2, 4, 3)); s = jnp.array([4, 6])
same = bool(jnp.allclose(grouped_matmul(lhs, rhs, s),
                         grouped_matmul(lhs, rhs, s, implementation="dense")))
try:
    grouped_matmul(lhs, rhs, s, implementation="native"); msg = None
except RuntimeError as err:
    msg = str(err)
print(json.dumps({"same": same, "msg": msg}))
"""
    out = run_python(code, env={"JAXSPARSE_NATIVE": "0"})
    assert out["same"] and "could not be built" in out["msg"], out


def test_dropless_moe_layer_runs_the_kernel_and_matches_the_tiles_path():
    from flax import nnx

    from jaxsparse.nn.moe import MoE

    x = jax.random.normal(jax.random.key(0), (2, 24, 16))

    def run(impl):
        layer = MoE(16, 32, 4, 2, rngs=nnx.Rngs(0), capacity_factor=None, grouped_impl=impl)
        layer.eval()

        def loss(layer, x):
            return jnp.sum(jnp.sin(layer(x)))

        # compiled: op by op both paths' gradients took 12 s, compiled 4 s
        value, grads = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))(layer, x)
        return value, grads, _hlo(lambda x: layer(x), x)

    value, grads, text = run(None)
    ref_value, ref_grads, _ = run("tiles")
    assert TARGETS[0] in text
    assert abs(float(value - ref_value)) < 1e-5 * abs(float(ref_value)) + 1e-6
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert rel_err(a, b) < 1e-5
