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
# # Routing Transformer
#
# Routing attention (Roy et al., TACL 2021) sends queries and keys to k-means clusters and lets
# a query attend only to keys of its own cluster. This notebook watches the online k-means
# find structure, draws which keys a query reads (causally: the most recent `w` keys of its
# cluster, never a future one), and trains a small routing Transformer.

# %%
import tempfile

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from jaxsparse import configs
from jaxsparse.config import apply_overrides
from jaxsparse.ops.routing import (assign, causal_routing_attention, cluster_windows,
                                   ema_centroids, init_centroids, normalize, routing_units)
from jaxsparse.train import train

# %% [markdown]
# ## The clusters form
# Vectors drawn around 6 hidden directions on the sphere; 6 centroids start at random and
# follow the exponential moving average of the vectors assigned to them. We track how well
# each hidden direction is matched by its nearest centroid (cosine similarity).

# %%
heads, clusters, dim = 1, 6, 16
centers = normalize(jax.random.normal(jax.random.key(0), (clusters, dim)))
labels = jax.random.randint(jax.random.key(1), (8, 256), 0, clusters)
data = normalize(centers[labels] + 0.35 * jax.random.normal(jax.random.key(2), (8, 256, dim)))
data = data[:, :, None, :]  # [B, L, H, D]
centroids = init_centroids(jax.random.key(3), heads, clusters, dim)
match, purity = [], []
update = jax.jit(lambda c: ema_centroids(c, [data], [assign(data, c)], decay=0.9))
for step in range(60):
    sims = centroids[0] @ centers.T
    match.append(np.asarray(jnp.max(sims, axis=0)))
    found = np.asarray(assign(data, centroids))[..., 0]
    purity.append(np.mean([np.bincount(np.asarray(labels)[found == c]).max() / max((found == c).sum(), 1)
                           for c in range(clusters) if (found == c).any()]))
    centroids = update(centroids)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
axes[0].plot(np.array(match))
axes[0].set(xlabel="EMA step", ylabel="cos(hidden direction, nearest centroid)",
            title="each line: one hidden direction")
axes[1].plot(purity)
axes[1].set(xlabel="EMA step", ylabel="cluster purity", title="share of a cluster's majority label")
plt.tight_layout()
plt.show()
print("final purity", round(purity[-1], 3))

# %% [markdown]
# A centroid can stay stuck between two directions (k-means has local optima); the paper
# mitigates this with the commitment loss, which pulls the projections towards their centroids.
#
# ## Which keys a query reads
# For 64 positions, 4 clusters and a window of 8: query `t` reads the 8 most recent keys at or
# before `t` in its own cluster. Left: that pattern; right: a local window of the same size.

# %%
length, window = 64, 8
q = jax.random.normal(jax.random.key(4), (1, length, 1, dim))
k = jax.random.normal(jax.random.key(5), (1, length, 1, dim))
cents = init_centroids(jax.random.key(6), 1, 4, dim)
key_pos, valid = cluster_windows(assign(normalize(q), cents), assign(normalize(k), cents), window)
pattern = np.zeros((length, length), bool)
for t in range(length):
    pattern[t, np.asarray(key_pos[0, t, 0])[np.asarray(valid[0, t, 0])]] = True
local = np.tril(np.ones((length, length), bool)) & ~np.tril(np.ones((length, length), bool), -window)
fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
axes[0].imshow(pattern, cmap="Greys")
axes[0].set(title="routing: own cluster, last 8", xlabel="key", ylabel="query")
axes[1].imshow(local, cmap="Greys")
axes[1].set(title="local window of 8", xlabel="key")
plt.show()
print("no query reads a future key:", not np.triu(pattern, 1).any())
assert not np.triu(pattern, 1).any()
out, routing = causal_routing_attention(q, k, q, cents, window=window)
print("cluster sizes among keys:", np.bincount(np.asarray(routing["k_clusters"]).ravel(), minlength=4))

# %% [markdown]
# ## Why the keys are centred
# Trained keys share a large common component. Spherical k-means on such a narrow cone sends
# almost every key to one centroid, and the "clusters" become one sliding window. Routing by
# the direction of `k - mean` (a running mean over training batches, `model.routing_center`,
# on by default) spreads them again — and costs attention nothing, since subtracting one vector
# from every key changes no softmax.

# %%
common = 6.0 * jax.random.normal(jax.random.key(20), (1, 1, 1, dim))
cone = common + jax.random.normal(jax.random.key(21), (2, 256, 1, dim))
cone_centroids = normalize(jax.random.normal(jax.random.key(22), (1, 8, dim)))
for label, units in [("raw directions", routing_units(cone)),
                     ("centred directions", routing_units(cone, cone.mean(axis=(0, 1))))]:
    centroids_c = cone_centroids
    for _ in range(20):  # a few k-means steps on this batch
        centroids_c = ema_centroids(centroids_c, [units], [assign(units, centroids_c)], decay=0.5)
    sizes = np.bincount(np.asarray(assign(units, centroids_c)).ravel(), minlength=8)
    print(f"{label:>18}: cluster sizes {sizes.tolist()}")

# %% [markdown]
# ## A small routing Transformer
# `routing_tiny` scaled down: one local layer, then one layer with 2 local and 2 routing heads.
# The centroids move every training step (outside the gradient) and the commitment loss shows
# up as `aux_loss` in the metrics.

# %%
small = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=4",
         "model.d_ff=192", "model.routing_skip_first=1", "model.routing_clusters=4",
         "model.routing_window=16", "model.routing_local_window=16", "data.batch_size=16",
         "data.seq_len=64", "train.steps=60", "train.eval_every=60", "train.progress=false",
         "train.tensorboard=false", "eval.batches=2", "eval.sample_tokens=32"]
cfg = apply_overrides(configs.get("routing_tiny"), small)
result = train(cfg, tempfile.mkdtemp(), quiet=True)
print(f"validation bits/byte after 60 steps: {result.eval_metrics['bits_per_byte']:.3f}")
print("sample:", repr(result.sample))
