"""The jitted train and eval steps: pure functions of (state, batch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxsparse.nn.intermediates import run_capturing
from jaxsparse.train.loss_scale import is_overflow, next_loss_scale
from jaxsparse.parallel import activation_sharding, sequence_axis_size
from jaxsparse.train.optim import lr_schedule
from jaxsparse.train.state import TrainSetup, schedule_counters


def _aux_losses(sown: dict[str, list[jax.Array]]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The sum of every sown ``aux_loss`` (added to the training loss), and MoE statistics
    averaged over layers: ``moe_max_load`` (the busiest expert's share times the number of
    experts: 1.0 is perfect balance) and ``moe_dropped`` (fraction of assignments dropped);
    routing-attention statistics likewise (:func:`jaxsparse.nn.routing.routing_statistics`)."""
    total = sum((jnp.sum(v) for v in sown.get("aux_loss", [])), jnp.zeros((), jnp.float32))
    stats = {}
    if "moe_load" in sown:
        stats["moe_max_load"] = jnp.mean(jnp.stack([jnp.max(v) * v.shape[-1] for v in sown["moe_load"]]))
        stats["moe_dropped"] = jnp.mean(jnp.stack(sown["moe_dropped"]))
    for name in ("routing_empty", "routing_fill", "routing_max_cluster"):
        if name in sown:
            stats[name] = jnp.mean(jnp.stack(sown[name]))
    return total, stats


def masked_token_stats(logits, targets, mask):
    """Summed cross-entropy, summed correct predictions and token count over ``mask``. A
    masked position's target is not read (it may hold an ignore label such as -100, whose
    NaN cross-entropy times a 0 mask was NaN)."""
    targets = jnp.where(mask > 0, targets, 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(ce * mask), jnp.sum(correct * mask), jnp.sum(mask)


def chunked_token_stats(model, x_BLD, targets, mask, chunk: int):
    """:func:`masked_token_stats` of ``model.logits(x)``, ``chunk`` positions at a time: each
    chunk's logits are rematerialised in the backward pass, so ``[B, L, vocab]`` never exists
    (the length is padded to a multiple of ``chunk`` with masked positions).

    Under sequence parallelism each shard's slice of the length is chunked on its own and a
    step takes one chunk from every shard, so the chunks stay where their positions are: a
    step over one global chunk held by one shard was an all-gather of it per step in the
    backward pass (3-block ``hydra_1p6b``, fsdp2 × sequence2 × tensor2: 8 x 512 MiB)."""
    batch, length, _ = x_BLD.shape
    shards = sequence_axis_size()
    shards = shards if length % shards == 0 else 1  # not split along the length otherwise
    local = length // shards
    pad = -local % chunk
    n = (local + pad) // chunk

    def split(t):  # [B, L, ...] -> [n, B, shards·chunk, ...]: step i, chunk i of every shard
        rest = t.shape[2:]
        t = t.reshape(batch, shards, local, *rest)
        if pad:  # masked positions at the end of every shard's slice
            t = jnp.pad(t, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * len(rest))
        t = jnp.moveaxis(t.reshape(batch, shards, n, chunk, *rest), 2, 0)
        return t.reshape(n, batch, shards * chunk, *rest)

    @jax.checkpoint
    def one(x_c, t_c, m_c):
        return jnp.stack(masked_token_stats(model.logits(x_c), t_c, m_c))

    def add(total, chunk_inputs):
        return total + one(*chunk_inputs), None

    total, _ = jax.lax.scan(add, jnp.zeros(3, jnp.float32), (split(x_BLD), split(targets), split(mask)))
    return total[0], total[1], total[2]


def all_finite(tree) -> jax.Array:
    """True when every floating-point entry of ``tree`` is finite (integer leaves such as
    optimiser step counts are skipped)."""
    checks = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
              if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def model_kwargs(batch) -> dict:
    """What the model takes from a batch besides the tokens: ``segment_ids`` for packed
    documents (``data.packed_documents``)."""
    return {"segment_ids": batch["segment_ids"]} if "segment_ids" in batch else {}


def schedule_count(opt_state, default):
    """The step count the optimiser evaluates its learning-rate schedule at (optax's
    ``ScaleByScheduleState.count``): the train step, less the steps skipped as non-finite
    (``train.nonfinite=skip`` keeps the optimiser state of a skipped step, count included), so
    the logged ``lr`` is the one applied; ``default`` where the optimiser has no schedule."""
    counts = [count for path, count in optax.tree_utils.tree_get_all_with_path(opt_state, "count")
              if any(getattr(key, "tuple_name", None) == "ScaleByScheduleState" for key in path)]
    return counts[0] if counts else default


def update_mask(model):
    """``model.update_mask()`` where the model has one (Hydra's curriculum: False for the
    parameters of the components that are off at its current step), else None. The train
    step zeroes the optimiser's updates where it is False, so a switched-off branch stays
    exactly as it is: its gradient is 0, but decoupled weight decay (AdamW) would still
    shrink it."""
    method = getattr(model, "update_mask", None)
    return method() if callable(method) else None


def make_gradients(setup: TrainSetup):
    """``gradients(params, rest, batch, scale=1.0) -> (grads, out)``: the parameter gradients
    of the training loss (loss + auxiliary losses) and ``out``, the loss, auxiliary loss,
    accuracy, new non-parameter state and layer statistics. ``scale`` multiplies the loss
    before differentiating and divides the gradients after (float16's dynamic loss scale,
    :mod:`jaxsparse.train.loss_scale`): the cotangents inside are ``scale`` times larger."""
    chunk = setup.cfg.train.loss_chunk

    def loss_fn(params, rest, batch, scale):
        model = setup.model(params, rest)
        if chunk and chunk < batch["inputs"].shape[1]:
            x, sown = run_capturing(model, "features", batch["inputs"], **model_kwargs(batch))
            aux, layer_stats = _aux_losses(sown)
            ce_sum, correct, count = chunked_token_stats(model, x, batch["targets"],
                                                         batch["mask"], chunk)
        else:
            logits, sown = run_capturing(model, "__call__", batch["inputs"], **model_kwargs(batch))
            aux, layer_stats = _aux_losses(sown)
            ce_sum, correct, count = masked_token_stats(logits, batch["targets"], batch["mask"])
        loss = ce_sum / jnp.maximum(count, 1.0)
        new_rest = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
        return (loss + aux) * scale, {"loss": loss, "aux_loss": aux,
                                      "accuracy": correct / jnp.maximum(count, 1.0),
                                      "rest": new_rest, "layer_stats": layer_stats}

    def gradients(params, rest, batch, scale=1.0):
        grads, out = jax.grad(loss_fn, has_aux=True)(params, rest, batch, scale)
        if not (isinstance(scale, float) and scale == 1.0):
            grads = jax.tree.map(lambda g: g / scale, grads)
        return grads, out

    return gradients


def make_train_step(setup: TrainSetup):
    tx = setup.tx
    schedule = lr_schedule(setup.cfg.optimizer, setup.cfg.train.steps)
    counters = schedule_counters(setup.rest_template)
    gradients = make_gradients(setup)

    def step(state, batch):
        # taken before the forward pass, which counts a curriculum step: the flags it uses
        may_change = update_mask(setup.model(state["params"], state["rest"]))
        loss_scale = state.get("loss_scale")  # float16 compute only
        scale = loss_scale["scale"] if loss_scale is not None else 1.0
        grads, out = gradients(state["params"], state["rest"], batch, scale)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        if may_change is not None:
            updates = jax.tree.map(lambda u, on: jnp.where(on, u, jnp.zeros_like(u)),
                                   updates, may_change)
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.tree.norm(grads)
        metrics = {
            "loss": out["loss"], "aux_loss": out["aux_loss"], "accuracy": out["accuracy"],
            "grad_norm": grad_norm,
            "lr": schedule(schedule_count(state["opt_state"], state["step"])),
            **out["layer_stats"],
        }
        updated = {"params": params, "opt_state": opt_state,
                   "rest": out["rest"] if out["rest"] else state["rest"]}
        # A non-finite loss or gradient would poison every parameter (clipping scales by
        # 1/inf = 0, and inf * 0 is NaN); and finite gradients can still give a non-finite
        # update (an lr or eps that float32 cannot hold: 0/0 where a gradient is zero).
        # Either way keep the state as it was, and say which it was. The new parameters are
        # checked, not the moments: those average clipped, finite gradients, and a bad
        # update shows in the parameters (checking all three cost hydra_tiny ~2% a step on
        # CPU, the parameters alone nothing measurable).
        finite_loss = jnp.isfinite(out["loss"] + out["aux_loss"])
        finite_grads = finite_loss & jnp.isfinite(grad_norm)
        finite_update = all_finite(params)
        applied = finite_grads & finite_update
        skipped_for_scale = jnp.asarray(False)
        if loss_scale is not None:
            # an overflow of the scaled cotangents is the scale's, not a non-finite step: the
            # update is skipped, the scale halved, and train.nonfinite is not involved
            skipped_for_scale = is_overflow(loss_scale, finite_loss, jnp.isfinite(grad_norm))
            metrics["loss_scale"] = loss_scale["scale"]
            metrics["scale_overflow"] = skipped_for_scale.astype(jnp.float32)
        metrics["nonfinite"] = (~applied & ~skipped_for_scale).astype(jnp.float32)
        metrics["nonfinite_update"] = (finite_grads & ~finite_update).astype(jnp.float32)
        kept = jax.tree.map(lambda new, old: jnp.where(applied, new, old), updated,
                            {name: state[name] for name in updated})
        # ... except the schedule counters in ``rest`` (curriculum, router and routing steps):
        # they advance with state["step"] on a skipped step too. Schedules are set in the
        # run's steps, which the loop logs and checkpoints by (the curriculum stage it
        # reports, its plot markers, the stage re-logged on a resume), and a skipped step
        # still uses up its batch; reverting them would leave the model k steps behind its
        # logs after k skips. The optimiser's count stays with the applied updates instead:
        # its lr is the one logged, and the gap to state["step"] counts the skipped steps.
        kept["rest"] = jax.tree.map(lambda counter, new, old: new if counter else old,
                                    counters, updated["rest"], kept["rest"])
        if loss_scale is not None:
            kept["loss_scale"] = next_loss_scale(loss_scale, skipped_for_scale, applied)
        return {"step": state["step"] + 1, **kept}, metrics

    def traced(state, batch):
        with activation_sharding(setup.mesh, setup.rules):
            return step(state, batch)

    return jax.jit(traced, in_shardings=(setup.state_shardings, setup.batch_sharding),
                   out_shardings=(setup.state_shardings, None), donate_argnums=(0,))


def make_eval_step(setup: TrainSetup):
    def step(params, rest, batch):
        with activation_sharding(setup.mesh, setup.rules):
            model = setup.model(params, rest)
            model.eval()  # e.g. no router jitter
            logits = model(batch["inputs"], **model_kwargs(batch))
        return masked_token_stats(logits, batch["targets"], batch["mask"])

    return jax.jit(step, in_shardings=(setup.state_shardings["params"],
                                       setup.state_shardings["rest"], setup.batch_sharding))
