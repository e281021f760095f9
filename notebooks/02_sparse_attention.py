# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Sparse attention: masks, block tables, implementations
#
# Lazy masks describe which query/key pairs interact; block tables tell a kernel which tiles
# to visit. This notebook draws a few patterns with their tables, checks that the
# block-sparse XLA path equals the dense reference, and times both at a small size.

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from jaxsparse.ops.attention import dot_product_attention
from jaxsparse.ops.mask_specs import parse_mask_spec

SPECS = {"causal": "causal", "window 64": "local:64", "strided 32": "strided:32",
         "longformer": "longformer:48,16", "bigbird": "bigbird:32,3,1,2"}
S, BLOCK = 512, 32

# %% [markdown]
# ## Masks and their block tables
# Top row: the dense mask (white = may attend). Bottom row: tiles of 32x32 — black empty,
# grey partial (the mask is evaluated inside), white full.

# %%
fig, axes = plt.subplots(2, len(SPECS), figsize=(3.2 * len(SPECS), 6.4))
for col, (name, spec) in enumerate(SPECS.items()):
    mask = parse_mask_spec(spec)
    table = mask.block_table(S, S, BLOCK, BLOCK)
    axes[0, col].imshow(mask.to_dense(S, S), cmap="gray", interpolation="nearest")
    axes[0, col].set_title(name)
    axes[1, col].imshow(table.kind[0], cmap="gray", vmin=0, vmax=2, interpolation="nearest")
    axes[1, col].set_title(f"tiles: {table.density:.0%} visited")
    for ax in axes[:, col]:
        ax.set_xticks([]), ax.set_yticks([])
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Same numbers, less work
# `xla_blocksparse` visits only non-empty tiles with an online softmax; the dense reference
# materialises every logit. They agree to float32 rounding, gradients included.

# %%
q, k, v = (jax.random.normal(jax.random.key(i), (1, S, 4, 64)) for i in range(3))
tol = 1e-4 if q.dtype == jnp.float32 else 2e-2  # scaled by dtype: float32 ~1e-4, bf16 ~1e-2
for name, spec in SPECS.items():
    mask = parse_mask_spec(spec)
    dense = dot_product_attention(q, k, v, mask=mask, implementation="xla")
    sparse = dot_product_attention(q, k, v, mask=mask, implementation="xla_blocksparse")
    grad = jax.grad(lambda q: dot_product_attention(q, k, v, mask=mask,
                                                    implementation="xla_blocksparse").sum())(q)
    grad_ref = jax.grad(lambda q: dot_product_attention(q, k, v, mask=mask, implementation="xla").sum())(q)
    print(f"{name:12s} max |out diff| {float(jnp.abs(dense - sparse).max()):.1e}   "
          f"max |dq diff| {float(jnp.abs(grad - grad_ref).max()):.1e}")
    assert jnp.allclose(dense, sparse, atol=tol), name
    assert jnp.allclose(grad, grad_ref, atol=tol, rtol=tol), name

# %% [markdown]
# ## Timing at a small size
# The full comparison (up to 16k tokens, against `jax.nn.dot_product_attention`) is
# `jaxsparse bench attention`.

# %%
length = 2048
q, k, v = (jax.random.normal(jax.random.key(i), (1, length, 4, 64)) for i in range(3))
mask = parse_mask_spec("local:128")
for impl in ("xla", "xla_blocksparse"):
    f = jax.jit(lambda q, k, v, impl=impl: dot_product_attention(q, k, v, mask=mask, implementation=impl))
    jax.block_until_ready(f(q, k, v))
    start = time.perf_counter()
    for _ in range(3):
        jax.block_until_ready(f(q, k, v))
    print(f"{impl:16s} {(time.perf_counter() - start) / 3 * 1e3:7.1f} ms")

# %% [markdown]
# ## Across devices: the ring's schedule
# With the sequence split over a mesh axis (`mesh.sequence > 1`), attention layers run
# `ring_attention`: key/value shards travel around the devices while each device folds them
# into its queries' online softmax, one pair of ~128-token parts at a time, visiting only the
# pairs the mask leaves non-empty. The ring waits for its slowest device at every step. Under a causal mask
# contiguous shards leave that to the device with the latest tokens; the zig-zag layout
# (device i holds halves i and 2n-1-i) gives every device the same work. `ring_work` counts
# the part pairs each device works per step — from the mask's block table, no devices needed.

# %%
from jaxsparse.ops.attention.ring import choose_layout, ring_work, split_parts

devices, length = 8, 32768
parts = split_parts(length // devices, length // devices)
fig, axes = plt.subplots(2, 2, figsize=(8, 6), constrained_layout=True)
for row, (name, mask) in enumerate({"causal": parse_mask_spec("causal"),
                                     "window 1024": parse_mask_spec("local:1024")}.items()):
    for col, layout in enumerate(("contiguous", "zigzag")):
        work = ring_work(mask, length, length, devices, layout, parts)
        axes[row, col].imshow(work, vmin=0, vmax=parts * parts, aspect="auto")
        axes[row, col].set_title(f"{name}, {layout}: critical path {work.max(axis=1).sum()}")
        axes[row, col].set_xlabel("device"), axes[row, col].set_ylabel("ring step")
    print(f"{name}: layout=None picks {choose_layout(mask, length, length, devices)}")
plt.show()
