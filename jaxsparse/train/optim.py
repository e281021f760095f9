"""Optimiser: AdamW, linear warm-up then cosine decay, global-norm clipping."""

from __future__ import annotations

import jax
import optax

from jaxsparse.config import OptimizerConfig


def lr_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio,
    )


def default_decay_mask(params):
    """Decay matrices only (norm scales and biases are not decayed)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int, decay_mask=default_decay_mask,
                   groups=None) -> optax.GradientTransformation:
    """``decay_mask``: a pytree of bools like the params, or a function of the params.

    ``groups``: a pytree of labels like the params. Parameters labelled ``"memory_values"``
    (product-key memory values) get plain Adam at the constant ``cfg.memory_values_lr``, as
    Lample et al. train them; everything else gets AdamW on the schedule. Clipping sees the
    global norm of all gradients.
    """
    main = optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                       weight_decay=cfg.weight_decay, mask=decay_mask)
    labels = set(jax.tree.leaves(groups)) if groups is not None else {"default"}
    if labels == {"default"}:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), main)
    unknown = labels - {"default", "memory_values"}
    if unknown:
        raise ValueError(f"unknown optimizer groups {sorted(unknown)}; known: default, "
                         "memory_values")
    values = optax.adam(cfg.memory_values_lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.multi_transform({"default": main, "memory_values": values}, groups))
