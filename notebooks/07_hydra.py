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
# # Hydra: SSM + sparse global attention + MoE + memories
#
# Hydra (Chaudhary & Browning 2025) adds gated branches to a state-space backbone:
# `y = x + g_ssm·SSM(n) + g_sga·SGA(n) + g_ffn·MoE(n) [+ g_pkm·PKM(n)] + g_ws·Workspace(n)` with
# `n = RMSNorm(x)`. This notebook builds the model, reads its parameter accounting, trains a
# small one on multi-query associative recall (MQAR) and looks inside: the gates, which
# experts tokens use, and what the product-key memory reads.

# %%
import tempfile

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from jaxsparse import configs
from jaxsparse.config import apply_overrides
from jaxsparse.models.curriculum import stages
from jaxsparse.models.hydra import parameter_accounting
from jaxsparse.train import train
from jaxsparse.train.loop import load

# %% [markdown]
# ## Parameter accounting
# Computed from abstract shapes (`jax.eval_shape`), so the 1.6B design envelope costs nothing
# to inspect. The MoE feed-forward holds most parameters; each token uses one or two experts.

# %%
for name in ("hydra_tiny", "hydra_29m", "hydra_1p6b"):
    parts = parameter_accounting(configs.get(name).model)
    print(f"{name:11s}", "  ".join(f"{k} {v / 1e6:.2f}M" for k, v in parts.items()))

# %% [markdown]
# ## A staged curriculum
# Components switch on at configured steps (`model.hydra_curriculum`); a branch that is off
# contributes nothing and gets no gradient, and its gate still holds its small initial value
# when it switches on.

# %%
spec = "sga:30,memory:60"
for first, components in stages(spec):
    print(f"from step {first:3d}: {', '.join(components)}")

# %% [markdown]
# ## Train a small Hydra on MQAR
# Key-value pairs open the sequence; later each key is queried and the model must produce its
# value. Accuracy counts the answers only. 80 steps keep this notebook quick and only show the
# loop at work (the curriculum switches SGA on at step 30 and the memories at 60); the
# studies in `experiments/hydra/study.py` train long enough to compare models.

# %%
cfg = apply_overrides(configs.get("hydra_tiny"), [
    "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=4",
    "model.hydra_sga_every=2", "model.hydra_window=8", "model.hydra_max_global=16",
    f"model.hydra_curriculum={spec}", "model.moe_d_ff=128", "model.moe_chunk=8",
    "model.pkm_layers=0", "model.pkm_slots=256", "model.pkm_k_dim=16", "model.pkm_knn=4",
    "model.workspace_chunk=8", "model.workspace_layers=", "data.task=mqar", "data.seq_len=64",
    "model.max_seq_len=64",
    "data.num_kv_pairs=8", "data.batch_size=32", "train.steps=80", "train.eval_every=40",
    "train.log_every=10", "train.checkpoint_every=80", "train.tensorboard=false",
    "optimizer.weight_decay=0.0", "optimizer.warmup_steps=20", "eval.batches=2",
])
workdir = tempfile.mkdtemp(prefix="jaxsparse-hydra-")
result = train(cfg, workdir)
print("answer accuracy:", round(result.eval_metrics["accuracy"], 3))

# %% [markdown]
# ## Gates
# Each branch's LayerScale gate is a vector over channels; its mean magnitude shows how much
# the trained model leans on each component (all started at `hydra_gate_init`).

# %%
_, setup, state = load(workdir)
model = setup.model(state["params"], state["rest"])
model.eval()
for i, block in enumerate(model.blocks):
    gates = {name: float(jnp.abs(getattr(block, f"gate_{name}")[...]).mean())
             for name in ("ssm", "sga", "ffn", "pkm", "workspace")
             if getattr(block, f"gate_{name}", None) is not None}
    print(f"block {i}:", "  ".join(f"{k} {v:.3f}" for k, v in gates.items()))

# %% [markdown]
# ## Expert usage and memory reads
# Which expert each chunk of 8 tokens is routed to (top-1, chosen from the previous chunk so
# it stays causal; the first chunk of a row has none to route from and is left out), and how
# many distinct product-key memory slots one batch reads.

# %%
from flax import nnx

from jaxsparse.data import Shard, make_stream

batch = make_stream(cfg, Shard(0, 1)).eval_batch(0, 1)
tokens = jnp.asarray(batch["inputs"])
trace = nnx.jit(lambda m, t: m.routing_trace(t))(model, tokens)
fig, axes = plt.subplots(1, len(model.blocks), figsize=(10, 3))
for i, block in enumerate(model.blocks):
    if trace["experts"][i] is None:  # a dense feed-forward (model.moe_every > 1)
        axes[i].set(title=f"block {i}: dense feed-forward")
        axes[i].axis("off")
    else:
        experts = np.asarray(trace["experts"][i])
        if trace["routed"][i] is not None:
            experts = experts[np.asarray(trace["routed"][i])]
        axes[i].hist(experts, bins=np.arange(cfg.model.moe_experts + 1) - 0.5, rwidth=0.8)
        axes[i].set(title=f"block {i}: tokens per expert", xlabel="expert")
    if trace["pkm_slots"][i] is not None:
        print(f"block {i}: PKM read {len(np.unique(np.asarray(trace['pkm_slots'][i])))} distinct "
              f"slots of {block.pkm.slots} for {tokens.size} tokens")
plt.tight_layout()
plt.show()
