"""Expert parallelism: the ragged all-to-all (its CPU emulation against the collective's
definition, its lowering to the collective for TPU and CUDA) and the expert-parallel MoE layer
against one device, values and gradients, including the worst-case routing that fills the
receive buffers and chunk-level routing of lengths the chunk does not divide."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from helpers import run_python
from jaxsparse.parallel.ragged import ragged_all_to_all

N_DEVICES, ROWS_IN, ROWS_OUT, MAX_SEND, WIDTH = 4, 12, 30, 5, 3


def _exchange(mesh):
    """The exchange over mesh axis ``x``, its arguments stacked per device."""
    def local(operand, output, *meta):
        meta = [m[0] for m in meta]
        return ragged_all_to_all(operand[0], output[0], *meta, "x", max_send=MAX_SEND)[None]

    spec = P("x")
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 6, out_specs=spec))


def _random_exchange(seed: int, slices_per_device: int, n: int = N_DEVICES):
    """Arguments of a ragged all-to-all over ``n`` devices, per device (leading axis):
    slices of random sizes (zero included), sent from scattered input offsets to receivers
    that place them at increasing offsets after a gap."""
    rng = np.random.default_rng(seed)
    s = slices_per_device
    sizes = rng.integers(0, 3, size=(n, n * s)).astype(np.int32)  # [sender, slice]
    input_offsets = np.zeros_like(sizes)
    for sender in range(n):
        # slices may overlap: they are read, never written
        input_offsets[sender] = rng.integers(0, ROWS_IN - MAX_SEND + 1, size=n * s)
    # receiver j gets slices i in [j*s, (j+1)*s) from every sender and places them in a
    # random order (not by sender: expert parallelism places them by expert), a gap of one
    # row after each
    output_offsets = np.zeros_like(sizes)
    recv_sizes = np.zeros_like(sizes)
    for receiver in range(n):
        at = 1
        for pair in rng.permutation(n * s):
            sender, t = divmod(int(pair), s)
            i = receiver * s + t
            output_offsets[sender, i] = at
            recv_sizes[receiver, sender * s + t] = sizes[sender, i]
            at += sizes[sender, i] + 1
        assert at <= ROWS_OUT
    operand = rng.normal(size=(n, ROWS_IN, WIDTH)).astype(np.float32)
    output = rng.normal(size=(n, ROWS_OUT, WIDTH)).astype(np.float32)
    return operand, output, input_offsets, sizes, output_offsets, recv_sizes


def _by_definition(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes):
    """The loop of ``jax.lax.ragged_all_to_all``'s docstring, over all devices at once."""
    n, slices = send_sizes.shape
    per_device = slices // n
    result = output.copy()
    for sender in range(n):
        for i in range(slices):
            size, start = send_sizes[sender, i], input_offsets[sender, i]
            at = output_offsets[sender, i]
            result[i // per_device, at:at + size] = operand[sender, start:start + size]
    return result


def emulation_errors(mesh) -> dict:
    """Run by :data:`EMULATION` on ``N_DEVICES`` devices: the emulation's largest differences
    from the definition, in values and in gradients (every sent row gets the cotangent of the
    place it landed; the output keeps the cotangent where nothing was written); and which
    exchange the function's program holds when lowered for each platform."""
    errors = {}
    for slices_per_device in (1, 2):
        args = _random_exchange(seed=slices_per_device, slices_per_device=slices_per_device)
        exchange = _exchange(mesh)
        value_err = np.abs(np.asarray(exchange(*args)) - _by_definition(*args)).max()
        cotangent = np.random.default_rng(9).normal(size=args[1].shape).astype(np.float32)
        d_operand, d_output = jax.grad(
            lambda op, out: jnp.sum(exchange(op, out, *args[2:]) * cotangent), argnums=(0, 1))(
            *args[:2])
        tags = np.arange(N_DEVICES * ROWS_IN, dtype=np.float32).reshape(N_DEVICES, ROWS_IN, 1)
        landed = _by_definition(np.broadcast_to(tags, args[0].shape), np.full(args[1].shape, -1.0),
                                *args[2:])[..., 0].astype(int)  # the operand row each place holds
        want_operand = np.zeros((N_DEVICES * ROWS_IN, WIDTH), np.float32)
        np.add.at(want_operand, landed[landed >= 0], cotangent[landed >= 0])
        want_output = np.where((landed < 0)[..., None], cotangent, 0.0)
        errors[slices_per_device] = {
            "values": float(value_err),
            "d_operand": float(np.abs(d_operand - want_operand.reshape(args[0].shape)).max()),
            "d_output": float(np.abs(d_output - want_output).max()),
            "rows_sent": int(args[3].sum())}
    # the function chooses by the platform it is lowered for, not the host's
    lowered = {platform: exchange.trace(*args).lower(lowering_platforms=(platform,)).as_text()
               for platform in ("cpu", "tpu", "cuda")}
    return {"errors": errors,
            "ragged": {p: "ragged_all_to_all" in text for p, text in lowered.items()},
            "plain": {p: text.count("all_to_all") - text.count("ragged_all_to_all")
                      for p, text in lowered.items()}}


EMULATION = """
import json, jax, numpy as np
from jax.sharding import Mesh
from test_expert_parallel import emulation_errors
print(json.dumps(emulation_errors(Mesh(np.array(jax.devices()), ("x",)))))
"""


def test_cpu_emulation_follows_the_collectives_definition_values_and_gradients():
    """4 emulated devices, one and two slices per peer, sizes 0-2 rows at scattered offsets,
    placed in a shuffled order with gaps: exactly the docstring's loop of
    ``jax.lax.ragged_all_to_all``. Lowered for TPU and CUDA (from this CPU host) the program
    holds the collective, for CPU two plain all-to-alls instead."""
    out = run_python(EMULATION, devices=N_DEVICES)
    assert out["ragged"] == {"cpu": False, "tpu": True, "cuda": True}, out
    assert out["plain"] == {"cpu": 2, "tpu": 0, "cuda": 0}, out
    for slices, errors in out["errors"].items():
        assert errors["rows_sent"] > 0, (slices, errors)
        assert errors["values"] == 0.0 and errors["d_output"] == 0.0, (slices, errors)
        assert errors["d_operand"] < 1e-6, (slices, errors)


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="needs a CUDA GPU (run experiments/gpu_check.sh on one)")
def test_the_collective_on_a_gpu_follows_the_definition_like_the_emulation():
    """On one GPU (three slices to itself) the program holds XLA's ragged all-to-all, whose
    results must agree with the definition the CPU emulation is tested against."""
    mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
    args = _random_exchange(seed=3, slices_per_device=3, n=1)
    assert args[3].sum() > 0
    np.testing.assert_array_equal(_exchange(mesh)(*args), _by_definition(*args))


def test_bad_exchange_arguments_are_refused():
    x, sizes = jnp.zeros((4, 2)), jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="max_send=0"):
        ragged_all_to_all(x, x, sizes, sizes, sizes, sizes, "x", max_send=0)
    with pytest.raises(ValueError, match="must agree past the first axis"):
        ragged_all_to_all(x, jnp.zeros((4, 3)), sizes, sizes, sizes, sizes, "x", max_send=2)
    with pytest.raises(ValueError, match="1-D of one length"):
        ragged_all_to_all(x, x, sizes, sizes[:1], sizes, sizes, "x", max_send=2)
    with pytest.raises(ValueError, match="implementation='nccl'"):
        ragged_all_to_all(x, x, sizes, sizes, sizes, sizes, "x", max_send=2, implementation="nccl")


LAYER = r"""
import json, jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P
from helpers import sharded_gradient_check
from jaxsparse.nn import MoE
from jaxsparse.parallel import PRESETS, activation_sharding
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("fsdp", "expert"))
rules = PRESETS["fsdp_tp_ep"].rules
x = jax.random.normal(jax.random.key(1), (8, 20, 16))
cases = {
    "top-2": (dict(k=2), x),
    # top-1 as in Switch, with the raw probability as the weight: renormalised it is 1, the
    # router's gradient is rounding noise on both sides, and compared it failed on AVX2 hosts
    "top-1, 3 tokens per row": (dict(k=1, renormalize=False), x[:, :3]),
    # every token's choices are experts 2 and 3, both on one device: each device sends that
    # device all its 2 x 20 assignments, the worst case the receive buffer is sized for
    "all tokens to one device": (dict(k=2, worst=True), jnp.abs(x) + 0.1),
    "chunk routing, length 20, chunk 8": (dict(k=2, chunk=8), x),
    "k schedule (zero-weight choices)": (dict(k=1, k_end=3, k_schedule_steps=10,
                                              renormalize=False), x),
    "capacity 1.0 (drops)": (dict(k=2, capacity_factor=1.0), x),
    "bfloat16 (worst-case buffers on CPU)": (dict(k=2, dtype=jnp.bfloat16), x),
}
out = {}
for name, (kw, x) in cases.items():
    worst = kw.pop("worst", False)
    moe = MoE(16, 24, 8, kw.pop("k"), rngs=nnx.Rngs(0), **kw)
    if worst:
        moe.router.kernel[...] = jnp.zeros((16, 8)).at[:, 2].set(1.0).at[:, 3].set(0.5)
    moe.eval()  # no step counter to advance inside the loss
    graphdef, state, rest = nnx.split(moe, nnx.Param, ...)
    params = nnx.to_pure_dict(state)

    def loss(p, x, mesh=None):
        with activation_sharding(mesh, rules):
            return jnp.sum(jnp.sin(nnx.merge(graphdef, p, rest)(x)) * x)

    collectives, err = sharded_gradient_check(loss, params, state, x, mesh, rules,
                                              P(("fsdp", "expert")))
    # the exchange each platform's program holds (lowered from this CPU host)
    grad = jax.jit(jax.grad(lambda p, x: loss(p, x, mesh)))
    text = {platform: grad.trace(params, x).lower(lowering_platforms=(platform,)).as_text()
            for platform in ("cpu", "tpu")}
    out[name] = {"collectives": collectives, "err": err,
                 "tpu_ragged": "ragged_all_to_all" in text["tpu"],
                 "cpu_ragged": "ragged_all_to_all" in text["cpu"],
                 "cpu_grouped_kernel": "jaxsparse_grouped_matmul" in text["cpu"]}
print(json.dumps(out))
"""


def test_expert_parallel_layer_equals_one_device():
    """fsdp2 x expert4 (8 emulated devices, 8 experts: two per device): the dropless layer's
    gradients (for parameters and input) equal one device's whatever the routing — random,
    every token to one device's experts, chunk-level routing of a length the chunk does not
    divide (refused before: the per-token router inputs were not passed in), zero-weight
    choices of the k schedule, bfloat16 — and the experts really were exchanged. Lowered for
    TPU the dropless program holds the ragged all-to-all; for CPU it runs the emulated
    exchange with the C++ grouped kernel (float32), or worst-case buffers (bfloat16). With a
    capacity the drops are per device, so its values are not compared."""
    out = run_python(LAYER, devices=8)
    for name, result in out.items():
        assert result["collectives"].get("all-to-all", 0) > 0, (name, result)
        if name.startswith("bfloat16"):  # one device runs row tiles, eight run buffers
            assert result["err"] < 4 * 2.0 ** -8, (name, result)
        elif not name.startswith("capacity"):
            assert result["err"] < 2e-6, (name, result)
        dropless = not name.startswith("capacity")
        assert result["tpu_ragged"] == dropless and not result["cpu_ragged"], (name, result)
        # on CPU the ragged path (emulated) runs the grouped kernel; the buffers do not
        ragged_on_cpu = dropless and not name.startswith("bfloat16")
        assert result["cpu_grouped_kernel"] == ragged_on_cpu, (name, result)


UNEVEN_DOCUMENTS = """
import json
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import Mesh
from jaxsparse.nn import MoE
from jaxsparse.nn.intermediates import run_capturing
from jaxsparse.parallel import PRESETS, activation_sharding

x = jax.random.normal(jax.random.key(1), (4, 64, 32))
# rows 0-1 (the first device's) one document each; rows 2-3 four: each document's first chunk
# is not counted, so the devices count different numbers of routing decisions
segment_ids = np.zeros((4, 64), np.int32)
segment_ids[2:] = sum((np.arange(64) >= start).astype(np.int32) for start in (8, 24, 40))
moe = MoE(32, 64, 4, 1, rngs=nnx.Rngs(0), renormalize=False, chunk=16)
_, one = run_capturing(nnx.clone(moe), "__call__", x, segment_ids=jnp.asarray(segment_ids))
out = {}
for name, shape, axes, preset in [("data", (2,), ("data",), "data"),
                                  ("expert", (1, 2), ("data", "expert"), "fsdp_tp_ep")]:
    mesh = Mesh(np.array(jax.devices()).reshape(shape), axes)
    with activation_sharding(mesh, PRESETS[preset].rules):
        _, two = run_capturing(nnx.clone(moe), "__call__", x, segment_ids=jnp.asarray(segment_ids))
    out[name] = {key: [np.asarray(one[key][0]).tolist(), np.asarray(two[key][0]).tolist()]
                 for key in ("aux_loss", "moe_load")}
print(json.dumps(out))
"""


def test_routing_statistics_are_global_when_devices_count_different_decisions():
    """The balance and z losses and the load average sums and counts over the devices, not
    per-device means: with packed documents the devices leave out different numbers of
    contextless first chunks, and a mean of means gave aux 0.013204 against one device's
    0.013116 (load 0.2083 against 0.2)."""
    out = run_python(UNEVEN_DOCUMENTS, devices=2)
    for name, stats in out.items():
        for key, (one, mesh) in stats.items():
            np.testing.assert_allclose(mesh, one, rtol=1e-5, err_msg=f"{name} {key}")
