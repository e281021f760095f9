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
# # jaxsparse quick start
#
# Build a config, train a small byte-level Transformer on the Python standard library's
# source for a few steps, sample from it and plot the curves — all through the public API,
# on whatever JAX backend this kernel has (CPU is fine: about a minute).
#
# On Colab, install first with one cell, pointing pip at this repository's git URL:
# `!pip install -q "jaxsparse @ git+<repository URL>"` (the named configs ship with the
# package). Inside a checkout, `pip install -e .` is enough.

# %%
import importlib.util
import tempfile
from pathlib import Path

if importlib.util.find_spec("jaxsparse") is None:
    raise ImportError("install jaxsparse first: pip install -e . (in the repository)")

import jax

import jaxsparse
from jaxsparse import configs
from jaxsparse.config import apply_overrides, to_json, validate

print("jaxsparse", jaxsparse.__version__, "| jax", jax.__version__, "|", jax.devices())
print("named configs:", configs.names())

# %% [markdown]
# ## 1. A config
# Named configs are frozen dataclasses; `apply_overrides` takes the same `section.key=value`
# strings as `jaxsparse train --set` and checks that each key exists and each value parses to
# the key's type. Ranges and combinations (a batch size of 0, say) are checked by `validate`,
# which `train` also runs first.

# %%
cfg = validate(apply_overrides(configs.get("transformer_tiny"), [
    "model.d_model=64", "model.n_layers=2", "model.d_ff=192", "data.seq_len=64",
    "data.batch_size=16", "train.steps=60", "train.eval_every=30", "train.log_every=10",
    "train.checkpoint_every=60", "eval.batches=2", "eval.sample_tokens=80",
    "optimizer.warmup_steps=10",
]))
print(to_json(cfg)[:400], "...")

# %% [markdown]
# ## 2. Train
# `train` shows a progress bar, writes `metrics.jsonl`, TensorBoard events and orbax
# checkpoints to the workdir, and resumes from the latest checkpoint if run again.

# %%
from jaxsparse.train import train

workdir = Path(tempfile.mkdtemp(prefix="jaxsparse-quickstart-"))
result = train(cfg, workdir)
print("eval:", {k: round(float(v), 3) for k, v in result.eval_metrics.items()})
assert result.eval_metrics["bits_per_byte"] < 8.0  # better than uniform over bytes

# %% [markdown]
# ## 3. Generate
# Reload the latest checkpoint and sample with the model's key/value cache.

# %%
from jaxsparse.train import load, sample_text

cfg_loaded, setup, state = load(workdir)
print(sample_text(setup, state, cfg_loaded, prompt="import ", max_new_tokens=80))

# %% [markdown]
# ## 4. Plot

# %%
from jaxsparse.train.plots import plot_run

png = plot_run(workdir)
try:
    from IPython.display import Image, display

    display(Image(filename=str(png)))
except ImportError:
    print("plot written to", png)
