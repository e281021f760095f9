"""The selective-scan kernels (GPU/Triton and TPU/Mosaic): interpret mode against the lax.scan
recurrence (outputs, final state and the gradient of every input; one document and packed
documents, whose starts reset the state), and lowering of the forward and backward kernels
for CUDA and for TPU from this CPU host."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import run_python
from jaxsparse.ops.segments import keep_factor
from jaxsparse.ops.ssm import _final_dt, selective_scan
from jaxsparse.ops.ssm_pallas import kernel_scan
from test_ssm import DIFFERENTIABLE, mamba1_inputs


def _loss(implementation, args):
    def loss(diff):
        y, final = selective_scan(**(args | diff), return_final_state=True,
                                  implementation=implementation)
        return jnp.sum(y.astype(jnp.float32) * jnp.cos(y.astype(jnp.float32))) + jnp.sum(final)
    return loss


# length, d_inner, d_state, groups: odd lengths and widths (padded inside), several groups.
# Interpret mode is slow on 2 cores: the default run keeps L7 and L129 (several time blocks,
# groups, padding); L1 and L1000 run with -m slow.
_slow = pytest.mark.slow
CASES = [pytest.param(1, 8, 4, 1, id="L1", marks=_slow), pytest.param(7, 40, 5, 2, id="L7"),
         pytest.param(129, 64, 16, 2, id="L129"),
         pytest.param(1000, 24, 3, 3, id="L1000", marks=_slow)]


@pytest.mark.parametrize("length, d_inner, d_state, groups", CASES)
def test_gpu_kernel_in_interpret_mode_matches_the_recurrence(length, d_inner, d_state, groups):
    args = mamba1_inputs(length, 2, length, d_inner, d_state, groups)
    def scan(impl):  # compiled: op by op, the interpreted kernel dispatches every step
        return jax.jit(lambda a: selective_scan(**a, return_final_state=True,
                                                implementation=impl))(args)

    (y, final), (ref_y, ref_final) = scan("pallas_interpret"), scan("sequential")
    np.testing.assert_allclose(y, ref_y, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(final, ref_final, atol=2e-5, rtol=2e-5)
    diff = {name: args[name] for name in DIFFERENTIABLE}
    grads = jax.jit(jax.grad(_loss("pallas_interpret", args)))(diff)
    ref_grads = jax.jit(jax.grad(_loss("sequential", args)))(diff)
    for name in DIFFERENTIABLE:
        scale = float(jnp.abs(ref_grads[name]).max()) + 1e-6
        np.testing.assert_allclose(grads[name], ref_grads[name], atol=1e-4 * scale, rtol=1e-4,
                                   err_msg=f"d{name}")


def test_gpu_kernel_bf16_inputs_accumulate_in_float32():
    args = mamba1_inputs(5, 2, 300, 32, 16, 1, dtype=jnp.bfloat16)
    y = selective_scan(**args, implementation="pallas_interpret")
    # the reference sees the same bf16-rounded inputs, in float32 all the way
    as_f32 = {k: v.astype(jnp.float32) for k, v in args.items()}
    ref = selective_scan(**as_f32, implementation="sequential")
    assert y.dtype == jnp.bfloat16
    scale = float(jnp.abs(ref).max())
    np.testing.assert_allclose(y.astype(jnp.float32), ref, atol=2 * 2**-8 * scale, rtol=2**-7)


def _resets(batch, length, starts):
    """segment ids whose row 0 opens a new document at each of ``starts``; other rows hold one."""
    ids = np.zeros((batch, length), np.int32)
    for s in starts:
        ids[0, s:] += 1
    return jnp.asarray(ids)


def _check_kernel_against_recurrence(backend, block_t, args, ids):
    """kernel_scan (interpret mode) against the lax.scan recurrence with the same segment ids:
    outputs, final state and the VJP of every differentiable input."""
    dt = _final_dt(args["dt"], args["dt_bias"], True)
    primals = (args["x"], dt, args["A"], args["B"], args["C"], args["initial_state"])
    keep = None if ids is None else keep_factor(ids, *ids.shape)

    def kernel(*p):
        return kernel_scan(*p, keep, backend=backend, interpret=True, block_t=block_t)

    def ref(x, dt, A, B, C, h0):
        return selective_scan(x, dt, A, B, C, initial_state=h0, dt_softplus=False,
                              return_final_state=True, implementation="sequential",
                              segment_ids=ids)

    def value_and_vjp(fn):  # compiled: interpreted kernels dispatch every step op by op
        def run(primals, cotangent_of):
            out, vjp = jax.vjp(fn, *primals)
            return out, vjp(cotangent_of(out))
        return jax.jit(run, static_argnums=1)

    cotangent_of = lambda out: (jnp.cos(out[0]), jnp.sin(out[1]))  # noqa: E731
    (y, final), grads = value_and_vjp(kernel)(primals, cotangent_of)
    (ref_y, ref_final), ref_grads = value_and_vjp(ref)(primals, cotangent_of)
    np.testing.assert_allclose(y, ref_y, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(final, ref_final, atol=2e-5, rtol=2e-5)
    for name, g, g_ref in zip(("x", "dt", "A", "B", "C", "h0"), grads, ref_grads):
        scale = float(jnp.abs(g_ref).max()) + 1e-6
        np.testing.assert_allclose(g, g_ref, atol=1e-4 * scale, rtol=1e-4, err_msg=f"d{name}")


@pytest.mark.parametrize("length, d_inner, d_state, groups",
                         [(21, 130, 5, 1), pytest.param(19, 256, 16, 2, marks=pytest.mark.slow)])
def test_tpu_kernel_in_interpret_mode_matches_the_recurrence(length, d_inner, d_state, groups):
    """The TPU kernel's logic in interpret mode. On hardware its time block is 128 (a lane
    width); interpret mode does not check tiling, so a block of 8 keeps the unrolled trace
    small here while running the same code (block boundaries included)."""
    args = mamba1_inputs(length, 2, length, d_inner, d_state, groups)
    _check_kernel_against_recurrence("tpu", 8, args, None)


# Document starts at step 1, at a time-block edge and one step past it (both backends' test
# blocks: 8 for TPU, the GPU's 16), twice in a row, and in the last (padded) block.
RESET_STARTS = (1, 8, 9, 16, 17, 30)


@pytest.mark.parametrize("backend, block_t", [("gpu", None), ("tpu", 8)])
def test_kernels_reset_the_state_where_packed_documents_start(backend, block_t):
    d_inner = 130 if backend == "tpu" else 40  # TPU: a full and a partial 128-lane block
    args = mamba1_inputs(11, 2, 37, d_inner, 5, 1)
    _check_kernel_against_recurrence(backend, block_t, args, _resets(2, 37, RESET_STARTS))


def _scan_fn(args, segment_ids=None):
    def f(x, dt, B, C):
        return selective_scan(x, dt, args["A"], B, C, D=args["D"], z=args["z"],
                              dt_bias=args["dt_bias"], implementation="pallas",
                              segment_ids=segment_ids)
    return f, (args["x"], args["dt"], args["B"], args["C"])


def _count(fn, primals, platform, pattern):
    text = jax.jit(fn).trace(*primals).lower(lowering_platforms=(platform,)).as_text()
    return len(re.findall(pattern, text))


def _grad(f):
    return jax.grad(lambda *p: f(*p).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3))


# with segment ids too: packed documents run the kernels, not the chunked XLA scan
PACKED = pytest.mark.parametrize("packed", [False, True], ids=["one document", "packed"])


@PACKED
def test_kernels_lower_for_cuda_from_a_cpu_host(packed):
    ids = _resets(2, 300, (3, 150)) if packed else None
    f, primals = _scan_fn(mamba1_inputs(0, 2, 300, 96, 16, 2, dtype=jnp.bfloat16), ids)
    triton = r"custom_call @__gpu\$xla\.gpu\.triton"
    assert _count(f, primals, "cuda", triton) == 1  # forward
    assert _count(_grad(f), primals, "cuda", triton) == 2  # forward (saving states) + backward


@PACKED
def test_kernels_lower_for_tpu_from_a_cpu_host(tpu_lowering_target, packed):
    ids = _resets(2, 300, (3, 150)) if packed else None
    f, primals = _scan_fn(mamba1_inputs(0, 2, 300, 256, 16, 2, dtype=jnp.bfloat16), ids)
    mosaic = r"custom_call @tpu_custom_call"
    assert _count(f, primals, "tpu", mosaic) == 1
    assert _count(_grad(f), primals, "tpu", mosaic) == 2


@PACKED
def test_pallas_on_cpu_runs_the_chunked_scan(packed):
    args = mamba1_inputs(1, 2, 50, 8, 4, 1)
    ids = _resets(2, 50, (7, 20)) if packed else None
    y = selective_scan(**args, implementation="pallas", segment_ids=ids)
    want = selective_scan(**args, implementation="sequential", segment_ids=ids)
    np.testing.assert_allclose(y, want, atol=2e-5, rtol=2e-5)


def test_on_a_mesh_each_device_scans_its_own_rows():
    """The kernels sit behind the native scan's row rule: on 8 emulated devices with the batch
    split 4 ways (and packed documents), no collective but the all-reduces of A's gradient and
    the loss; values and gradients equal one device's recurrence."""
    out = run_python("""
import json, jax, jax.numpy as jnp, numpy as np
from helpers import worst
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxsparse.dryrun import collective_summary
from jaxsparse.ops.ssm import selective_scan
from test_ssm import mamba1_inputs
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "tensor"))
args = mamba1_inputs(0, 8, 21, 40, 4, 2)
ids = jnp.cumsum(jax.random.bernoulli(jax.random.key(1), 0.2, (8, 21)).astype(jnp.int32), 1)
names = ("x", "dt", "A", "B", "C", "initial_state")

def loss(diff, impl):
    y, final = selective_scan(**(args | diff), segment_ids=ids, implementation=impl,
                              return_final_state=True)
    return jnp.sum(jnp.sin(y)) + jnp.sum(final ** 2)

diff = {n: args[n] for n in names}
want = jax.grad(loss)(diff, "sequential")
rows = {n: jax.device_put(v, NamedSharding(mesh, P() if n == "A" else P("data")))
        for n, v in diff.items()}
grad = jax.jit(jax.grad(lambda d: loss(d, "pallas_interpret")))
lowered = grad.lower(rows)
got = grad(rows)
print(json.dumps({"collectives": sorted(collective_summary(lowered.compile().as_text())),
                  "rules": lowered.as_text().count("CustomSPMDPartitioning"),
                  "err": worst(float(jnp.max(jnp.abs(got[n] - want[n])) /
                                   (jnp.max(jnp.abs(want[n])) + 1e-6)) for n in names)}))
""", devices=8)
    assert out["collectives"] in ([], ["all-reduce"]), out
    assert out["rules"] == 2 and out["err"] < 1e-4, out  # the forward and backward kernels


def test_tpu_kernel_refuses_groups_that_split_a_lane_block():
    a = mamba1_inputs(0, 1, 8, 96, 4, 2)
    with pytest.raises(ValueError, match=r"d_inner/groups \(=48\)"):
        kernel_scan(a["x"], a["dt"], a["A"], a["B"], a["C"], a["initial_state"], backend="tpu",
                    interpret=True)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_padding_channel_blocks_read_an_existing_group(backend):
    """Channel blocks past groups·per_group (padding) map to the last B/C group, never to group
    ``groups``, which does not exist: interpret mode clamps an out-of-range block index (so the
    scan tests cannot see it), a TPU reads past the array. The TPU kernel's map was unclamped."""
    from pallas_kernels import selective_scan, selective_scan_tpu

    cfg = selective_scan.scan_config(backend=backend, interpret=True, groups=2, per_group=128,
                                     block_t=8, block_d=128)
    if backend == "tpu":
        col = selective_scan_tpu._specs(cfg, 4, 1, reverse=False)["col"].index_map
        groups = [int(col(0, c, 0)[1]) for c in range(4)]  # 2 real channel blocks, 2 padding
    else:
        groups = [int(selective_scan._group_of(cfg)(c)) for c in range(4)]
    assert groups == [0, 1, 1, 1]


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU (run experiments/gpu_check.sh on one)")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@PACKED
def test_kernel_on_gpu_matches_the_recurrence(dtype, packed):
    args = mamba1_inputs(9, 2, 1000, 256, 16, 1, dtype=dtype)
    if packed:
        args["segment_ids"] = _resets(2, 1000, (1, 16, 17, 500, 999))
    y = selective_scan(**args, implementation="pallas")
    ref = selective_scan(**args, implementation="sequential")
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-4
    np.testing.assert_allclose(y.astype(jnp.float32), ref.astype(jnp.float32), atol=tol, rtol=tol)
    diff = {name: args[name] for name in DIFFERENTIABLE}
    grads = jax.grad(_loss("pallas", args))(diff)
    ref_grads = jax.grad(_loss("sequential", args))(diff)
    for name in DIFFERENTIABLE:
        scale = float(jnp.abs(ref_grads[name].astype(jnp.float32)).max()) + 1e-6
        np.testing.assert_allclose(grads[name].astype(jnp.float32),
                                   ref_grads[name].astype(jnp.float32), atol=4 * tol * scale,
                                   rtol=4 * tol, err_msg=f"d{name}")
