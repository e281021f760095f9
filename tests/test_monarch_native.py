"""The fused C++ CPU Monarch kernel (jaxsparse/ops/native): equal to the XLA reference for
every edge of its tiling (forward and gradients), chosen by default on CPU for float32 only,
absent from programs lowered for accelerators, correct under vmap and sharding, and its build
failing with a clear message rather than a crash."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import run_python
from jaxsparse.ops import native
from jaxsparse.ops.monarch import monarch_matmul, monarch_reference
from jaxsparse.ops.native import monarch as native_monarch

TARGET = "jaxsparse_monarch_f32"


def factors(key, b, p, q, s):
    k1, k2 = jax.random.split(key)
    return (jax.random.normal(k1, (b, q, p)) / np.sqrt(p),
            jax.random.normal(k2, (b, s, q)) / np.sqrt(q))


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


# (lead dims, b, p, q, s). The kernel's edges: token counts that leave a partial tile and rows
# outside its 6-row blocks; output widths with 64-wide, 16-wide and scalar column blocks (83 =
# 64 + 16 + 3); rank-2 blocks (q = 2b); a single token; rectangular both ways.
SHAPES = [
    ((1,), 3, 5, 6, 7),
    ((97,), 4, 20, 48, 83),
    ((2, 5), 16, 16, 16, 16),
    ((200,), 8, 64, 64, 64),
    ((33,), 16, 64, 32, 128),
    ((3, 41), 32, 32, 64, 16),
]


@pytest.mark.parametrize("lead,b,p,q,s", SHAPES)
def test_kernel_equals_the_reference_forward_and_gradients(lead, b, p, q, s):
    w1, w2 = factors(jax.random.key(b * p + s), b, p, q, s)
    x = jax.random.normal(jax.random.key(1), (*lead, b * p))
    ct = jax.random.normal(jax.random.key(2), (*lead, b * s))

    def run(fn):
        y, vjp = jax.vjp(jax.jit(fn), x, w1, w2)
        return (y,) + vjp(ct)

    got = run(lambda *a: monarch_matmul(*a, implementation="native"))
    want = run(lambda *a: monarch_matmul(*a, implementation="xla"))
    for name, g, w in zip(("y", "dx", "dw1", "dw2"), got, want):
        assert g.shape == w.shape and g.dtype == jnp.float32, name
        assert rel_err(g, w) < 1e-5, (name, rel_err(g, w))  # float32: a few ulps of the sums


@pytest.mark.parametrize("chunk", [1, 7, 50])
def test_weight_gradients_summed_in_chunks_of_any_length(monkeypatch, chunk):
    """The backward sums the weight gradients over chunks of tokens (hundreds by default):
    chunks of 1, 7 and 50 tokens, cutting the token tiles anywhere, give the reference's
    gradients."""
    from jaxsparse.ops.native import monarch as native

    monkeypatch.setattr(native, "WEIGHT_GRAD_CHUNK_TOKENS", chunk)
    b, p, q, s = 4, 20, 48, 83
    w1, w2 = factors(jax.random.key(chunk), b, p, q, s)
    x = jax.random.normal(jax.random.key(1), (197, b * p))
    ct = jax.random.normal(jax.random.key(2), (197, b * s))
    grads = {impl: jax.vjp(jax.jit(lambda *a, impl=impl: monarch_matmul(*a, implementation=impl)),
                           x, w1, w2)[1](ct) for impl in ("native", "xla")}
    for name, g, w in zip(("dx", "dw1", "dw2"), grads["native"], grads["xla"]):
        assert rel_err(g, w) < 1e-5, (name, rel_err(g, w))


def _hlo(fn, *args, platform=None):
    traced = jax.jit(fn).trace(*args)
    lowered = traced.lower(lowering_platforms=(platform,)) if platform else traced.lower()
    return lowered.as_text()


def test_default_takes_the_kernel_on_cpu_for_float32_only():
    w1, w2 = factors(jax.random.key(0), 8, 8, 8, 8)
    x = jnp.ones((4, 64))
    assert TARGET in _hlo(monarch_matmul, x, w1, w2)
    bf = lambda a: a.astype(jnp.bfloat16)  # noqa: E731
    assert TARGET not in _hlo(monarch_matmul, bf(x), bf(w1), bf(w2))
    assert TARGET not in _hlo(lambda *a: monarch_matmul(*a, implementation="xla"), x, w1, w2)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_programs_lowered_for_accelerators_do_not_call_the_cpu_kernel(platform):
    w1, w2 = factors(jax.random.key(0), 8, 8, 8, 8)
    x = jnp.ones((4, 64))
    grad = jax.grad(lambda *a: monarch_matmul(*a, implementation="native").sum(), (0, 1, 2))
    text = _hlo(grad, x, w1, w2, platform=platform)
    assert TARGET not in text and "dot_general" in text  # the XLA path instead


def test_vmap_over_inputs_and_over_weights():
    w1, w2 = factors(jax.random.key(3), 4, 8, 8, 12)
    x = jax.random.normal(jax.random.key(4), (3, 10, 32))
    f = jax.jit(jax.vmap(lambda x: monarch_matmul(x, w1, w2, implementation="native")))
    assert rel_err(f(x), monarch_reference(x, w1, w2)) < 1e-6
    scales = jnp.array([1.0, -2.0, 0.5])
    g = jax.jit(jax.vmap(lambda c: monarch_matmul(x[0], c * w1, w2, implementation="native")))
    want = scales.reshape(3, 1, 1) * monarch_reference(x[0], w1, w2)[None]
    assert rel_err(g(scales), want) < 1e-6


def test_zero_tokens_and_large_values_pass_through():
    w1, w2 = factors(jax.random.key(5), 4, 4, 4, 4)
    assert monarch_matmul(jnp.zeros((0, 16)), w1, w2, implementation="native").shape == (0, 16)
    x = jnp.full((5, 16), 1e30)  # float32 overflow must show as inf, as in the reference
    got, want = monarch_matmul(x, w1, w2, implementation="native"), monarch_reference(x, w1, w2)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))


def test_explicit_native_refuses_other_dtypes():
    w1, w2 = factors(jax.random.key(0), 4, 4, 4, 4)
    x = jnp.ones((2, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"implementation='native'.*float32.*bfloat16"):
        monarch_matmul(x, w1.astype(jnp.bfloat16), w2.astype(jnp.bfloat16),
                       implementation="native")


def test_sharded_program_equals_the_single_device_product():
    """Under a 4-device mesh (tokens over "data", blocks of both factors over "model") the
    kernel runs on each device's tokens with the factors gathered whole (its partitioning
    rule); the result must be the reference's."""
    code = """
import json, jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxsparse.ops.monarch import monarch_matmul, monarch_reference
mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
k = jax.random.split(jax.random.key(0), 3)
x = jax.random.normal(k[0], (64, 256)); w1 = jax.random.normal(k[1], (16, 16, 16))
w2 = jax.random.normal(k[2], (16, 16, 16))
put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
xs, w1s, w2s = put(x, P("data")), put(w1, P("model")), put(w2, P("model"))
f = jax.jit(lambda *a: monarch_matmul(*a, implementation="native"))
text = f.lower(xs, w1s, w2s).compile().as_text()
got = np.asarray(f(xs, w1s, w2s)); want = np.asarray(monarch_reference(x, w1, w2))
print(json.dumps({"err": float(np.abs(got - want).max() / np.abs(want).max()),
                  "kernel": "jaxsparse_monarch_f32" in text}))
"""
    out = run_python(code, devices=4)
    assert out["kernel"] and out["err"] < 1e-6, out


# --- the build -------------------------------------------------------------------------------


def test_build_is_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSPARSE_CACHE", str(tmp_path))
    first = native.build("monarch_cpu.cc")
    stamp = first.stat().st_mtime_ns
    assert first.parent == tmp_path / "native" and native.build("monarch_cpu.cc") == first
    assert first.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary left


def test_a_failed_build_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSPARSE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "broken.cc").write_text("this is not C++;\n")
    monkeypatch.setattr(native, "SOURCE_DIR", tmp_path)
    with pytest.raises(native.NativeBuildError, match="failed on broken.cc"):
        native.build("broken.cc")
    assert not list((tmp_path / "cache" / "native").iterdir())  # nothing half-written kept
    monkeypatch.setattr(native, "_compiler", lambda: None)
    with pytest.raises(native.NativeBuildError, match="no C.. compiler"):
        native.build("broken.cc")


def test_without_the_kernel_the_default_falls_back_and_explicit_native_errors():
    code = """
import json, jax.numpy as jnp, warnings
from jaxsparse.ops.monarch import monarch_matmul, monarch_reference
w1 = jnp.ones((4, 4, 4)); w2 = jnp.ones((4, 4, 4)); x = jnp.arange(32.0).reshape(2, 16)
same = bool(jnp.allclose(monarch_matmul(x, w1, w2), monarch_reference(x, w1, w2)))
try:
    monarch_matmul(x, w1, w2, implementation="native"); msg = None
except RuntimeError as err:
    msg = str(err)
print(json.dumps({"same": same, "msg": msg}))
"""
    out = run_python(code, env={"JAXSPARSE_NATIVE": "0"})
    assert out["same"] and "could not be built" in out["msg"], out
    assert json.dumps(out)


def test_benchmark_times_both_paths_and_both_passes_against_dense(tmp_path):
    from jaxsparse.cli import bench_dir
    import runpy

    bench = runpy.run_path(str(bench_dir() / "monarch.py"))
    bench["main"](["--d", "64", "--tokens", "48", "--repeats", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "monarch.json").read_text())["rows"]
    assert {(r["pass"], r["implementation"]) for r in rows} == {
        (p, i) for p in ("forward", "forward+backward") for i in ("xla", "native")}
    assert all(r["speedup"] > 0 and r["flop_ratio"] == 4 for r in rows)


def test_gradients_are_bitwise_reproducible():
    """Weight gradients are summed per fixed group of tiles in a fixed order, never in the
    order threads happen to finish."""
    w1, w2 = factors(jax.random.key(9), 8, 64, 64, 64)
    x = jax.random.normal(jax.random.key(10), (1000, 512))  # 11 tiles of 96 tokens
    ct = jax.random.normal(jax.random.key(11), (1000, 512))
    grad = jax.jit(lambda *a: jax.vjp(
        lambda *b: monarch_matmul(*b, implementation="native"), *a)[1](ct))
    first = grad(x, w1, w2)
    for _ in range(3):
        for a, b in zip(first, grad(x, w1, w2)):
            np.testing.assert_array_equal(a, b)
