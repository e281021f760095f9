"""``jaxsparse.ops.topk.top_k``: the C++ CPU kernel gives exactly ``jax.lax.top_k``'s values,
indices, order of ties and special values, and gradients; it is the CPU default for float32
only and never appears in programs lowered for accelerators."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import run_python
from jaxsparse.ops.topk import top_k

TARGET = "jaxsparse_top_k_indices_f32"


@pytest.mark.parametrize("shape,k", [((1,), 1), ((7, 1), 1), ((3, 5, 33), 33), ((129, 64), 16),
                                     ((2, 300, 2, 256), 16), ((40, 1000), 32)])
def test_equals_lax_top_k_with_ties(shape, k):
    rng = np.random.default_rng(sum(shape) + k)
    x = rng.standard_normal(shape).astype(np.float32)
    x[..., ::3] = np.round(x[..., ::3])  # many exact ties
    x = jnp.asarray(x)
    values, indices = jax.jit(lambda x: top_k(x, k, implementation="native"))(x)
    want_values, want_indices = jax.lax.top_k(x, k)
    assert indices.dtype == jnp.int32 and values.shape == want_values.shape
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_array_equal(values, want_values)


def test_special_values_follow_lax_total_order():
    x = jnp.array([[1.0, jnp.nan, 3.0, 3.0, -jnp.inf, jnp.inf, 2.0, 3.0, -0.0, 0.0, -jnp.nan]])
    got = top_k(x, 11, implementation="native")[1]
    np.testing.assert_array_equal(got, jax.lax.top_k(x, 11)[1])


def test_gradients_reach_the_chosen_entries_as_with_lax():
    x = jax.random.normal(jax.random.key(0), (6, 50))
    w = jax.random.normal(jax.random.key(1), (6, 8))

    def grad(impl):
        return jax.grad(lambda x: jnp.sum(w * top_k(x, 8, implementation=impl)[0] ** 2))(x)

    np.testing.assert_array_equal(grad("native"), grad("xla"))


def _hlo(fn, *args, platform=None):
    traced = jax.jit(fn).trace(*args)
    lowered = traced.lower(lowering_platforms=(platform,)) if platform else traced.lower()
    return lowered.as_text()


def test_default_takes_the_kernel_on_cpu_for_float32_only():
    x = jnp.ones((4, 10))
    assert TARGET in _hlo(lambda x: top_k(x, 3), x)
    assert TARGET not in _hlo(lambda x: top_k(x, 3), x.astype(jnp.bfloat16))
    assert TARGET not in _hlo(lambda x: top_k(x, 3, implementation="xla"), x)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_programs_lowered_for_accelerators_do_not_call_the_cpu_kernel(platform):
    x = jnp.ones((4, 10))
    text = _hlo(jax.grad(lambda x: top_k(x, 3, implementation="native")[0].sum()), x,
                platform=platform)
    assert TARGET not in text


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"k=11: must be an integer in \[1, 10\]"):
        top_k(jnp.ones((2, 10)), 11)
    with pytest.raises(ValueError, match=r"k=0"):
        top_k(jnp.ones((2, 10)), 0)
    with pytest.raises(ValueError, match=r"k=2.0: must be an integer"):
        top_k(jnp.ones((2, 10)), 2.0)
    with pytest.raises(ValueError, match="implementation='fast'"):
        top_k(jnp.ones((2, 10)), 1, implementation="fast")
    with pytest.raises(ValueError, match=r"float32; got bfloat16"):
        top_k(jnp.ones((2, 10), jnp.bfloat16), 1, implementation="native")


def test_without_the_kernel_the_default_falls_back_and_explicit_native_errors():
    code = """
import json, jax, jax.numpy as jnp
from jaxsparse.ops.topk import top_k
x = jnp.arange(12.0).reshape(3, 4)
same = bool((top_k(x, 2)[1] == jax.lax.top_k(x, 2)[1]).all())
try:
    top_k(x, 2, implementation="native"); msg = None
except RuntimeError as err:
    msg = str(err)
print(json.dumps({"same": same, "msg": msg}))
"""
    out = run_python(code, env={"JAXSPARSE_NATIVE": "0"})
    assert out["same"] and "could not be built" in out["msg"], out
