"""The linear-scan kernels behind Hydra's diagonal SSM (GPU/Triton and TPU/Mosaic,
pallas_kernels/linear_scan*.py): interpret mode against ``lax.scan`` (states, final state and
the VJP of decays, inputs and initial state; odd lengths and widths, padded inside), packed
documents through the diagonal SSM, the CPU fallback, and lowering of the forward and backward
kernels for CUDA and TPU from this CPU host, including Hydra's training step."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse import models
from jaxsparse.config import ConfigError, validate
from jaxsparse.ops.diagonal_ssm import diagonal_ssm, linear_scan
from jaxsparse.ops.linear_scan_pallas import kernel_linear_scan
from test_linear_scan_native import inputs as native_scan_inputs, linear_scan_on_a_mesh


def inputs(batch, length, width, seed=0, dtype=jnp.float32):
    """The C++ scan tests' random scan, split into primals (cast to ``dtype``) and cotangents."""
    decay, x, h0, ct_h, ct_final = native_scan_inputs(batch, length, width, seed)
    return tuple(t.astype(dtype) for t in (decay, x, h0)), (ct_h, ct_final)


def value_and_vjp(scan):
    """Compiled (interpreted kernels dispatch every step op by op otherwise)."""
    @jax.jit
    def run(primals, cotangents):
        out, vjp = jax.vjp(scan, *primals)
        return out, vjp(tuple(c.astype(o.dtype) for c, o in zip(cotangents, out)))
    return run


def check_against_lax_scan(scan, primals, cotangents, tol):
    (hs, final), grads = value_and_vjp(scan)(primals, cotangents)
    reference = lambda a, b, h: linear_scan(a, b, h, implementation="sequential")  # noqa: E731
    (ref_hs, ref_final), ref_grads = value_and_vjp(reference)(primals, cotangents)
    f32 = lambda t: np.asarray(t, np.float32)  # noqa: E731
    np.testing.assert_allclose(f32(hs), f32(ref_hs), atol=tol, rtol=tol)
    np.testing.assert_allclose(f32(final), f32(ref_final), atol=tol, rtol=tol)
    for name, g, g_ref in zip(("decay", "inputs", "initial"), grads, ref_grads):
        assert g.shape == g_ref.shape and g.dtype == g_ref.dtype, name
        scale = float(jnp.abs(g_ref.astype(jnp.float32)).max()) + 1e-6
        np.testing.assert_allclose(f32(g), f32(g_ref), atol=tol * scale, rtol=tol,
                                   err_msg=f"d{name}")


# one step and one channel; a ragged time block and a ragged channel block; several of each
SHAPES = [(1, 1, 1), (2, 37, 130), (3, 70, 300)]


@pytest.mark.parametrize("batch, length, width", SHAPES)
def test_gpu_kernel_in_interpret_mode_equals_lax_scan(batch, length, width):
    primals, cotangents = inputs(batch, length, width)
    scan = lambda a, b, h: linear_scan(a, b, h, implementation="pallas_interpret")  # noqa: E731
    check_against_lax_scan(scan, primals, cotangents, 2e-5)


@pytest.mark.parametrize("batch, length, width", SHAPES[1:])
def test_tpu_kernel_in_interpret_mode_equals_lax_scan(batch, length, width):
    """On hardware a time block is 64 steps; 8 here keeps the unrolled trace small and crosses
    block edges (interpret mode does not check tiling)."""
    primals, cotangents = inputs(batch, length, width, seed=1)

    def scan(a, b, h):
        return kernel_linear_scan(a, b, h, backend="tpu", interpret=True, block_t=8)

    check_against_lax_scan(scan, primals, cotangents, 2e-5)


def test_bf16_inputs_accumulate_in_float32():
    """The kernel keeps its state in float32 and returns b's dtype; the float32 recurrence on
    the same bf16-rounded inputs is the reference (bf16 output rounding: 2^-8 relative)."""
    (a, b, h0), _ = inputs(2, 300, 40, seed=2, dtype=jnp.bfloat16)
    hs, final = jax.jit(lambda *p: linear_scan(*p, implementation="pallas_interpret"))(a, b, h0)
    f32 = lambda t: t.astype(jnp.float32)  # noqa: E731
    ref_hs, ref_final = linear_scan(f32(a), f32(b), f32(h0), implementation="sequential")
    assert hs.dtype == final.dtype == jnp.bfloat16
    np.testing.assert_allclose(f32(hs), ref_hs, atol=2**-8 * float(jnp.abs(ref_hs).max()),
                               rtol=2**-7)
    np.testing.assert_allclose(f32(final), ref_final, atol=2**-8 * float(jnp.abs(ref_final).max()),
                               rtol=2**-7)


def test_diagonal_ssm_on_packed_documents_through_the_kernel():
    """Packed documents zero the decay at a document start before the scan: the kernel gives the
    lax.scan results, values and gradients of every input."""
    ks = jax.random.split(jax.random.key(3), 6)
    delta, B, C, U = (jax.random.normal(k, (2, 41, 20)) for k in ks[:4])
    args = (delta, B, C, U, jax.random.normal(ks[4], (20,)), jax.random.normal(ks[5], (20,)))
    ids = jnp.asarray(np.repeat([[0, 1, 2, 3, 4], [7, 7, 7, 7, 7]], [1, 15, 1, 16, 8], axis=1))

    def loss(impl):
        def f(*a):
            y, final = diagonal_ssm(*a, implementation=impl, segment_ids=ids)
            return jnp.sum(jnp.sin(y)) + jnp.sum(final)
        return jax.jit(jax.value_and_grad(f, argnums=range(6)))

    (value, grads), (ref_value, ref_grads) = loss("pallas_interpret")(*args), loss("sequential")(*args)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for name, g, g_ref in zip(("delta", "B", "C", "U", "log_lambda", "D"), grads, ref_grads):
        np.testing.assert_allclose(g, g_ref, atol=1e-5 * float(jnp.abs(g_ref).max()), rtol=1e-4,
                                   err_msg=f"d{name}")


def test_pallas_on_cpu_runs_the_associative_scan():
    (a, b, h0), _ = inputs(2, 50, 12, seed=4)
    got = linear_scan(a, b, h0, implementation="pallas")
    want = linear_scan(a, b, h0, implementation="sequential")
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
    text = jax.jit(lambda *p: linear_scan(*p, implementation="pallas")).lower(a, b, h0).as_text()
    assert "triton" not in text and "tpu_custom_call" not in text


def test_on_a_mesh_each_device_scans_its_own_rows_and_channels():
    """The kernel sits behind the partitioning rule of the native scan: on 8 emulated devices,
    batch and channel splits stay split (no collective but the loss's all-reduce) and each
    device's share is padded to whole kernel blocks there (22 channels over 2 devices: 11 each);
    a split time axis is gathered. Values and gradients equal one device's lax.scan."""
    out = linear_scan_on_a_mesh("pallas_interpret")
    for name in ("rows", "rows_channels"):
        assert out[name]["collectives"] in ([], ["all-reduce"]), out
    assert "all-gather" in out["time"]["collectives"], out
    for case in out.values():
        assert case["rules"] == 2 and case["err"] < 1e-4, out  # the forward and reverse scans


KERNEL_CALL = {"cuda": r"custom_call @__gpu\$xla\.gpu\.triton", "tpu": r"custom_call @tpu_custom_call"}


def _count(fn, args, platform):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    return len(re.findall(KERNEL_CALL[platform], text))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_kernels_lower_from_a_cpu_host(platform, request):
    if platform == "tpu":
        request.getfixturevalue("tpu_lowering_target")
    (a, b, h0), _ = inputs(4, 1000, 384, seed=5)
    scan = lambda a, b, h: linear_scan(a, b, h, implementation="pallas")  # noqa: E731

    def loss(*p):
        hs, final = scan(*p)
        return jnp.sum(hs) + jnp.sum(final)

    assert _count(scan, (a, b, h0), platform) == 1
    # the gradient: the forward kernel, and the same kernel once more for the reverse scan
    assert _count(jax.grad(loss, argnums=(0, 1, 2)), (a, b, h0), platform) == 2


def test_hydra_training_step_lowers_the_kernel_for_cuda():
    """``model.hydra_scan_impl=pallas``: every block's SSM runs the kernel (forward and the
    reverse scan of its gradient) in the CUDA lowering of a training loss; a bad value is named
    before anything is built."""
    from flax import nnx

    from test_hydra import small_config

    cfg = validate(small_config("model.hydra_scan_impl=pallas"))
    model = models.build(cfg.model, nnx.Rngs(0))
    tokens = jnp.zeros((2, cfg.data.seq_len), jnp.int32)
    graph, state = nnx.split(model)

    def gradients(state, tokens):
        loss = lambda m: jnp.mean(m(tokens).astype(jnp.float32) ** 2)  # noqa: E731
        return nnx.grad(loss)(nnx.merge(graph, state))

    assert _count(gradients, (state, tokens), "cuda") == 2 * cfg.model.n_layers
    with pytest.raises(ConfigError, match=r"model.hydra_scan_impl='cuda': allowed"):
        validate(small_config("model.hydra_scan_impl=cuda"))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU (run experiments/gpu_check.sh on one)")
def test_kernel_on_gpu_equals_lax_scan():
    primals, cotangents = inputs(8, 4096, 1000, seed=6)
    scan = lambda a, b, h: linear_scan(a, b, h, implementation="pallas")  # noqa: E731
    check_against_lax_scan(scan, primals, cotangents, 1e-4)
