"""The C++ CPU embedding bag behind ``memory_read`` (jaxsparse/ops/native/embedding_bag_cpu.cc):
equal to gathering every row (values and gradients of scores and table, repeated and unused
slots, widths around its 16-float vectors), bitwise repeatable, the CPU default for float32
only, absent from accelerator programs, and refusing slots outside the table."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import run_python
from jaxsparse.ops.memory import memory_read, memory_read_reference

TARGETS = ("jaxsparse_embedding_bag_f32", "jaxsparse_embedding_bag_backward_f32")


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


def inputs(lead, heads, knn, slots, width, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    scores = jax.random.normal(k[0], (*lead, heads, knn)) * 2.0
    # few slots for many picks: repeats within a token and across tokens, and unused rows
    chosen = jax.random.randint(k[1], (*lead, heads, knn), 0, max(slots // 2, 1))
    values = jax.random.normal(k[2], (slots, width))
    return scores, chosen, values


@pytest.mark.parametrize("lead,heads,knn,slots,width", [
    ((1,), 1, 1, 1, 1), ((5,), 2, 3, 7, 15), ((2, 9), 4, 8, 64, 16), ((130,), 2, 16, 100, 17),
    ((3, 70), 1, 32, 4096, 130)])
def test_kernel_equals_gathering_every_row_forward_and_gradients(lead, heads, knn, slots, width):
    scores, chosen, values = inputs(lead, heads, knn, slots, width)
    ct = jax.random.normal(jax.random.key(9), (*lead, width))

    def run(fn):
        out, vjp = jax.vjp(lambda s, v: fn(s, chosen, v), scores, values)
        return (out,) + vjp(ct)

    got = run(jax.jit(lambda s, c, v: memory_read(s, c, v, implementation="native")))
    want = run(memory_read_reference)
    for name, g, w in zip(("out", "d_scores", "d_values"), got, want):
        assert g.shape == w.shape and g.dtype == jnp.float32, name
        assert rel_err(g, w) < 1e-5, (name, rel_err(g, w))
    unused = np.setdiff1d(np.arange(slots), np.asarray(chosen))
    np.testing.assert_array_equal(np.asarray(got[2])[unused], 0.0)  # rows never read


def test_gradients_are_bitwise_reproducible():
    scores, chosen, values = inputs((300,), 4, 16, 256, 48, seed=3)
    grad = jax.jit(jax.grad(lambda s, v: jnp.sum(jnp.sin(
        memory_read(s, chosen, v, implementation="native"))), argnums=(0, 1)))
    first = grad(scores, values)
    for _ in range(3):
        for a, b in zip(first, grad(scores, values)):
            np.testing.assert_array_equal(a, b)


def _hlo(fn, *args, platform=None):
    traced = jax.jit(fn).trace(*args)
    lowered = traced.lower(lowering_platforms=(platform,)) if platform else traced.lower()
    return lowered.as_text()


def test_default_takes_the_kernel_on_cpu_for_float32_only():
    scores, chosen, values = inputs((4,), 2, 3, 10, 8)
    assert TARGETS[0] in _hlo(lambda s, v: memory_read(s, chosen, v), scores, values)
    grad = jax.grad(lambda s, v: memory_read(s, chosen, v).sum(), (0, 1))
    assert TARGETS[1] in _hlo(grad, scores, values)  # (the unused forward is pruned)
    bf = values.astype(jnp.bfloat16)
    assert TARGETS[0] not in _hlo(lambda s, v: memory_read(s, chosen, v), scores, bf)
    assert TARGETS[0] not in _hlo(
        lambda s, v: memory_read(s, chosen, v, implementation="scan"), scores, values)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_programs_lowered_for_accelerators_do_not_call_the_cpu_kernel(platform):
    scores, chosen, values = inputs((4,), 2, 3, 10, 8)
    grad = jax.grad(lambda s, v: memory_read(s, chosen, v, implementation="native").sum(), (0, 1))
    assert not any(t in _hlo(grad, scores, values, platform=platform) for t in TARGETS)


def test_bad_requests_are_named():
    scores, chosen, values = inputs((4,), 2, 3, 10, 8)
    with pytest.raises(ValueError, match=r"float32; got values bfloat16 \(use .scan.\)"):
        memory_read(scores, chosen, values.astype(jnp.bfloat16), implementation="native")
    with pytest.raises(ValueError, match="implementation='fast'"):
        memory_read(scores, chosen, values, implementation="fast")
    bad = chosen.at[0, 0, 0].set(10)
    # concrete slots are checked before any kernel runs; traced ones by the kernel itself
    with pytest.raises(ValueError, match=r"slots holds 10: must be in \[0, 10\)"):
        memory_read(scores, bad, values, implementation="native")
    with pytest.raises(Exception, match=r"slot index 10 outside the table's 10 rows"):
        jax.block_until_ready(jax.jit(functools.partial(memory_read, implementation="native"))(
            scores, bad, values))


def test_without_the_kernel_the_default_falls_back_and_explicit_native_errors():
    code = """
import json, jax.numpy as jnp
from jaxsparse.ops.memory import memory_read, memory_read_reference
s = jnp.arange(12.0).reshape(2, 2, 3) / 7; c = jnp.arange(12).reshape(2, 2, 3) % 5
v = jnp.arange(20.0).reshape(5, 4)
same = bool(jnp.allclose(memory_read(s, c, v), memory_read_reference(s, c, v), atol=1e-5))
try:
    memory_read(s, c, v, implementation="native"); msg = None
except RuntimeError as err:
    msg = str(err)
print(json.dumps({"same": same, "msg": msg}))
"""
    out = run_python(code, env={"JAXSPARSE_NATIVE": "0"})
    assert out["same"] and "could not be built" in out["msg"], out
