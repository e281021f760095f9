"""Dynamic loss scaling for float16 compute.

float16's normal range ends at 6e-5: unscaled, small cotangents flush towards zero (Mamba's
``dt_proj`` gradients were 51% off float32's at batch 32 x 128), while a fixed large scale
overflows (65504) wherever the gradients are large. The scheme of Micikevicius et al. 2018
("Mixed Precision Training", §3.2), as PyTorch's GradScaler and jmp's DynamicLossScale run
it: multiply the loss by ``scale`` before differentiating and divide the (float32) gradients
after; a step whose gradients overflow is not applied and halves the scale, and every
``PERIOD`` applied steps in a row double it, so the scale stays near the largest one that
does not overflow.

The state is two scalars in the train state (``state["loss_scale"]``, float16 runs only), so
a resumed run continues with the scale it had. bfloat16 has float32's range and needs none.
"""

from __future__ import annotations

import jax.numpy as jnp

INITIAL_SCALE = 2.0 ** 15  # GradScaler's and jmp's usual start: a few overflows find the level
PERIOD = 2000  # applied steps in a row before the scale doubles
MIN_SCALE = 1.0  # an overflow at this scale is a non-finite step (train.nonfinite)
MAX_SCALE = 2.0 ** 24  # a bound on the doubling: float32 loss * 2^24 stays finite


def uses_loss_scale(model_dtype: str) -> bool:
    return model_dtype == "float16"


def initial_loss_scale() -> dict:
    return {"scale": jnp.asarray(INITIAL_SCALE, jnp.float32),
            "good_steps": jnp.zeros((), jnp.int32)}


def is_overflow(state: dict, loss_finite, grads_finite):
    """A step whose loss is finite but whose gradients are not, at a scale that can still be
    lowered: the scale's fault, not the model's (the forward pass is not scaled)."""
    return loss_finite & ~grads_finite & (state["scale"] > MIN_SCALE)


def next_loss_scale(state: dict, overflow, applied) -> dict:
    """Halve after an overflow; double after ``PERIOD`` applied steps in a row; a step skipped
    for another reason (a non-finite loss) leaves the scale and the count as they were."""
    scale, good = state["scale"], state["good_steps"]
    good_after = jnp.where(applied, good + 1, jnp.where(overflow, 0, good))
    grow = good_after >= PERIOD
    scale = jnp.where(overflow, jnp.maximum(scale / 2, MIN_SCALE),
                      jnp.where(grow, jnp.minimum(scale * 2, MAX_SCALE), scale))
    return {"scale": scale.astype(jnp.float32),
            "good_steps": jnp.where(grow, 0, good_after).astype(jnp.int32)}
