"""Dense <-> Monarch conversion of whole models (Dao et al. 2022, §3.4 and §5).

``to_monarch`` replaces a trained model's dense projections by their Frobenius-optimal Monarch
projections (:func:`jaxsparse.ops.monarch.project_to_monarch`), for dense-to-sparse
fine-tuning; ``to_dense`` goes back exactly (``monarch_to_dense``), the paper's "reverse
sparsification", which starts dense training from a Monarch model. Both return a new model
and leave the argument untouched. ``convert_params`` does either, as needed, to give a trained
model the structure another config describes (``train.init_from``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax.numpy as jnp
from flax import nnx

from jaxsparse.config import Config, ConfigError, ModelConfig, monarch_targets
from jaxsparse.nn import Attention, Linear, MoE, MonarchLinear, SwiGLU
from jaxsparse.ops.monarch import monarch_to_dense, project_to_monarch

KINDS = ("mlp", "attention")
Which = str | Callable[[tuple, nnx.Module], bool]


def _kind(model, path: tuple) -> str | None:
    """The kind of the projection at ``path`` by the model builders' own rule
    (``jaxsparse.models.transformer.feed_forward`` / ``attention_layer``): "mlp" for a block's
    dense feed-forward, "attention" for q/k/v/o of the Transformer's attention. Everything
    inside a MoE layer (routed and shared experts alike: "MoE experts stay dense"), the dense
    local attention of a routing transformer's lower layers, routers, embeddings and the output
    head have no kind and are never converted."""
    parent = _walk(model, path[:-1])
    if any(isinstance(_walk(model, path[:i]), MoE) for i in range(len(path) - 1)):
        return None
    if isinstance(parent, SwiGLU):
        return "mlp"
    if isinstance(parent, Attention) and _attention_converts(model):
        return "attention"
    return None


def _attention_converts(model) -> bool:
    """Whether the builder gives this model's :class:`Attention` layers Monarch projections:
    only the Transformer's (``models.transformer.attention_layer``); a model without a config
    (built by hand) is taken as it is."""
    cfg = getattr(model, "cfg", None)
    return not isinstance(cfg, ModelConfig) or cfg.name == "transformer"


def _selector(which: Which) -> Callable[[tuple, nnx.Module, str | None], bool]:
    if callable(which):
        return lambda path, module, kind: bool(which(path, module))
    kinds = None  # a list was an AttributeError on .split
    if isinstance(which, str):
        kinds = set(KINDS) if which == "all" else {w.strip() for w in which.split(",")}
    if kinds is None or not kinds <= set(KINDS):
        raise ValueError(f"which={which!r}: 'all', a comma-separated subset of {KINDS}, or a "
                         "callable (path, module) -> bool")
    return lambda path, module, kind: kind in kinds


def _walk(model, path):
    node = model
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def _replace(model, cls, which: Which, convert) -> nnx.Module:
    model = nnx.clone(model)
    select = _selector(which)
    targets = [(path, module) for path, module in nnx.iter_modules(model)
               if isinstance(module, cls) and path
               and select(path, module, _kind(model, path))]
    for path, module in targets:
        parent, key = _walk(model, path[:-1]), path[-1]
        if isinstance(key, int):  # an entry of an nnx.List (setattr needs a name)
            parent[key] = convert(module)
        else:
            setattr(parent, key, convert(module))
    return model


def _flat_dense(linear: Linear):
    n_in = math.prod(linear.in_shape)
    return linear.kernel[...].reshape(n_in, -1).T  # [out, in]: the matrix acting on columns


def linear_to_monarch(linear: Linear, nblocks: int | None = None,
                      implementation: str | None = None) -> MonarchLinear:
    """A MonarchLinear holding the optimal projection of ``linear``'s kernel."""
    if linear.out_dtype is not None:  # MonarchLinear returns its compute dtype
        raise ValueError(f"linear_to_monarch: this Linear returns out_dtype={linear.out_dtype!r} "
                         "(an output head's float32 logits), which a MonarchLinear does not "
                         "keep; leave it dense")
    dtype = linear.kernel[...].dtype
    monarch = MonarchLinear(linear.in_shape, linear.out_shape, rngs=nnx.Rngs(0), nblocks=nblocks,
                            logical_axes=linear.kernel.get_metadata().get("logical_axes"),
                            implementation=implementation, dtype=linear.dtype, param_dtype=dtype)
    w1, w2 = project_to_monarch(_flat_dense(linear).astype(jnp.float32), monarch.nblocks)
    monarch.w1[...] = w1.astype(dtype)
    monarch.w2[...] = w2.astype(dtype)
    return monarch


def monarch_to_linear(monarch: MonarchLinear) -> Linear:
    """The dense Linear equal to ``monarch`` (exact up to rounding)."""
    if monarch.bias is not None:
        raise ValueError("monarch_to_linear: this MonarchLinear has a bias and Linear has none")
    dtype = monarch.w1[...].dtype
    axes = monarch.logical_axes or (None,) * (len(monarch.in_shape) + len(monarch.out_shape))
    linear = Linear(monarch.in_shape, monarch.out_shape, logical_axes=axes, rngs=nnx.Rngs(0),
                    dtype=monarch.dtype, param_dtype=dtype)
    dense = monarch_to_dense(monarch.w1[...].astype(jnp.float32), monarch.w2[...].astype(jnp.float32))
    linear.kernel[...] = dense.T.reshape(linear.kernel.shape).astype(dtype)
    return linear


def to_monarch(model: nnx.Module, which: Which = "all", *, nblocks: int | None = None,
               implementation: str | None = None) -> nnx.Module:
    """A copy of ``model`` whose selected dense projections are Monarch projections.

    ``which``: ``"all"``, ``"mlp"``, ``"attention"``, ``"mlp,attention"``, or a predicate on
    ``(path, module)``.
    """
    return _replace(model, Linear, which,
                    lambda lin: linear_to_monarch(lin, nblocks, implementation))


def to_dense(model: nnx.Module, which: Which = "all") -> nnx.Module:
    """A copy of ``model`` whose selected MonarchLinear layers are dense Linear layers."""
    return _replace(model, MonarchLinear, which, monarch_to_linear)


def convert_params(model: nnx.Module, source: ModelConfig, target: ModelConfig) -> nnx.Module:
    """``model`` (built from ``source``) converted to the projections ``target`` asks for:
    dense layers that ``target.monarch`` names become Monarch, Monarch layers it does not name
    become dense (and Monarch layers in both are re-blocked where ``model.monarch_blocks``
    differs). Every other setting must agree, except those that resuming a run may change too
    (:func:`jaxsparse.config_usage.model_differences`: keys that only choose how the model is
    computed, and keys neither model reads)."""
    from jaxsparse.config_usage import HOW_KEYS, model_differences

    free = {"model.monarch", "model.monarch_blocks"}
    keys = [line.split(":", 1)[0].removeprefix("model.") for line in
            model_differences(Config(model=source), Config(model=target))]
    differences = [f"model.{key} differs ({getattr(source, key)!r} in the source run, "
                   f"{getattr(target, key)!r} here)" for key in keys if f"model.{key}" not in free]
    if differences:
        raise ConfigError(
            "train.init_from: " + "; ".join(differences) + "; only model.monarch, "
            "model.monarch_blocks and the keys that choose how the model is computed ("
            + ", ".join(f"model.{key}" for key in sorted(HOW_KEYS)) + ") may change")
    have, want = monarch_targets(source), monarch_targets(target)
    reblock = have & want if source.monarch_blocks != target.monarch_blocks else set()
    if (have - want) | reblock:
        model = to_dense(model, ",".join(sorted((have - want) | reblock)))
    if (want - have) | reblock:
        model = to_monarch(model, ",".join(sorted((want - have) | reblock)),
                           nblocks=target.monarch_blocks, implementation=target.monarch_impl)
    return model
