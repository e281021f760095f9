"""The native CPU kernels on a mesh (8 emulated devices): a custom call is opaque to XLA, which
would gather its sharded operands onto every device; the partitioning rules of
``jaxsparse.ops.native.partitioning`` run each kernel on the device's own rows instead. Each
case: a batch split over 8 devices compiles with no all-gather (only the all-reduces that the
loss or a weight gradient needs), the kernel is in the program, and values and gradients
equal the XLA reference on one device."""

import pytest

from helpers import run_python

CASES = {
    # Mamba-1 selective scan: x, dt [B, L, d], A [d, N], B, C [B, L, 1, N]
    "selective_scan": """
from jaxsparse.ops.ssm import selective_scan
k = jax.random.split(jax.random.key(0), 5)
args = (jax.random.normal(k[0], (8, 37, 20)), jax.random.normal(k[1], (8, 37, 20)),
        -jnp.exp(jax.random.normal(k[2], (20, 6))), jax.random.normal(k[3], (8, 37, 1, 6)),
        jax.random.normal(k[4], (8, 37, 1, 6)))
rows = (True, True, False, True, True)
def fn(*a, impl):
    return selective_scan(*a, dt_bias=jnp.full((20,), -1.0), implementation=impl)
fast, ref, target = (lambda *a: fn(*a, impl="native")), (lambda *a: fn(*a, impl="sequential")), "selective_scan"
""",
    # Mamba-2 SSD through the same kernel: x [B, L, H, P], dt [B, L, H], A [H], B, C [B, L, 1, N]
    "ssd_native": """
from jaxsparse.ops.ssm import ssd_native, ssd_reference
k = jax.random.split(jax.random.key(1), 5)
args = (jax.random.normal(k[0], (8, 29, 2, 8)), jax.random.normal(k[1], (8, 29, 2)),
        -jnp.exp(jax.random.normal(k[2], (2,))), jax.random.normal(k[3], (8, 29, 1, 6)),
        jax.random.normal(k[4], (8, 29, 1, 6)))
rows = (True, True, False, True, True)
fast = lambda *a: ssd_native(*a, dt_softplus=True)
ref = lambda *a: ssd_reference(*a, dt_softplus=True)
target = "selective_scan"
""",
    # Monarch: x [B, L, n] rows, w1 [b, q, p], w2 [b, s, q] whole (their gradients: all-reduced)
    "monarch": """
from jaxsparse.ops.monarch import monarch_matmul
k = jax.random.split(jax.random.key(2), 3)
args = (jax.random.normal(k[0], (8, 13, 64)), jax.random.normal(k[1], (8, 8, 8)) / 3,
        jax.random.normal(k[2], (8, 8, 8)) / 3)
rows = (True, False, False)
fast = lambda *a: monarch_matmul(*a, implementation="native")
ref = lambda *a: monarch_matmul(*a, implementation="xla")
target = "monarch"
""",
}

RUN = """
import json, jax, jax.numpy as jnp, numpy as np
from helpers import worst
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxsparse.dryrun import collective_summary
{case}
mesh = Mesh(np.array(jax.devices()), ("data",))
placed = [jax.device_put(a, NamedSharding(mesh, P("data") if r else P())) for a, r in zip(args, rows)]
loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
argnums = tuple(range(len(args)))
grad = jax.jit(jax.value_and_grad(loss(fast), argnums=argnums))
hlo = grad.lower(*placed).compile().as_text()
got, want = grad(*placed), jax.value_and_grad(loss(ref), argnums=argnums)(*args)
err = worst(float(jnp.max(jnp.abs(g - w)) / (1 + jnp.max(jnp.abs(w))))
          for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
print(json.dumps({{"collectives": sorted(collective_summary(hlo)), "err": err,
                  "kernels": hlo.count("jaxsparse_" + target)}}))
"""


@pytest.mark.parametrize("name", sorted(CASES))
def test_native_kernels_run_on_each_devices_rows(name):
    out = run_python(RUN.format(case=CASES[name]), devices=8)
    assert out["collectives"] in ([], ["all-reduce"]), out
    assert out["kernels"] >= 2, out  # forward and backward kernels
    assert out["err"] < 1e-4, out
