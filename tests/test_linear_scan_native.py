"""The C++ CPU linear scan behind Hydra's diagonal SSM (jaxsparse/ops/native/linear_scan_cpu.cc):
equal to ``lax.scan`` (values, final state and gradients of decays, inputs and initial state,
widths around its 16-float vectors, one step, long sequences), the CPU default for float32
only, absent from accelerator programs, and a clear error without a build."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import run_python
from jaxsparse.ops.diagonal_ssm import diagonal_ssm, diagonal_ssm_reference, linear_scan

TARGET = "jaxsparse_linear_scan_f32"
BWD_TARGET = "jaxsparse_linear_scan_bwd_f32"


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


def inputs(batch, length, width, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    decay = jax.random.uniform(k[0], (batch, length, width), minval=0.3, maxval=1.0)
    x = jax.random.normal(k[1], (batch, length, width))
    h0 = jax.random.normal(k[2], (batch, width))
    ct_h = jax.random.normal(k[3], (batch, length, width))
    ct_final = jax.random.normal(k[4], (batch, width))
    return decay, x, h0, ct_h, ct_final


@pytest.mark.parametrize("batch,length,width", [
    (1, 1, 1), (2, 9, 3), (3, 37, 16), (2, 20, 17), (1, 300, 40), (4, 64, 130),
    # several 256-channel blocks per row, the last one ragged; one row split into narrow blocks
    (3, 33, 600), (1, 70, 1000)])
def test_kernel_equals_lax_scan_forward_and_gradients(batch, length, width):
    decay, x, h0, ct_h, ct_final = inputs(batch, length, width)

    def run(impl):
        out, vjp = jax.vjp(lambda a, b, h: linear_scan(a, b, h, implementation=impl), decay, x, h0)
        return out + vjp((ct_h, ct_final))

    got, want = run("native"), run("sequential")
    for name, g, w in zip(("h", "final", "d_decay", "d_x", "d_h0"), got, want):
        assert g.shape == w.shape and g.dtype == jnp.float32, name
        assert rel_err(g, w) < 1e-5, (name, rel_err(g, w))


def test_the_diagonal_ssm_through_the_kernel_equals_its_recurrence_with_gradients():
    ks = jax.random.split(jax.random.key(1), 6)
    delta, B, C, U = (jax.random.normal(k, (2, 37, 20)) for k in ks[:4])
    log_lambda, D = jax.random.normal(ks[4], (20,)), jax.random.normal(ks[5], (20,))
    args = (delta, B, C, U, log_lambda, D)
    got = diagonal_ssm(*args, implementation="native")[0]
    assert rel_err(got, diagonal_ssm_reference(*args)) < 1e-5
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
    g = jax.grad(loss(lambda *a: diagonal_ssm(*a, implementation="native")[0]), range(6))(*args)
    g_ref = jax.grad(loss(diagonal_ssm_reference), argnums=range(6))(*args)
    for name, a, b in zip(("delta", "B", "C", "U", "log_lambda", "D"), g, g_ref):
        assert rel_err(a, b) < 1e-4, (name, rel_err(a, b))


def _hlo(fn, *args, platform=None):
    traced = jax.jit(fn).trace(*args)
    lowered = traced.lower(lowering_platforms=(platform,)) if platform else traced.lower()
    return lowered.as_text()


def test_default_takes_the_kernel_on_cpu_for_float32_only():
    decay, x, h0, _, _ = inputs(2, 5, 3)
    assert TARGET in _hlo(lambda a, b: linear_scan(a, b)[0], decay, x)
    grad = jax.grad(lambda a, b: linear_scan(a, b)[0].sum(), (0, 1))
    assert TARGET in _hlo(grad, decay, x)
    bf = (decay.astype(jnp.bfloat16), x.astype(jnp.bfloat16))
    assert TARGET not in _hlo(lambda a, b: linear_scan(a, b)[0], *bf)
    assert TARGET not in _hlo(lambda a, b: linear_scan(a, b, implementation="sequential")[0],
                              decay, x)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_programs_lowered_for_accelerators_do_not_call_the_cpu_kernel(platform):
    decay, x, h0, _, _ = inputs(2, 5, 3)
    grad = jax.grad(lambda a, b: linear_scan(a, b, implementation="native")[0].sum(), (0, 1))
    assert TARGET not in _hlo(grad, decay, x, platform=platform)


def test_bad_requests_are_named():
    decay, x, h0, _, _ = inputs(2, 5, 3)
    with pytest.raises(ValueError, match=r"float32; got \['bfloat16', 'float32'\]"):
        linear_scan(decay.astype(jnp.bfloat16), x, h0, implementation="native")
    with pytest.raises(ValueError, match=r"initial state \(3,\): must be \[batch, width\]"):
        linear_scan(decay, x, h0[0], implementation="native")


def test_without_the_kernel_the_default_falls_back_and_explicit_native_errors():
    code = """
import json, jax.numpy as jnp
from jaxsparse.ops.diagonal_ssm import linear_scan
a = jnp.full((1, 6, 2), 0.5); b = jnp.arange(12.0).reshape(1, 6, 2)
same = bool(jnp.allclose(linear_scan(a, b)[0], linear_scan(a, b, implementation="sequential")[0]))
try:
    linear_scan(a, b, implementation="native"); msg = None
except RuntimeError as err:
    msg = str(err)
print(json.dumps({"same": same, "msg": msg}))
"""
    out = run_python(code, env={"JAXSPARSE_NATIVE": "0"})
    assert out["same"] and "could not be built" in out["msg"], out


def linear_scan_on_a_mesh(implementation):
    """Compile and run the gradient of a loss through ``linear_scan(implementation=...)`` on 8
    emulated devices (data 4 x tensor 2) with the operands split by rows, by rows and
    channels, and over time. Per split: the compiled program's collectives, the native kernels'
    call counts, the sharding rules in the lowering, and the largest error against one
    device's lax.scan gradients."""
    return run_python(f"""
import json, jax, jax.numpy as jnp, numpy as np
from helpers import worst
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxsparse.dryrun import collective_summary
from jaxsparse.ops.diagonal_ssm import linear_scan
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "tensor"))
k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
decay = jax.random.uniform(k1, (8, 40, 22), minval=0.3, maxval=1.0)
x, h0 = jax.random.normal(k2, (8, 40, 22)), jax.random.normal(k3, (8, 22))

def loss(a, b, h, implementation):
    hs, final = linear_scan(a, b, h, implementation=implementation)
    return jnp.sum(jnp.sin(hs)) + jnp.sum(final ** 2)

want = jax.grad(loss, argnums=(0, 1, 2))(decay, x, h0, "sequential")
out = {{}}
for name, spec in (("rows", P("data")), ("rows_channels", P("data", None, "tensor")),
                   ("time", P(None, "data"))):
    inputs = [jax.device_put(decay, NamedSharding(mesh, spec)),
              jax.device_put(x, NamedSharding(mesh, spec)),
              jax.device_put(h0, NamedSharding(mesh, P(spec[0], *spec[2:])))]
    grad = jax.jit(jax.grad(lambda a, b, h: loss(a, b, h, {implementation!r}), argnums=(0, 1, 2)))
    lowered = grad.lower(*inputs)
    hlo = lowered.compile().as_text()
    err = worst(float(jnp.max(jnp.abs(g - w))) for g, w in zip(grad(*inputs), want))
    out[name] = {{"collectives": sorted(collective_summary(hlo)), "err": err,
                 "kernels": [hlo.count("{TARGET}"), hlo.count("{BWD_TARGET}")],
                 "rules": lowered.as_text().count("CustomSPMDPartitioning")}}
print(json.dumps(out))
""", devices=8)


def test_on_a_mesh_the_kernel_runs_on_each_devices_rows_and_channels():
    # a custom call is opaque to XLA, which gathers its sharded operands onto every device
    # unless told otherwise (hydra_1p6b, 8 devices: 144 GiB per step); the partitioning rule
    # keeps batch and channel splits (no gathers; the loss's scalar all-reduce only) and
    # gathers the time axis, which the recurrence needs whole
    out = linear_scan_on_a_mesh(None)
    for name in ("rows", "rows_channels"):
        assert out[name]["collectives"] in ([], ["all-reduce"]), out
    assert "all-gather" in out["time"]["collectives"], out
    for case in out.values():
        assert min(case["kernels"]) >= 1 and case["err"] < 1e-4, out  # forward and backward
