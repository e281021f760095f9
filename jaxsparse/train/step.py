"""The jitted train and eval steps: pure functions of (state, batch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxsparse.parallel import activation_sharding
from jaxsparse.train.optim import lr_schedule
from jaxsparse.train.state import TrainSetup


def _aux_losses(model) -> jax.Array:
    """Sum of every ``aux_loss`` a module sowed (``self.sow(nnx.Intermediate, "aux_loss", x)``)."""
    sown = nnx.pop(model, nnx.Intermediate)
    total = jnp.zeros((), jnp.float32)
    for path, value in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(sown))[0]:
        if any(getattr(k, "key", None) == "aux_loss" for k in path):
            total = total + jnp.sum(value)
    return total


def masked_token_stats(logits, targets, mask):
    """Summed cross-entropy, summed correct predictions and token count over ``mask``."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(ce * mask), jnp.sum(correct * mask), jnp.sum(mask)


def make_train_step(setup: TrainSetup):
    tx = setup.tx
    schedule = lr_schedule(setup.cfg.optimizer, setup.cfg.train.steps)

    def loss_fn(params, rest, batch):
        model = setup.model(params, rest)
        logits = model(batch["inputs"])
        aux = _aux_losses(model)
        ce_sum, correct, count = masked_token_stats(logits, batch["targets"], batch["mask"])
        loss = ce_sum / jnp.maximum(count, 1.0)
        new_rest = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
        return loss + aux, {"loss": loss, "aux_loss": aux, "accuracy": correct / jnp.maximum(count, 1.0),
                            "rest": new_rest}

    def step(state, batch):
        grads, out = jax.grad(loss_fn, has_aux=True)(state["params"], state["rest"], batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {
            "loss": out["loss"], "aux_loss": out["aux_loss"], "accuracy": out["accuracy"],
            "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"]),
        }
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                     "rest": out["rest"] if out["rest"] else state["rest"]}
        return new_state, metrics

    def traced(state, batch):
        with activation_sharding(setup.mesh):
            return step(state, batch)

    return jax.jit(traced, in_shardings=(setup.state_shardings, setup.batch_sharding),
                   out_shardings=(setup.state_shardings, None), donate_argnums=(0,))


def make_eval_step(setup: TrainSetup):
    def step(params, rest, batch):
        with activation_sharding(setup.mesh):
            logits = setup.model(params, rest)(batch["inputs"])
        return masked_token_stats(logits, batch["targets"], batch["mask"])

    return jax.jit(step, in_shardings=(setup.state_shardings["params"],
                                       setup.state_shardings["rest"], setup.batch_sharding))
