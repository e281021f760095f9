"""``top_k(x, k)``: ``jax.lax.top_k`` with a native CPU kernel for float32 (XLA:CPU sorts every
row; the kernel keeps a k-entry buffer per row, ~8× faster for product-key lookups)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxsparse.ops.checks import is_integer

TOP_K_IMPLEMENTATIONS = (None, "xla", "native")


def top_k(x, k: int, *, implementation: str | None = None):
    """``(values, indices)`` of the ``k`` largest entries along the last axis, descending, ties
    in index order — exactly ``jax.lax.top_k``. ``None`` takes the C++ kernel on a CPU-only
    host for float32 (``lax.top_k`` on other platforms or dtypes, or without a compiler);
    gradients reach the chosen entries as with ``lax.top_k``."""
    if implementation not in TOP_K_IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}: allowed {TOP_K_IMPLEMENTATIONS}")
    if x.ndim < 1 or not is_integer(k) or not 1 <= k <= x.shape[-1]:
        raise ValueError(f"k={k!r}: must be an integer in [1, {x.shape[-1] if x.ndim else 0}] "
                         f"(the last axis of x {x.shape})")
    if implementation == "xla":
        return jax.lax.top_k(x, k)
    from jaxsparse.ops.native import topk as native

    if x.dtype != jnp.float32:
        if implementation == "native":
            raise ValueError(f"top_k(implementation='native') computes in float32; got {x.dtype}")
        return jax.lax.top_k(x, k)
    if implementation is None and jax.default_backend() != "cpu":
        return jax.lax.top_k(x, k)
    if not native.available():
        if implementation == "native":
            raise RuntimeError("top_k(implementation='native'): the C++ kernel could not be "
                               "built (see the warning above); use 'xla'")
        return jax.lax.top_k(x, k)
    return jax.lax.platform_dependent(
        x, cpu=lambda x: native.native_top_k(x, k), default=lambda x: tuple(jax.lax.top_k(x, k)))
