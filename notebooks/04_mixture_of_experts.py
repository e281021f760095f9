# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Mixture of experts
#
# Routing tokens to experts, the Switch load-balancing loss, capacity dropping against the
# dropless path, grouped matmuls, and a short training run of a Transformer whose
# feed-forward layers are mixtures of experts.

# %%
import tempfile
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
from flax import nnx

from jaxsparse import configs
from jaxsparse.config import apply_overrides
from jaxsparse.nn import MoE
from jaxsparse.ops.moe import (expert_capacity, grouped_matmul, load_balancing_loss,
                               slot_positions, top_k_routing)
from jaxsparse.train import train
from jaxsparse.train.metrics import read_metrics

# %% [markdown]
# ## Top-k routing and the balance loss
# Router logits are float32; each token keeps its two most probable experts. The Switch loss
# `E * sum_i f_i P_i` is 1.0 when every expert gets the same share, more when routing is skewed.

# %%
tokens, experts = 512, 8
logits = jax.random.normal(jax.random.key(0), (tokens, experts))
for skew in (0.0, 1.0, 3.0):
    skewed = logits + skew * jnp.linspace(1, 0, experts)  # low-numbered experts preferred
    choice = top_k_routing(skewed, 2)
    print(f"skew {skew}: balance loss {float(load_balancing_loss(choice.probs, choice.expert_index)):.3f}")

# %% [markdown]
# ## Capacity and dropping
# With a capacity factor, each expert has `round(cf * tokens * k / E)` slots, filled with all
# first choices before any second choice; what does not fit is dropped.

# %%
choice = top_k_routing(logits + 3.0 * jnp.linspace(1, 0, experts), 2)
positions = slot_positions(choice, experts)
factors = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0]
dropped = [float(jnp.mean(positions >= expert_capacity(tokens, experts, 2, cf))) for cf in factors]
plt.plot(factors, dropped, marker="o")
plt.xlabel("capacity factor")
plt.ylabel("fraction of assignments dropped")
plt.title("skewed routing, 8 experts, top-2")
plt.show()

# %% [markdown]
# ## Grouped matmuls
# The dropless path sorts assignments by expert and multiplies each expert's rows by its
# weights. On CPU `jax.lax.ragged_dot` computes every group densely; the padded-tile path
# only does the work of the rows (plus at most one tile of padding per group).

# %%
m, d, h, E = 4096, 128, 256, 32
lhs = jax.random.normal(jax.random.key(1), (m, d))
rhs = jax.random.normal(jax.random.key(2), (E, d, h))
sizes = jnp.bincount(jax.random.randint(jax.random.key(3), (m,), 0, E), length=E)
for impl in ("ragged_dot", "tiles"):
    fn = jax.jit(lambda a, b, impl=impl: grouped_matmul(a, b, sizes, implementation=impl))
    fn(lhs, rhs).block_until_ready()
    start = time.perf_counter()
    fn(lhs, rhs).block_until_ready()
    print(f"{impl:>10}: {1e3 * (time.perf_counter() - start):.1f} ms")

# %% [markdown]
# ## The layer
# `MoE` holds the router and the experts' stacked weights (`[E, d, h]`, logical axis `expert`
# for expert parallelism). Dropless and a generous capacity give the same output.

# %%
x = jax.random.normal(jax.random.key(4), (2, 16, 32))
dropless = MoE(32, 64, 4, 2, rngs=nnx.Rngs(0))
capacity = MoE(32, 64, 4, 2, rngs=nnx.Rngs(0), capacity_factor=4.0)
dropless.eval(), capacity.eval()
print("max difference:", float(jnp.abs(dropless(x) - capacity(x)).max()))
assert jnp.allclose(dropless(x), capacity(x), atol=1e-5, rtol=1e-5)

# %% [markdown]
# ## Training a small MoE Transformer
# `moe_tiny` puts 8 experts (top-2) in every other layer; here a shortened run. The training
# metrics include the router loss and the busiest expert's load (1.0 = balanced).

# %%
cfg = apply_overrides(configs.get("moe_tiny"), [
    "model.d_model=64", "model.n_heads=2", "model.n_kv_heads=2", "model.d_ff=128",
    "model.moe_d_ff=64", "data.batch_size=16", "data.seq_len=64", "train.steps=60",
    "train.log_every=5", "train.eval_every=60", "train.progress=false",
    "train.tensorboard=false", "eval.batches=2", "eval.sample_tokens=0"])
workdir = tempfile.mkdtemp()
result = train(cfg, workdir, sample=False, quiet=True)
rows = [r for r in read_metrics(workdir) if r["split"] == "train"]
fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3))
left.plot([r["step"] for r in rows], [r["loss"] for r in rows])
left.set(xlabel="step", ylabel="train loss")
right.plot([r["step"] for r in rows], [r["moe_max_load"] for r in rows])
right.set(xlabel="step", ylabel="busiest expert load (x balanced)")
plt.show()
print("validation bits/byte:", round(result.eval_metrics["bits_per_byte"], 3))
