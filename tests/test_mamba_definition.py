"""Mamba-1's selective scan and Mamba-2's SSD against float64 NumPy loops written from the
papers' equations (Gu & Dao 2023, eq. 2a-2b with the zero-order hold of Algorithm 2; Dao &
Gu 2024, §3-4), sharing no helper with the library. Every other SSM test compares our paths
with each other, and they share the discretisation (softplus(dt + dt_bias)) and the output
gate (D skip, y · silu(z)): a slip there would pass them all."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse.ops.ssm import selective_scan, selective_state_update, ssd_reference
from test_ssm import mamba1_inputs, mamba2_inputs


def softplus(x):
    return np.log1p(np.exp(x))


def silu(x):
    return x / (1 + np.exp(-x))


MAMBA1 = mamba1_inputs(0, 2, 7, 6, 3, 2)  # batch 2, length 7, d_inner 6, d_state 3, 2 groups


def mamba1_by_the_equations(inputs):
    """``(y [b, L, d], final state [b, d, n])`` in float64."""
    a = {k: np.asarray(v, np.float64) for k, v in inputs.items()}
    batch, length, d_inner = a["x"].shape
    per_group = d_inner // a["B"].shape[2]
    dt = softplus(a["dt"] + a["dt_bias"])                                  # [b, L, d]
    h = a["initial_state"].copy()                                          # [b, d, n]
    y = np.zeros((batch, length, d_inner))
    for t in range(length):
        B_t = np.repeat(a["B"][:, t], per_group, axis=1)                   # [b, d, n]
        C_t = np.repeat(a["C"][:, t], per_group, axis=1)
        # h_t = exp(Δ A) h_{t-1} + Δ B_t x_t (Mamba's simplified zero-order hold for B)
        h = np.exp(dt[:, t, :, None] * a["A"][None]) * h + \
            (dt[:, t] * a["x"][:, t])[..., None] * B_t
        y[:, t] = ((h * C_t).sum(-1) + a["D"] * a["x"][:, t]) * silu(a["z"][:, t])
    return y, h


@pytest.mark.parametrize("implementation", ["sequential", "associative", "chunked", "native",
                                            "pallas_interpret"])
def test_selective_scan_follows_the_mamba1_equations(implementation):
    want, final_want = mamba1_by_the_equations(MAMBA1)
    got, final = selective_scan(**MAMBA1, implementation=implementation, chunk_size=3,
                                return_final_state=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final, final_want, rtol=1e-5, atol=1e-5)


def test_decoding_steps_follow_the_mamba1_equations():
    want, final_want = mamba1_by_the_equations(MAMBA1)
    state, got = MAMBA1["initial_state"], []
    for t in range(want.shape[1]):
        y_t, state = selective_state_update(
            state, MAMBA1["x"][:, t], MAMBA1["dt"][:, t], MAMBA1["A"], MAMBA1["B"][:, t],
            MAMBA1["C"][:, t], D=MAMBA1["D"], z_t=MAMBA1["z"][:, t], dt_bias=MAMBA1["dt_bias"])
        got.append(y_t)
    np.testing.assert_allclose(jnp.stack(got, axis=1), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state, final_want, rtol=1e-5, atol=1e-5)


def test_ssd_reference_follows_the_mamba2_equations():
    inputs = mamba2_inputs(1, 2, 7, 4, 3, 5, 2)  # batch 2, length 7, 4 heads of 3, state 5
    bias = 0.1 * np.asarray(inputs["D"], np.float64)
    a = {k: np.asarray(v, np.float64) for k, v in inputs.items()}
    batch, length, heads, head_dim = a["x"].shape
    per_group = heads // a["B"].shape[2]
    dt = softplus(a["dt"] + bias)                                          # [b, L, H]
    h = a["initial_state"].copy()                                          # [b, H, P, N]
    want = np.zeros((batch, length, heads, head_dim))
    for t in range(length):
        B_t, C_t = (np.repeat(a[k][:, t], per_group, axis=1) for k in ("B", "C"))  # [b, H, N]
        # scalar A per head: h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_tᵀ
        h = (np.exp(dt[:, t] * a["A"])[..., None, None] * h
             + (dt[:, t, :, None] * a["x"][:, t])[..., None] * B_t[:, :, None, :])
        want[:, t] = np.einsum("bhpn,bhn->bhp", h, C_t) + a["D"][None, :, None] * a["x"][:, t]
    got = ssd_reference(**inputs, dt_bias=jnp.asarray(bias, jnp.float32), dt_softplus=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
