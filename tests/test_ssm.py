"""Selective scans: every implementation against the lax.scan recurrence (values, final
state, gradients of every input), SSD against its naive recurrence, decoding steps."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse.ops.ssm import (segsum, selective_scan, selective_state_update, ssd, ssd_native,
                               ssd_reference)


def mamba1_inputs(seed, batch, length, d_inner, d_state, groups, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 8)
    n = lambda i, shape: jax.random.normal(k[i], shape, jnp.float32)  # noqa: E731
    return dict(
        x=n(0, (batch, length, d_inner)).astype(dtype), dt=n(1, (batch, length, d_inner)).astype(dtype),
        A=-jnp.exp(n(2, (d_inner, d_state))), B=n(3, (batch, length, groups, d_state)).astype(dtype),
        C=n(4, (batch, length, groups, d_state)).astype(dtype), D=n(5, (d_inner,)),
        z=n(6, (batch, length, d_inner)).astype(dtype), dt_bias=0.1 * n(7, (d_inner,)),
        initial_state=n(7, (batch, d_inner, d_state)))


DIFFERENTIABLE = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


# associative at L=1000 is slow on CPU and adds nothing the chunked L=1000 case and the
# associative L=129 case do not already check
@pytest.mark.parametrize("implementation, length, chunk", [
    (impl, length, chunk) if (impl, length) != ("associative", 1000)
    else pytest.param(impl, length, chunk, marks=pytest.mark.slow)
    for length, chunk in [(1, 4), (7, 3), (129, 16), (1000, 96)]
    for impl in ("associative", "chunked", "native")])
def test_scan_implementations_agree_with_the_recurrence(length, chunk, implementation):
    args = mamba1_inputs(length, 2, length, 8, 4, 2)

    def run(impl, **values):
        y, final = selective_scan(**values, return_final_state=True, chunk_size=chunk,
                                  implementation=impl)
        return y, final

    ref_y, ref_final = jax.jit(lambda a: run("sequential", **a))(args)
    y, final = jax.jit(lambda a: run(implementation, **a))(args)
    np.testing.assert_allclose(y, ref_y, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(final, ref_final, atol=2e-5, rtol=2e-5)

    def loss(impl, diff):
        y, final = run(impl, **(args | diff))
        return jnp.sum(y * jnp.cos(y)) + jnp.sum(final)

    diff = {name: args[name] for name in DIFFERENTIABLE}
    ref_grads = jax.jit(jax.grad(lambda d: loss("sequential", d)))(diff)
    grads = jax.jit(jax.grad(lambda d: loss(implementation, d)))(diff)
    for name in DIFFERENTIABLE:
        scale = float(jnp.abs(ref_grads[name]).max()) + 1e-6
        np.testing.assert_allclose(grads[name], ref_grads[name], atol=1e-4 * scale, rtol=1e-4,
                                   err_msg=f"d{name}")


@pytest.mark.parametrize("batch, length, d_inner, d_state, groups", [
    (1, 300, 48, 16, 1),   # whole 16-channel blocks, several 64-step chunks, split tasks
    (3, 65, 40, 5, 2),     # 20 channels a group: a full block and a 4-lane block per group
])
def test_native_kernel_blocks_chunks_and_parts(batch, length, d_inner, d_state, groups):
    """The native kernel's own edges (the generic test above has 4-channel groups only):
    full and partial lane blocks, chunk boundaries of the reverse pass, and the backward's
    per-task partial sums of dB and dC — against the recurrence, and bitwise repeatable."""
    args = mamba1_inputs(length, batch, length, d_inner, d_state, groups)

    def loss(impl, diff):
        y, final = selective_scan(**(args | diff), return_final_state=True, implementation=impl)
        return jnp.sum(y * jnp.cos(y)) + jnp.sum(final)

    diff = {name: args[name] for name in DIFFERENTIABLE}
    want = jax.jit(jax.value_and_grad(lambda d: loss("sequential", d)))(diff)
    native = jax.jit(jax.value_and_grad(lambda d: loss("native", d)))
    got, again = native(diff), native(diff)
    np.testing.assert_allclose(got[0], want[0], rtol=2e-5)
    for name in DIFFERENTIABLE:
        scale = float(jnp.abs(want[1][name]).max()) + 1e-6
        np.testing.assert_allclose(got[1][name], want[1][name], atol=1e-4 * scale, rtol=1e-4,
                                   err_msg=f"d{name}")
        np.testing.assert_array_equal(got[1][name], again[1][name], err_msg=f"d{name} repeat")


def test_native_kernel_exp_over_the_float32_range():
    """One step from h0 = 1 with no input leaves exp(dt·A) in the state: the kernel's own
    vector exp, checked against float64 over the whole float32 range and its edges."""
    from jaxsparse.ops.native.selective_scan import available, native_scan

    assert available()  # builds and registers the kernel (CI machines have a C++ compiler)
    exps = np.concatenate([np.linspace(-87.0, 88.7, 4000), [0.0, -1e-8, 1e-8, 88.72, -87.3]])
    d = 16
    A = np.resize(exps, (d, -(-exps.size // d))).astype(np.float32)  # [d, N]
    n = A.shape[1]
    ones = lambda *s: jnp.ones(s, jnp.float32)  # noqa: E731
    _, state = native_scan(jnp.zeros((1, 1, d)), ones(1, 1, d), jnp.asarray(A),
                           jnp.zeros((1, 1, 1, n)), jnp.zeros((1, 1, 1, n)), ones(1, d, n),
                           ones(1, 1))
    want = np.exp(A.astype(np.float64))
    np.testing.assert_allclose(np.asarray(state[0], np.float64), want, rtol=2.5e-7)
    edges = np.array([-200.0, -88.0, 89.0, 1000.0, np.nan, -np.inf, np.inf, 0.5] * 2,
                     np.float32).reshape(d, 1)
    _, state = native_scan(jnp.zeros((1, 1, d)), ones(1, 1, d), jnp.asarray(edges),
                           jnp.zeros((1, 1, 1, 1)), jnp.zeros((1, 1, 1, 1)), ones(1, d, 1),
                           ones(1, 1))
    got = np.asarray(state[0, :8, 0])
    assert (0 <= got[:2]).all() and (got[:2] < 2e-38).all(), got  # underflow: ~0, not garbage
    assert np.isinf(got[2]) and np.isinf(got[3]) and np.isnan(got[4]), got
    assert got[5] < 2e-38 and np.isinf(got[6]) and np.isclose(got[7], np.exp(0.5)), got


def test_native_scan_is_the_cpu_default_and_not_lowered_for_accelerators():
    args = mamba1_inputs(0, 1, 9, 16, 4, 1)
    f = lambda **a: selective_scan(**a)  # noqa: E731
    cpu = jax.jit(lambda a: f(**a)).lower(args).as_text()
    assert "jaxsparse_selective_scan_f32" in cpu
    for platform in ("cuda", "tpu"):
        text = jax.jit(jax.grad(lambda a: f(**a).sum())).trace(args).lower(
            lowering_platforms=(platform,)).as_text()
        assert "jaxsparse_selective_scan" not in text, platform


def test_decoding_step_by_step_equals_the_full_scan():
    args = mamba1_inputs(3, 2, 17, 6, 4, 3)
    full, final = selective_scan(**args, return_final_state=True)
    state, ys = args["initial_state"], []
    for t in range(17):
        y, state = selective_state_update(
            state, args["x"][:, t], args["dt"][:, t], args["A"], args["B"][:, t], args["C"][:, t],
            D=args["D"], z_t=args["z"][:, t], dt_bias=args["dt_bias"])
        ys.append(y)
    np.testing.assert_allclose(jnp.stack(ys, 1), full, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(state, final, atol=1e-5, rtol=1e-5)


def test_segsum_is_the_sum_over_the_segment():
    x = jax.random.normal(jax.random.key(0), (3, 9))
    out = np.asarray(segsum(x))
    xs = np.asarray(x)
    for i in range(9):
        for j in range(9):
            expected = xs[:, j + 1:i + 1].sum(-1) if i >= j else -np.inf
            np.testing.assert_allclose(out[:, i, j], expected, atol=1e-5)


def mamba2_inputs(seed, batch, length, heads, head_dim, d_state, groups, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 7)
    n = lambda i, shape: jax.random.normal(k[i], shape, jnp.float32)  # noqa: E731
    return dict(
        x=n(0, (batch, length, heads, head_dim)).astype(dtype), dt=n(1, (batch, length, heads)).astype(dtype),
        A=-jnp.exp(n(2, (heads,))), B=n(3, (batch, length, groups, d_state)).astype(dtype),
        C=n(4, (batch, length, groups, d_state)).astype(dtype), D=n(5, (heads,)),
        initial_state=n(6, (batch, heads, head_dim, d_state)))


@pytest.mark.parametrize("length, chunk", [pytest.param(1, 8, marks=pytest.mark.slow), (7, 4),
                                           pytest.param(129, 32, marks=pytest.mark.slow),
                                           (1000, 96)])
def test_ssd_equals_its_recurrence_with_gradients(length, chunk):
    args = mamba2_inputs(length, 2, length, 4, 8, 6, 2)
    kw = dict(dt_softplus=True, return_final_state=True)
    ref_y, ref_final = jax.jit(lambda a: ssd_reference(**a, **kw))(args)
    y, final = jax.jit(lambda a: ssd(**a, chunk_size=chunk, **kw))(args)
    np.testing.assert_allclose(y, ref_y, atol=5e-5, rtol=5e-5)
    np.testing.assert_allclose(final, ref_final, atol=5e-5, rtol=5e-5)
    names = ("x", "dt", "A", "B", "C", "D", "initial_state")

    def loss(fn, diff, **extra):
        y, final = fn(**(args | diff), **kw, **extra)
        return jnp.sum(jnp.sin(y)) + jnp.sum(final)

    diff = {n: args[n] for n in names}
    ref_grads = jax.jit(jax.grad(lambda d: loss(ssd_reference, d)))(diff)
    grads = jax.jit(jax.grad(lambda d: loss(ssd, d, chunk_size=chunk)))(diff)
    for name in names:
        assert np.isfinite(np.asarray(grads[name])).all(), name
        scale = float(jnp.abs(ref_grads[name]).max()) + 1e-6
        np.testing.assert_allclose(grads[name], ref_grads[name], atol=2e-4 * scale, rtol=2e-4,
                                   err_msg=f"d{name}")


def test_ssd_work_grows_linearly_with_the_length():
    """States pass between chunks by a scan, not through a [chunks, chunks] decay matrix: 4x the
    length is 4x the compiled FLOPs (the quadratic form measured 9.5x here)."""
    def flops(length):
        args = mamba2_inputs(0, 1, length, 4, 16, 16, 1)
        cost = jax.jit(lambda a: ssd(**a, chunk_size=16)).lower(args).compile().cost_analysis()
        return (cost if isinstance(cost, dict) else cost[0])["flops"]

    assert flops(4096) / flops(1024) < 4.4


@pytest.mark.parametrize("batch, length, heads, head_dim, d_state, groups", [
    (2, 7, 4, 8, 6, 2), (1, 200, 2, 24, 16, 1), (3, 129, 6, 4, 5, 3)])
def test_ssd_native_equals_the_recurrence_with_gradients(batch, length, heads, head_dim,
                                                         d_state, groups):
    args = mamba2_inputs(length, batch, length, heads, head_dim, d_state, groups)
    kw = dict(dt_softplus=True, dt_bias=0.1 * args["D"], return_final_state=True)
    names = ("x", "dt", "A", "B", "C", "D", "initial_state")

    def loss(fn, diff):
        y, final = fn(**(args | diff), **kw)
        return jnp.sum(jnp.sin(y)) + jnp.sum(final), (y, final)

    diff = {n: args[n] for n in names}
    (_, want), ref_grads = jax.jit(jax.value_and_grad(lambda d: loss(ssd_reference, d),
                                                      has_aux=True))(diff)
    (_, got), grads = jax.jit(jax.value_and_grad(lambda d: loss(ssd_native, d), has_aux=True))(diff)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)
    for name in names:
        scale = float(jnp.abs(ref_grads[name]).max()) + 1e-6
        np.testing.assert_allclose(grads[name], ref_grads[name], atol=1e-4 * scale, rtol=1e-4,
                                   err_msg=f"d{name}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("dt_value", [1e-4, 10.0])
def test_no_nan_or_inf_at_64k_with_extreme_dt(dtype, dt_value):
    length = 1 << 16
    args = mamba1_inputs(0, 1, length, 4, 4, 1, dtype)
    args["dt"] = jnp.full_like(args["dt"], dt_value)  # the step itself (no bias, no softplus)
    args["dt_bias"] = None
    for impl in ("sequential", "chunked", "native", "pallas_interpret"):
        y = jax.jit(lambda a: selective_scan(**a, dt_softplus=False, implementation=impl,
                                             chunk_size=256))(args)
        assert np.isfinite(np.asarray(y.astype(jnp.float32))).all(), impl
    args2 = mamba2_inputs(0, 1, length, 2, 4, 4, 1, dtype)
    args2["dt"] = jnp.full_like(args2["dt"], dt_value)
    y2 = jax.jit(lambda a: ssd(**a, chunk_size=256))(args2)
    assert np.isfinite(np.asarray(y2.astype(jnp.float32))).all()
    y3 = jax.jit(lambda a: ssd_native(**a))(args2)
    assert np.isfinite(np.asarray(y3.astype(jnp.float32))).all()


def test_bad_inputs_name_the_argument():
    args = mamba1_inputs(0, 1, 5, 4, 2, 1)
    with pytest.raises(ValueError, match="A must be strictly negative"):
        selective_scan(**(args | {"A": jnp.abs(args["A"])}))
    with pytest.raises(ValueError, match="dt must have x's shape"):
        selective_scan(**(args | {"dt": args["dt"][:, :3]}))
    with pytest.raises(ValueError, match=r"B must be \[batch=1, length=5, groups, d_state=2\]"):
        selective_scan(**(args | {"B": args["B"][..., :1]}))
    with pytest.raises(ValueError, match="chunk_size=0"):
        selective_scan(**args, chunk_size=0, implementation="chunked")
    with pytest.raises(ValueError, match="implementation='triton'"):
        selective_scan(**args, implementation="triton")
    args2 = mamba2_inputs(0, 1, 5, 2, 3, 4, 1)
    with pytest.raises(ValueError, match=r"A must be \[heads=2\]"):
        ssd(**(args2 | {"A": jnp.full((2, 2), -1.0)}), chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size=-3"):
        ssd(**args2, chunk_size=-3)
    with pytest.raises(ValueError, match=r"dt_bias must be \[d_inner=4\], got \(3,\)"):
        selective_scan(**(args | {"dt_bias": jnp.zeros(3)}))
    with pytest.raises(ValueError, match=r"dt_bias must be \[heads=2\]"):
        ssd(**args2, chunk_size=4, dt_bias=jnp.zeros(4))
    with pytest.raises(ValueError, match="x has dtype int32; the scan needs floating-point"):
        selective_scan(**(args | {"x": args["x"].astype(jnp.int32)}))
    # a plain float D or dt_bias failed with an AttributeError (.shape)
    with pytest.raises(ValueError, match=r"D must be \[d_inner=4\], got \(\)"):
        selective_scan(**(args | {"D": 1.0}))
    with pytest.raises(ValueError, match=r"D must be \[heads=2\], got \(\)"):
        ssd(**(args2 | {"D": 1.0}), chunk_size=4)
    with pytest.raises(ValueError, match=r"dt_bias must be \[d_inner=4\], got \(\)"):
        selective_scan(**(args | {"dt_bias": 0.5}))
    # a decoding step names its own arguments, with the shapes the caller passed
    state = jnp.zeros((1, 4, 2))
    step = dict(state=state, x_t=args["x"][:, 0], dt_t=args["dt"][:, 0], A=args["A"],
                B_t=args["B"][:, 0], C_t=args["C"][:, 0])
    with pytest.raises(ValueError, match=r"B_t of shape \(1, 2\): must be \[batch=1, groups, "
                                         r"d_state=2\]"):
        selective_state_update(**(step | {"B_t": step["B_t"][:, 0]}))
    with pytest.raises(ValueError, match=r"A of shape \(4, 3\): must be \[d_inner, d_state\]"
                                         r"=\(4, 2\)"):
        selective_state_update(**(step | {"A": -jnp.ones((4, 3))}))
    with pytest.raises(ValueError, match=r"z_t of shape \(1, 3\): must be x_t's \(1, 4\)"):
        selective_state_update(**step, z_t=jnp.ones((1, 3)))
    y_t, _ = selective_state_update(**step)
    assert y_t.shape == (1, 4)


def test_every_mamba2_form_refuses_a_transposed_initial_state_and_zero_groups():
    # ssd_native reshaped a [batch, head_dim, heads, d_state] state silently (a wrong answer).
    # numpy inputs: the checks come first, so nothing is compiled
    def inputs(groups):
        return dict(x=np.ones((1, 5, 4, 2), np.float32), dt=np.ones((1, 5, 4), np.float32),
                    A=-np.ones(4, np.float32), B=np.ones((1, 5, groups, 3), np.float32),
                    C=np.ones((1, 5, groups, 3), np.float32))

    swapped = inputs(1) | {"initial_state": np.zeros((1, 2, 4, 3), np.float32)}
    message = (r"initial_state must be \[batch, heads, head_dim, d_state\]=\(1, 4, 2, 3\), "
               r"got \(1, 2, 4, 3\)")
    for run in (lambda a: ssd(**a, chunk_size=2), lambda a: ssd_reference(**a),
                lambda a: ssd_native(**a)):
        with pytest.raises(ValueError, match=message):
            run(swapped)
    with pytest.raises(ValueError, match=r"groups \(>= 1\) divide heads=4; got \(1, 5, 0, 3\)"):
        ssd(**inputs(0), chunk_size=2)
    mamba1 = inputs(0) | {"x": np.ones((1, 5, 4), np.float32), "dt": np.ones((1, 5, 4), np.float32),
                          "A": -np.ones((4, 3), np.float32)}
    with pytest.raises(ValueError, match=r"B, C \(1, 5, 0, 3\): groups=0, must be >= 1"):
        selective_scan(**mamba1)


def test_rotary_positions_must_match_the_sequence():
    from jaxsparse.ops.rotary import apply_rotary

    x = jnp.ones((2, 8, 1, 4))
    with pytest.raises(ValueError, match=r"positions of shape \(2, 7\): expected .* \(2, 8\)"):
        apply_rotary(x, jnp.zeros((2, 7), jnp.int32))
    shared = apply_rotary(x, jnp.arange(8)[None])  # one row of positions serves the batch
    np.testing.assert_array_equal(shared, apply_rotary(x, jnp.tile(jnp.arange(8)[None], (2, 1))))


def test_an_empty_sequence_leaves_the_initial_state_in_every_implementation():
    """Length 0 (an empty prompt, a zero-length shard): no outputs, the initial state back."""
    from jaxsparse.ops.diagonal_ssm import DIAGONAL_SCAN_IMPLEMENTATIONS, linear_scan
    from jaxsparse.ops.ssm import SCAN_IMPLEMENTATIONS

    args = mamba1_inputs(3, 2, 0, 8, 4, 1)
    for impl in SCAN_IMPLEMENTATIONS:
        y, final = selective_scan(**args, implementation=impl, return_final_state=True)
        assert y.shape == (2, 0, 8), impl
        np.testing.assert_array_equal(final, args["initial_state"], err_msg=str(impl))
    empty, h0 = jnp.ones((2, 0, 5)), jnp.arange(10.0).reshape(2, 5)
    for impl in DIAGONAL_SCAN_IMPLEMENTATIONS:
        hs, final = linear_scan(empty, empty, h0, implementation=impl)
        assert hs.shape == (2, 0, 5), impl
        np.testing.assert_array_equal(final, h0, err_msg=str(impl))


@pytest.mark.parametrize("chunk_size", [True, False, 2.0, np.float32(4)])
def test_a_chunk_size_that_is_not_an_integer_is_refused(chunk_size):
    # chunk_size=True passed isinstance(int) and ran as a chunk of 1
    args = mamba1_inputs(0, 1, 5, 4, 2, 1)
    message = re.escape(f"chunk_size={chunk_size!r}: must be an integer >= 1")
    with pytest.raises(ValueError, match=message):
        selective_scan(**args, chunk_size=chunk_size, implementation="chunked")
    with pytest.raises(ValueError, match=message):
        ssd(**mamba2_inputs(0, 1, 5, 2, 3, 4, 1), chunk_size=chunk_size)
    y = selective_scan(**args, chunk_size=np.int64(2), implementation="chunked")  # numpy ints
    np.testing.assert_allclose(y, selective_scan(**args, implementation="sequential"),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", [None, "sequential", "associative", "chunked",
                                            "native", "pallas_interpret"])
def test_an_empty_batch_gives_an_empty_result(implementation):
    # the Pallas kernel sliced a block of one batch row out of zero (a deep TypeError)
    args = mamba1_inputs(0, 0, 5, 4, 3, 1)
    y, final = selective_scan(**args, return_final_state=True, implementation=implementation)
    assert y.shape == (0, 5, 4) and y.dtype == jnp.float32 and final.shape == (0, 4, 3)
