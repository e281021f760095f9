"""Hydra (Chaudhary & Browning 2025, arXiv 2508.15099): a state-space backbone with sparse
global attention, a (chunk-level) mixture-of-experts feed-forward and two memories.

Every block is one pre-norm residual update with LayerScale-style gated branches,

    y = x + g_ssm·SSM(n) + g_sga·SGA(n) + g_ffn·FFN(n) + g_pkm·PKM(n) + g_ws·WS(n),  n = RMSNorm(x)

where SGA is present in every ``hydra_sga_every``-th block, FFN is the MoE layer
(chunk-level routing with ``moe_chunk``) in every ``moe_every``-th block when
``moe_experts > 0`` (the Hydra configs use ``moe_every=1``: every block) and a dense
SwiGLU in the others, PKM in the ``pkm_layers`` and the workspace read WS in the
``workspace_layers`` (every block by default), the reading blocks sharing one workspace
(slots and update weights). Gates are per-channel vectors starting at ``hydra_gate_init``.
The curriculum (:mod:`jaxsparse.models.curriculum`) multiplies each branch (and a MoE's
auxiliary losses) by 0 until its start step, and the train step leaves the parameters of a
branch that is off unchanged (:meth:`HydraLM.update_mask`).

Packed documents (``segment_ids``): every branch keeps to each token's document — the SSM
and its convolution restart, SGA reads keys of the document only, chunk-level MoE routing
pools the document's tokens only, the workspace restarts from its initial slots, and PKM is
per token. Chunks (MoE routing, workspace updates) stay aligned to absolute positions, so a
document placed mid-chunk is chunked differently than alone at the start of a row (its
outputs still depend on its own tokens only).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse.config import ModelConfig, pkm_layer_indices, workspace_layer_indices
from jaxsparse.models.curriculum import COMPONENTS, active_components, parse_curriculum
from jaxsparse.models.lm import LanguageModel, _check_tokens
from jaxsparse.models.transformer import apply_feed_forward, decode_feed_forward, feed_forward
from jaxsparse.nn.batch_local import batch_local
from jaxsparse.nn import MoE, ProductKeyMemory, RMSNorm
from jaxsparse.nn.diagonal_ssm import DiagonalSSM
from jaxsparse.nn.sga import SparseGlobalAttention
from jaxsparse.nn.workspace import WorkspaceMemory
from jaxsparse.ops.segments import refuse_while_decoding
from jaxsparse.parallel import constrain


class CurriculumStep(nnx.Variable):
    """Training steps the model has taken (drives the curriculum); part of the train state."""


def uses_sga(cfg: ModelConfig, layer: int) -> bool:
    return layer % cfg.hydra_sga_every == cfg.hydra_sga_every - 1


def ssm_width(cfg: ModelConfig) -> int:
    return cfg.hydra_ssm_width or cfg.expand * cfg.d_model


def _gate(cfg: ModelConfig):
    return nnx.Param(jnp.full((cfg.d_model,), cfg.hydra_gate_init, jnp.dtype(cfg.param_dtype)),
                     logical_axes=("embed",))


def curriculum_component(path: tuple) -> str | None:
    """The curriculum component (:data:`~jaxsparse.models.curriculum.COMPONENTS`) that the
    parameter at ``path`` (keys from the model down) belongs to: a block's ``ssm`` / ``sga`` /
    ``ffn`` / ``pkm`` module or its gate ``gate_<component>``, or the model's shared
    ``workspace``; None for the parts that are always on (embeddings, norms, output head)."""
    keys = [str(k) for k in path]
    if keys[:1] == ["workspace"]:
        return "workspace"
    if len(keys) >= 3 and keys[0] == "blocks":
        name = keys[2].removeprefix("gate_")
        return name if name in COMPONENTS else None
    return None


class HydraBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, layer: int = 0):
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        out_scale = 1.0 / (2 * cfg.n_layers)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
        self.ssm = DiagonalSSM(cfg.d_model, ssm_width(cfg), out_init_scale=out_scale,
                               max_half_life=float(cfg.max_seq_len) / 2,
                               conv_width=cfg.hydra_ssm_conv,
                               implementation=cfg.hydra_scan_impl, **kw)
        self.sga = (SparseGlobalAttention(
            cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim,
            window=cfg.hydra_window, max_global=cfg.hydra_max_global, rope_theta=cfg.rope_theta,
            out_init_scale=out_scale, implementation=cfg.hydra_sga_impl, **kw)
            if uses_sga(cfg, layer) else None)
        self.ffn = feed_forward(cfg, layer, rngs=rngs, out_scale=out_scale)
        self.pkm = (ProductKeyMemory(cfg.d_model, n_keys=math.isqrt(cfg.pkm_slots),
                                     heads=cfg.pkm_heads, k_dim=cfg.pkm_k_dim, knn=cfg.pkm_knn, **kw)
                    if layer in pkm_layer_indices(cfg) else None)
        self.use_workspace = layer in workspace_layer_indices(cfg)
        self.gate_ssm, self.gate_ffn = _gate(cfg), _gate(cfg)
        self.gate_sga = _gate(cfg) if self.sga is not None else None
        self.gate_pkm = _gate(cfg) if self.pkm is not None else None
        self.gate_workspace = _gate(cfg) if self.use_workspace else None

    def init_cache(self, batch, max_len, dtype, workspace=None):
        cache = {"ssm": self.ssm.init_cache(batch, max_len, dtype)}
        if self.sga is not None:
            cache["sga"] = self.sga.init_cache(batch, max_len, dtype)
        cache["ffn"] = self.ffn.init_cache(batch) if isinstance(self.ffn, MoE) else {}
        if self.use_workspace:
            cache["workspace"] = workspace.init_cache(batch)
        return cache

    def __call__(self, x_BLD, positions_BL, *, segment_ids=None, cache=None, cache_index=None,
                 active=None, workspace=None):
        refuse_while_decoding(segment_ids, cache)
        h = self.norm(x_BLD)
        new_cache = {} if cache is not None else None
        branches = []
        y, c = self.ssm(h, segment_ids=segment_ids, cache=None if cache is None else cache["ssm"])
        branches.append(("ssm", self.gate_ssm, y))
        if cache is not None:
            new_cache["ssm"] = c
        if self.sga is not None:
            y, c = self.sga(h, positions_BL, segment_ids=segment_ids,
                            cache=None if cache is None else cache["sga"], cache_index=cache_index)
            branches.append(("sga", self.gate_sga, y))
            if cache is not None:
                new_cache["sga"] = c
        if cache is not None:
            y, new_cache["ffn"] = decode_feed_forward(self.ffn, h, cache["ffn"], cache_index)
        else:  # an off MoE branch adds no auxiliary loss either
            y = apply_feed_forward(self.ffn, h, segment_ids,
                                   active=None if active is None else active["ffn"])
        branches.append(("ffn", self.gate_ffn, y))
        if self.pkm is not None:
            branches.append(("pkm", self.gate_pkm, batch_local(self.pkm, h, per_token=True)))
        if self.use_workspace:
            if workspace is None:
                raise ValueError("workspace: this block reads the model's shared workspace; call "
                                 "it through HydraLM (or pass workspace=model.workspace)")
            if cache is None:  # per row: under tensor parallelism each device takes a slice
                y = batch_local(workspace, h, segment_ids=segment_ids)
            else:
                y, new_cache["workspace"] = workspace.decode(h, cache["workspace"], cache_index)
            branches.append(("workspace", self.gate_workspace, y))
        out = x_BLD.astype(jnp.float32)
        for name, gate, y in branches:
            scale = gate[...].astype(jnp.float32) * (1.0 if active is None else active[name])
            out = out + scale[None, None, :] * y.astype(jnp.float32)
        # kept float32, as the Transformer's and Mamba's residual streams (rounded to
        # bfloat16 per block, the logits' error grew from 0.41% at 2 blocks to 0.65% at 12)
        return constrain(out, ("batch", "length", "embed")), new_cache


class HydraLM(LanguageModel):
    """``logits = model(tokens)``; see the module docstring for the block."""

    block_class = HydraBlock

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.workspace = (WorkspaceMemory(cfg.d_model, cfg.workspace_slots, cfg.workspace_chunk,
                                          rngs=rngs, dtype=jnp.dtype(cfg.dtype),
                                          param_dtype=jnp.dtype(cfg.param_dtype))
                          if cfg.workspace_slots else None)
        self.curriculum_step = CurriculumStep(jnp.zeros((), jnp.int32))
        self.deterministic = False  # Module.eval() sets it: no curriculum step counting

    def active(self):
        """``{component: 1.0 / 0.0}`` for the current curriculum step."""
        return active_components(self.cfg.hydra_curriculum, self.curriculum_step[...])

    def update_mask(self) -> dict | None:
        """Which parameters a training step at the current curriculum step may change: a pure
        dict shaped like the model's ``nnx.Param`` state (``state["params"]``) of bool scalars,
        False for the parameters of a component that is off — the blocks' ``ssm`` / ``sga`` /
        ``ffn`` / ``pkm`` modules, the shared ``workspace`` and the ``gate_<component>`` gates
        of each. Their gradient is 0 while off, but decoupled weight decay would still shrink
        them; the train step (:func:`jaxsparse.train.step.make_train_step`) zeroes their
        updates, so a branch switches on as it was initialised. Call it before the training
        forward pass, which counts the step. Traced flags: no recompilation per stage. None
        when the curriculum stages nothing (every component on from step 0): nothing to mask."""
        if not any(parse_curriculum(self.cfg.hydra_curriculum).values()):
            return None
        on = {name: flag > 0 for name, flag in self.active().items()}
        always = jnp.asarray(True)

        def flag(path, _) -> jax.Array:
            keys = tuple(getattr(k, "key", k) for k in path)  # pure dicts: DictKey(key)
            return on.get(curriculum_component(keys), always)

        return jax.tree_util.tree_map_with_path(flag, nnx.to_pure_dict(nnx.state(self, nnx.Param)))

    def _block_context(self, training_call: bool):
        context = {"active": self.active(), "workspace": self.workspace}
        if training_call and not self.deterministic:
            self.curriculum_step[...] = self.curriculum_step[...] + 1
        return context

    def routing_trace(self, tokens_BL):
        """What the sparse parts choose for ``tokens``, per block: ``experts`` (the first
        expert of every token, ``[B·L]``), ``router_probs`` (per routing decision: per chunk
        with chunk-level routing, per token when the length is not a multiple of it),
        ``routed`` (``[B·L]`` bool: False for the tokens whose expert no router chose — the
        first chunk of causal chunk-level routing, which has no earlier chunk to route from and
        takes expert 0; None where every token is routed), ``decisions_routed`` (the same
        per routing decision, as ``router_probs``) and ``pkm_slots`` (``[B, L, heads, knn]``,
        None without a memory). Each list has one entry per block: the four MoE entries are
        None for a block whose feed-forward is dense (``model.moe_every`` > 1). For
        inspection and the studies; jit it (``nnx.jit``) for speed. Inspecting changes no
        state: the routers' step counters (the SMoE-Dropout k schedule, the jitter noise),
        which a training-mode forward advances, are put back."""
        _check_tokens(tokens_BL)
        positions = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
        x = self.embed(tokens_BL)
        context = self._block_context(training_call=False)
        routers = [block.ffn for block in self.blocks if isinstance(block.ffn, MoE)]
        router_steps = [moe.step[...] for moe in routers]
        trace = {"experts": [], "router_probs": [], "routed": [], "decisions_routed": [],
                 "pkm_slots": []}
        for block in self.blocks:
            h = block.norm(x)
            if not isinstance(block.ffn, MoE):
                for key in ("experts", "router_probs", "routed", "decisions_routed"):
                    trace[key].append(None)
            else:
                # as MoE.__call__ routes a length that is not a multiple of the chunk: by
                # per-token router inputs from the padded chunks (route alone needs whole ones)
                inputs = (block.ffn.chunk_router_inputs(h)
                          if block.ffn.chunk and h.shape[1] % block.ffn.chunk else None)
                choice, routed = block.ffn.route(h, router_inputs=inputs)
                trace["experts"].append(choice.expert_index[:, 0])
                trace["router_probs"].append(routed.probs)
                trace["routed"].append(choice.counted)
                trace["decisions_routed"].append(routed.counted)
            trace["pkm_slots"].append(block.pkm.lookup(h)[1] if block.pkm is not None else None)
            x, _ = block(x, positions, **context)
        for moe, step in zip(routers, router_steps):
            moe.step[...] = step
        return trace

    def init_cache(self, batch: int, max_len: int | None = None, dtype=None):
        max_len, dtype = self._cache_arguments(batch, max_len, dtype)
        return {"index": jnp.zeros((), jnp.int32),
                "layers": [b.init_cache(batch, max_len, dtype, self.workspace) for b in self.blocks]}


def parameter_accounting(cfg: ModelConfig) -> dict[str, int]:
    """Parameters per component from abstract shapes (nothing is allocated): ``embedding``,
    ``ssm``, ``sga``, ``ffn`` (dense or MoE experts + routers), ``pkm``, ``workspace`` and
    ``norms_and_gates``, plus ``total``."""
    from jaxsparse.models.registry import build

    abstract = nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0)))
    counts = {name: 0 for name in ("embedding", "ssm", "sga", "ffn", "pkm", "workspace",
                                   "norms_and_gates")}
    for path, leaf in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        keys = [str(k) for k in path]
        component = next((k for k in keys if k in COMPONENTS), None)
        if keys[0] in ("embed", "lm_head"):
            component = "embedding"
        elif component is None or keys[-1].startswith("gate_"):
            component = "norms_and_gates"
        counts[component] += math.prod(leaf.shape)
    counts["total"] = sum(counts.values())
    return counts
