# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Monarch matrices
#
# A Monarch matrix (Dao et al., ICML 2022) is `M = P L Pᵀ R`: two block-diagonal factors with
# a fixed permutation between them. With `b = √n` blocks it has `2 n^1.5` parameters instead
# of `n²`, yet it can represent the DFT, Hadamard-like transforms and convolutions exactly, and
# any dense matrix can be projected onto the class in closed form. This notebook draws the
# structure, measures how well several matrix families project, times a Monarch layer against
# a dense one, and converts a trained dense model into a Monarch one.

# %%
import tempfile

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from jaxsparse import configs, sparsify
from jaxsparse.bench import time_fn
from jaxsparse.config import apply_overrides
from jaxsparse.data import make_stream
from jaxsparse.ops.monarch import (monarch_matmul, monarch_params, monarch_shapes,
                                   monarch_to_dense, project_to_monarch)
from jaxsparse.train import evaluate, load, train
from jaxsparse.train.state import TrainSetup
from jaxsparse.train.step import make_eval_step

# %% [markdown]
# ## The structure
# For `n = 64` and `b = 8`: the right factor `R` is block-diagonal (8 blocks of 8×8), the
# permutation `Pᵀ` sends intermediate `i = k·8 + j` to position `j·8 + k` (a transpose of an
# 8×8 grid), the left factor `L` is block-diagonal again, and the product is dense — but each
# of its 8×8 blocks, with rows read with stride 8, has rank 1.

# %%
n, b = 64, 8
w1, w2 = [jax.random.normal(k, s) for k, s in zip(jax.random.split(jax.random.key(0)),
                                                   monarch_shapes(n, n, b))]
eye = jnp.eye(b)
R = jnp.einsum("kqp,kl->kqlp", w1, eye).reshape(n, n)  # block-diagonal, as a dense matrix
L = jnp.einsum("lsr,lk->lskr", w2, eye).reshape(n, n)
perm = np.array([(i % b) * b + i // b for i in range(n)])
P = np.eye(n)[perm]
M = monarch_to_dense(w1, w2)
rows_by_l = np.concatenate([np.arange(l, n, b) for l in range(b)])  # group rows s'·b + l by l
fig, axes = plt.subplots(1, 5, figsize=(16, 3.4))
for ax, (title, mat) in zip(axes, [("R (w1)", R), ("permutation", P), ("L (w2)", L),
                                   ("M (dense)", M), ("M, rows grouped by l", M[rows_by_l])]):
    ax.imshow(np.abs(np.asarray(mat)) > 1e-9 if title != "M (dense)" else np.asarray(mat),
              cmap="viridis")
    ax.set_title(title)
    ax.set_xticks([]), ax.set_yticks([])
plt.tight_layout()
plt.show()
block_ranks = [np.linalg.matrix_rank(np.asarray(M)[rows_by_l][l * b:(l + 1) * b, k * b:(k + 1) * b])
               for l in range(b) for k in range(b)]
print("rank of every 8x8 block of M (rows grouped by l):", set(block_ranks))
assert set(block_ranks) == {1}
print(f"parameters: Monarch {monarch_params(n, n, b)}, dense {n * n}")

# %% [markdown]
# The product is checked against this dense matrix: `x @ Mᵀ` equals `monarch_matmul(x, w1, w2)`.

# %%
x = jax.random.normal(jax.random.key(1), (5, n))
print("max |x Mᵀ - monarch_matmul| =", float(jnp.abs(x @ M.T - monarch_matmul(x, w1, w2)).max()))
assert jnp.allclose(x @ M.T, monarch_matmul(x, w1, w2), atol=1e-4, rtol=1e-4)

# %% [markdown]
# ## Projection error of matrix families
# `project_to_monarch` takes the best rank-ρ approximation of every block (a truncated SVD),
# which is the Frobenius-optimal Monarch matrix. With fewer blocks each block has higher rank
# (ρ = n/b²), so the error falls as `b` shrinks — and so does the saving.

# %%
n = 256
idx = np.arange(n)
dft = np.exp(-2j * np.pi * np.outer(idx, idx) / n)
root = 16
transposed_columns = np.array([root * (c % root) + c // root for c in range(n)])
hadamard = np.array([[(-1) ** bin(i & j).count("1") for j in range(n)] for i in range(n)], float)
toeplitz = np.array([[np.exp(-abs(i - j) / 8.0) for j in range(n)] for i in range(n)])
families = {
    "gaussian": np.asarray(jax.random.normal(jax.random.key(2), (n, n))),
    "DFT": dft,
    "DFT, columns transposed": dft[:, transposed_columns],
    "Hadamard": hadamard,
    "Toeplitz exp(-|i-j|/8)": toeplitz,
    "low rank (4)": np.asarray(jax.random.normal(jax.random.key(3), (n, 4))
                               @ jax.random.normal(jax.random.key(4), (4, n))),
}
blocks = [2, 4, 8, 16]
errors = {}
for name, mat in families.items():
    mat = jnp.asarray(mat, jnp.complex64 if np.iscomplexobj(mat) else jnp.float32)
    errors[name] = []
    for nb in blocks:
        p1, p2 = project_to_monarch(mat, nb)
        errors[name].append(float(jnp.linalg.norm(monarch_to_dense(p1, p2) - mat)
                                  / jnp.linalg.norm(mat)))
fig, ax = plt.subplots(figsize=(7, 4))
for name, errs in errors.items():
    ax.plot(blocks, np.maximum(errs, 1e-8), marker="o", label=name)
ax.set(xscale="log", yscale="log", xlabel="blocks b (n = 256)", ylabel="relative error ‖M−A‖/‖A‖",
       title="Optimal Monarch projection error")
ax.set_xticks(blocks, [str(v) for v in blocks])
ax.legend(fontsize=8)
plt.show()
for name, errs in errors.items():
    print(f"{name:26s} " + "  ".join(f"b={nb}: {e:.1e}" for nb, e in zip(blocks, errs)))
# exact in transposed order at every b (complex64 round-off), far from it in natural order
assert max(errors["DFT, columns transposed"]) < 1e-5 < 1e-2 < min(errors["DFT"]), errors

# %% [markdown]
# The DFT with its columns read in transposed order is exactly Monarch at every `b` (the
# Cooley–Tukey factorisation); in natural order it is not. A random Gaussian matrix is the
# worst case: each block keeps only its top ρ singular values.
#
# ## Speed against a dense layer
# The full comparison is `jaxsparse bench monarch` (d up to 8192); here a small one.

# %%
d, tokens = 1024, 1024
xs = jax.random.normal(jax.random.key(5), (tokens, d))
dense_w = jax.random.normal(jax.random.key(6), (d, d)) / d**0.5
m1, m2 = [jax.random.normal(k, s) for k, s in zip(jax.random.split(jax.random.key(7)),
                                                   monarch_shapes(d, d))]
dense_t = time_fn(jax.jit(jnp.dot), xs, dense_w, repeats=3).median_s
print(f"d={d}: dense {dense_t * 1e3:.1f} ms (FLOP ratio {d * d / monarch_params(d, d):.0f}x)")
for impl in ("xla", "native"):  # XLA's einsums; the fused C++ kernel (the CPU default)
    f = jax.jit(lambda *a, impl=impl: monarch_matmul(*a, implementation=impl))
    monarch_t = time_fn(f, xs, m1, m2, repeats=3).median_s
    print(f"  Monarch {impl:6s} {monarch_t * 1e3:.1f} ms ({dense_t / monarch_t:.1f}x)")

# %% [markdown]
# ## Dense → Monarch conversion of a trained model
# Train a small dense Transformer briefly, project every block projection onto Monarch
# matrices (`jaxsparse.sparsify.to_monarch`), and compare validation loss before and after.
# `train.init_from` does the same inside the trainer and then fine-tunes (see
# `experiments/monarch/study.py`).

# %%
small = ["model.d_model=64", "model.n_layers=2", "model.d_ff=256", "data.batch_size=16",
         "data.seq_len=64", "train.steps=60", "train.eval_every=60", "train.progress=false",
         "train.tensorboard=false", "eval.batches=2", "eval.sample_tokens=0"]
workdir = tempfile.mkdtemp()
dense_cfg = apply_overrides(configs.get("transformer_tiny"), small)
dense_result = train(dense_cfg, workdir, sample=False, quiet=True)
cfg, setup, state = load(workdir)
dense_model = setup.model(state["params"], state["rest"])
for nb in (4,):
    sparse_model = sparsify.to_monarch(dense_model, "all", nblocks=nb)
    monarch_cfg = apply_overrides(cfg, ["model.monarch=mlp,attention", f"model.monarch_blocks={nb}"])
    sparse_setup = TrainSetup(monarch_cfg, setup.mesh)
    params = nnx.to_pure_dict(nnx.state(sparse_model, nnx.Param))
    sparse_state = sparse_setup.init_with_params(params)
    metrics = evaluate(sparse_setup, make_eval_step(sparse_setup), sparse_state,
                       make_stream(monarch_cfg), monarch_cfg)
    print(f"b={nb}: {sum(np.size(v) for v in jax.tree.leaves(params)):,} parameters, "
          f"validation bits/byte {metrics['bits_per_byte']:.3f} "
          f"(dense {dense_result.eval_metrics['bits_per_byte']:.3f})")
