"""Frozen dataclass configs, command-line overrides, validation and JSON round-trips.

A run is described by one :class:`Config` made of six sections (model, data, optimizer,
mesh, train, eval). Named configs live in ``experiments/configs/<name>.py`` and expose
``get_config()``; :mod:`jaxsparse.configs` finds them. Every error raised here is a
:class:`ConfigError` that names the offending key and says what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any

from jaxsparse.errors import SettingsWarning


class ConfigError(ValueError):
    """A config key, value or combination that cannot be used."""


class SampleLengthWarning(SettingsWarning):
    """``eval.sample_tokens`` asks for more bytes than ``model.max_seq_len`` leaves after the
    prompt: the end-of-training sample is cut short."""


class ScheduleLengthWarning(SettingsWarning):
    """A schedule longer than the run (``train.steps``): the warm-up is shortened, or a
    component or phase it stages never starts."""


class PrecisionWarning(SettingsWarning):
    """``model.param_dtype='bfloat16'``: no float32 master copy, so updates smaller than a
    weight's bfloat16 spacing round away."""


class CapacityWarning(SettingsWarning):
    """``model.moe_capacity_factor`` set: which tokens drop depends on every token the layer
    is given, later ones included, and decoding (which never fills a buffer) differs from the
    full pass."""


# --- sections -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """Architecture. ``name`` selects a builder in :mod:`jaxsparse.models`."""

    name: str = "transformer"
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int = 384  # SwiGLU hidden width
    max_seq_len: int = 1024  # longest sequence a decode cache is built for
    rope_theta: float = 10_000.0
    tie_embeddings: bool = False
    # Rematerialise each block in the backward pass (activation checkpointing): only the
    # residual stream between blocks is kept, the rest is recomputed — what lets long
    # sequences and large models fit (see `jaxsparse dryrun`).
    remat: bool = False
    norm_eps: float = 1e-6
    dtype: str = "float32"  # compute dtype; parameters stay in param_dtype
    param_dtype: str = "float32"
    attention_impl: str | None = None  # passed to ops.attention.dot_product_attention
    attention_mask: str = "causal"  # a spec of jaxsparse.ops.mask_specs, e.g. "local:256"
    # selective SSMs (model.name "mamba" / "mamba2")
    d_state: int = 16
    expand: int = 2  # d_inner = expand * d_model
    d_conv: int = 4
    dt_rank: int | None = None  # Mamba-1; None: ceil(d_model / 16)
    ssm_head_dim: int = 64  # Mamba-2
    ssm_groups: int = 1  # Mamba-2 groups of B and C
    ssm_chunk: int = 64
    ssm_impl: str | None = None  # Mamba-1 scan implementation (ops.ssm.selective_scan)
    # mixture of experts (jaxsparse.nn.MoE) in the Transformer's feed-forward layers
    moe_experts: int = 0  # 0: dense feed-forward everywhere
    moe_k: int = 2  # experts per token (the starting k of the random router's schedule)
    moe_every: int = 2  # MoE in every n-th layer (layers n-1, 2n-1, ...)
    moe_d_ff: int | None = None  # expert hidden width; None: d_ff
    moe_shared_experts: int = 0  # always-on experts of the same width, beside the routed ones
    moe_router: str = "top_k"  # top_k | random (SMoE-Dropout); expert_choice is non-causal
    moe_capacity_factor: float | None = None  # None: dropless
    moe_renormalize: bool = True  # top-k weights rescaled to sum to 1
    moe_jitter: float = 0.0  # multiplicative router-input noise in training (Switch: 0.01)
    moe_chunk: int = 0  # > 0: route chunks of this many tokens as one (causal pooling)
    moe_aux_weight: float = 0.01  # load-balancing loss weight
    moe_z_weight: float = 1e-3  # router z-loss weight
    moe_k_end: int | None = None  # random router: k grows linearly from moe_k to this
    moe_k_schedule_steps: int = 1000  # ... over this many steps
    # k at evaluation/generation (SMoE-Dropout: more experts); with moe_renormalize=False
    # the gates' sum, so the output's scale, changes with it (a warning says so)
    moe_eval_k: int | None = None
    moe_grouped_impl: str | None = None  # ops.moe.grouped_matmul implementation
    # Monarch matrices (jaxsparse.nn.MonarchLinear) in place of dense projections
    monarch: str = ""  # which: "" (none), "mlp", "attention" or "mlp,attention"
    monarch_blocks: int | None = None  # blocks per factor; None: ~sqrt of the smaller width
    monarch_impl: str | None = None  # ops.monarch.monarch_matmul implementation
    # routing transformer (model.name "routing_transformer"; jaxsparse.nn.RoutingAttention)
    routing_heads: int = 2  # routing heads per routing layer; the other heads are local
    routing_clusters: int = 8  # k-means centroids per routing head (~sqrt(seq_len))
    routing_window: int = 16  # keys a routing query reads per probe (~seq_len / clusters / probes)
    routing_local_window: int = 32  # keys a local head reads (causal sliding window)
    routing_skip_first: int = 2  # the first layers are local-only (the paper's skip_first)
    routing_shared_qk: bool = False  # keys are the normalised queries (no key projection)
    routing_decay: float = 0.999  # centroid EMA decay
    routing_commitment: float = 1e-4  # commitment loss weight
    routing_dense_steps: int = 0  # warm-up: routing heads attend densely for these steps
    routing_center: bool = True  # route keys by k - running mean (stops k-means collapsing)
    routing_key_centroids: bool = True  # centroids follow keys only (separate QK: no empty windows)
    # clusters a routing query reads (1: the paper; >1: multi-probe, probes·window keys in all;
    # on MQAR-1024, 4 probes of window/4 keys match 4 probes of window at one probe's cost)
    routing_probes: int = 1
    routing_reseed: bool = True  # dead centroids (no key in a batch) jump to ill-fitting keys
    # Hydra (model.name "hydra"; jaxsparse.models.hydra): SSM + SGA + MoE/FFN per block
    hydra_sga_every: int = 3  # sparse global attention in every n-th block (layers n-1, 2n-1..)
    hydra_window: int = 256  # SGA causal local window
    hydra_max_global: int = 512  # SGA global tokens a query reads (the paper's budget)
    hydra_ssm_width: int | None = None  # channels of the diagonal SSM; None: expand * d_model
    hydra_ssm_conv: int = 0  # causal depthwise conv width on the SSM's input; 0: none
    hydra_scan_impl: str | None = None  # the SSM's scan (ops.diagonal_ssm.linear_scan)
    hydra_sga_impl: str | None = None  # SGA's algorithm (ops.sga); None: by sequence length
    hydra_gate_init: float = 0.1  # LayerScale-style branch gates start here
    hydra_curriculum: str = ""  # "component:start_step,..." (jaxsparse.models.curriculum)
    # product-key memory (jaxsparse.nn.ProductKeyMemory), Hydra layers listed in pkm_layers
    pkm_layers: str = ""  # comma-separated layer indices, e.g. "1" or "3,7"
    pkm_slots: int = 65_536  # memory slots: a perfect square (two sub-key tables of sqrt each)
    pkm_heads: int = 4
    pkm_k_dim: int = 128  # query/key width (two halves)
    pkm_knn: int = 32  # slots read per head
    # workspace memory (jaxsparse.nn.WorkspaceMemory), one shared by the Hydra blocks that read it
    workspace_slots: int = 0  # 0: no workspace
    workspace_chunk: int = 64  # tokens per slot rewrite
    workspace_layers: str = ""  # blocks that read it, e.g. "3" or "1,3"; "": every block

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads


TASKS = ("text", "mqar", "selective_copying", "induction_heads", "multi_hop")
MQAR_FILLERS = ("zero", "random")


@dataclass(frozen=True)
class DataConfig:
    """Where batches come from. ``task="text"`` reads bytes; the others are synthetic."""

    task: str = "text"
    path: str | None = None  # glob of text files; None: the Python standard library's source
    seq_len: int = 128
    batch_size: int = 32  # global batch, split over the data-parallel mesh axes
    # synthetic tasks evaluate on the batches of seed + 1,000,003: disjoint from this run's
    # training, but a run with that seed trains on them (sweep nearby seeds)
    seed: int = 0
    valid_every: int = 20  # every n-th file (by a stable hash of its path) is validation
    # text: give the model per-token document ids (segment_ids) from the NUL separators between
    # files, so no token attends to or carries recurrent state from another file in its window
    packed_documents: bool = False
    cache_dir: str | None = None  # None: ~/.cache/jaxsparse
    # synthetic tasks
    num_kv_pairs: int = 8  # MQAR key/value pairs per example
    mqar_filler: str = "zero"  # MQAR positions between queries: "zero" or "random" (Zoology)
    num_tokens_to_copy: int = 16  # selective copying
    induction_prefix: int = 16  # induction heads: length of the repeated random prefix
    hops: int = 3  # multi-hop: assignments in each variable chain (1 = plain recall)
    chains: int = 4  # multi-hop: independent chains per example (one query each)


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warm-up, cosine decay to ``min_lr_ratio * lr`` and global-norm clipping."""

    lr: float = 3e-3
    # at most train.steps - 1 (a longer one is shortened to that: the rate then peaks at the
    # last step and never decays; validate warns, ScheduleLengthWarning)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    memory_values_lr: float = 1e-3  # product-key memory values: own Adam, constant lr


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; exactly one axis may be -1 ("all remaining devices"), and the
    sharding preset that decides what is split over which axis (``jaxsparse configs
    --sharding NAME`` prints one; ``jaxsparse.parallel.rules.PRESETS`` holds them)."""

    data: int = -1
    fsdp: int = 1
    expert: int = 1  # experts of MoE layers split over this axis (tokens are too)
    sequence: int = 1  # activations split along the sequence (context parallelism)
    tensor: int = 1
    preset: str = "full"  # data | fsdp | fsdp_tp | fsdp_tp_ep | fsdp_tp_sp | full


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 600
    log_every: int = 25
    eval_every: int = 200
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    seed: int = 0  # parameter initialisation
    distributed: bool = False  # call jax.distributed.initialize() (multi-host)
    progress: bool = True  # tqdm bar
    # Start from the latest weights of another run's workdir (fresh optimiser state); dense
    # and Monarch projections are converted where model.monarch differs (jaxsparse.sparsify).
    init_from: str | None = None
    tensorboard: bool = True
    # Positions per chunk of the output head + loss in the training step (0: all at once).
    # Each chunk's [batch, chunk, vocab] logits are recomputed in the backward pass instead of
    # keeping [batch, length, vocab] alive: the largest activation of a large-vocabulary model.
    loss_chunk: int = 0
    # A step whose loss or gradient is not finite is never applied (the state stays as it
    # was, so no checkpoint ever holds NaN); then "stop" ends the run with an error naming the
    # step, "skip" goes on with the next batch (logged).
    nonfinite: str = "stop"


NONFINITE_POLICIES = ("stop", "skip")


@dataclass(frozen=True)
class EvalConfig:
    batches: int = 8
    sample_prompt: str = "def "
    sample_tokens: int = 160
    temperature: float = 0.8
    top_k: int = 0  # 0: sample from the full distribution


@dataclass(frozen=True)
class Config:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


SECTIONS = ("model", "data", "optimizer", "mesh", "train", "eval")


# --- overrides ------------------------------------------------------------------------------


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_keys(cfg: Config) -> list[str]:
    """All dotted keys that ``--set`` accepts."""
    keys = ["name"]
    for section in SECTIONS:
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(getattr(cfg, section))]
    return keys


def did_you_mean(key: str, options) -> str:
    """`` Did you mean a, b?`` for the options close to a misspelled ``key`` (or "")."""
    close = difflib.get_close_matches(key, list(options), n=3)
    return f" Did you mean {', '.join(close)}?" if close else ""


def _unknown(key: str, options: list[str], what: str) -> ConfigError:
    return ConfigError(f"unknown {what} {key!r}.{did_you_mean(key, options)} "
                       f"Valid: {', '.join(options)}")


def _parse_value(key: str, text: str, annotation: Any) -> Any:
    """Parse ``text`` as ``annotation`` (int, float, bool, str, or ``X | None``)."""
    args = typing.get_args(annotation)
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    if is_union:
        inner = [a for a in args if a is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        annotation = inner[0]
    if annotation is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key}={text!r}: expected a bool (true/false)")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected an int") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected a float") from None
    if annotation is str:
        return text
    raise ConfigError(f"{key}: cannot parse values of type {annotation}")  # pragma: no cover


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings; raises ConfigError naming any bad key or value."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected the form section.key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if key == "name":
            cfg = dataclasses.replace(cfg, name=text)
            continue
        if "." not in key:
            raise _unknown(key, valid_keys(cfg), "config key")
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise _unknown(section, list(SECTIONS), "config section")
        sub = getattr(cfg, section)
        types_ = _field_types(type(sub))
        if name not in types_:
            raise _unknown(key, [f"{section}.{n}" for n in types_], "config key")
        value = _parse_value(key, text, types_[name])
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(sub, **{name: value})})
    return cfg


# --- validation -----------------------------------------------------------------------------

DTYPES = ("float32", "bfloat16", "float16")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _matches(value: Any, annotation: Any) -> bool:
    """isinstance for the simple annotations used here (bool is not an int; an int is a float)."""
    options = [a for a in typing.get_args(annotation)] or [annotation]
    for option in options:
        if option is type(None) and value is None:
            return True
        if option is bool and isinstance(value, bool):
            return True
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if option is str and isinstance(value, str):
            return True
    return False


# XLA's sizes and indices are 32-bit: a larger count fails deep in lowering (the seeds have
# their own bound, 2**32: JAX keys take 32-bit seeds)
INT_LIMIT = 2 ** 31
OWN_BOUNDS = ("train.seed", "data.seed")


def _check_fields(section: str, sub: Any, cls: type) -> None:
    """``sub`` is a ``cls`` (a config file's ``Config(model={...})`` was an AttributeError
    later), each value of its annotated type, floats finite, ints within 32 bits."""
    _check(isinstance(sub, cls), f"{section}={sub!r}: expected a {cls.__name__}")
    for name, annotation in _field_types(cls).items():
        value = getattr(sub, name)
        _check(_matches(value, annotation), f"{section}.{name}={value!r}: expected {annotation}")
        _check(not isinstance(value, float) or math.isfinite(value),
               f"{section}.{name}={value!r}: must be a finite number")
        _check(not isinstance(value, int) or f"{section}.{name}" in OWN_BOUNDS
               or -INT_LIMIT < value < INT_LIMIT,
               f"{section}.{name}={value}: must be below 2**31 in size")


def _check_float32_kernel(m: ModelConfig, key: str, instead: str) -> None:
    """``model.<key>="native"`` names a C++ CPU kernel that computes in float32: with another
    ``model.dtype`` the run wrote its workdir and then failed at the first step, naming the
    op's arguments, not the keys."""
    _check(getattr(m, key) != "native" or m.dtype == "float32",
           f"model.{key}='native' computes in float32; model.dtype={m.dtype!r} needs {instead} "
           "(None picks the native kernel where it applies)")


def _validate_moe(m: ModelConfig) -> None:
    if m.moe_experts == 0:
        return
    _check(m.moe_experts >= 1, f"model.moe_experts={m.moe_experts}: must be >= 0")
    _check(1 <= m.moe_k <= m.moe_experts,
           f"model.moe_k={m.moe_k}: must be in [1, model.moe_experts={m.moe_experts}]")
    _check(m.moe_every >= 1, f"model.moe_every={m.moe_every}: must be >= 1")
    _check(m.moe_capacity_factor is None or m.moe_capacity_factor > 0,
           f"model.moe_capacity_factor={m.moe_capacity_factor}: must be > 0, or None (dropless)")
    _check(m.moe_router != "expert_choice",
           "model.moe_router='expert_choice': each expert would pick among all tokens, later "
           "ones included, which leaks the future in a causal decoder; use 'top_k' or 'random'")
    _check(m.moe_router in ("top_k", "random"),
           f"model.moe_router={m.moe_router!r}: allowed ('top_k', 'random')")
    _check(m.moe_k_end is None or m.moe_k <= m.moe_k_end <= m.moe_experts,
           f"model.moe_k_end={m.moe_k_end}: must be in [model.moe_k={m.moe_k}, "
           f"model.moe_experts={m.moe_experts}]")
    _check(m.moe_chunk >= 0, f"model.moe_chunk={m.moe_chunk}: must be >= 0")
    _check(m.moe_d_ff is None or m.moe_d_ff >= 1,
           f"model.moe_d_ff={m.moe_d_ff}: must be >= 1, or None (model.d_ff)")
    _check(m.moe_shared_experts >= 0,
           f"model.moe_shared_experts={m.moe_shared_experts}: must be >= 0")
    _check(m.moe_k_schedule_steps >= 1,
           f"model.moe_k_schedule_steps={m.moe_k_schedule_steps}: must be >= 1")
    for key in ("moe_aux_weight", "moe_z_weight"):
        _check(getattr(m, key) >= 0, f"model.{key}={getattr(m, key)}: must be >= 0")
    _check(0 <= m.moe_jitter < 1, f"model.moe_jitter={m.moe_jitter}: must be in [0, 1) (router "
           "inputs are scaled by a factor drawn from [1 - jitter, 1 + jitter])")
    from jaxsparse.ops.moe.grouped import GMM_IMPLEMENTATIONS

    _check(m.moe_grouped_impl in GMM_IMPLEMENTATIONS,
           f"model.moe_grouped_impl={m.moe_grouped_impl!r}: allowed {GMM_IMPLEMENTATIONS}")
    _check_float32_kernel(m, "moe_grouped_impl", "'tiles' or None")
    _check(m.moe_eval_k is None or 1 <= m.moe_eval_k <= m.moe_experts,
           f"model.moe_eval_k={m.moe_eval_k}: must be in [1, model.moe_experts={m.moe_experts}]")


def mamba2_heads(m: ModelConfig) -> int:
    """Mamba-2's SSM heads: ``expand * d_model / ssm_head_dim``."""
    return m.expand * m.d_model // m.ssm_head_dim


def _validate_ssm(m: ModelConfig) -> None:
    from jaxsparse.ops.ssm import SCAN_IMPLEMENTATIONS

    _check(m.ssm_impl in SCAN_IMPLEMENTATIONS,
           f"model.ssm_impl={m.ssm_impl!r}: allowed {SCAN_IMPLEMENTATIONS}")
    if m.name == "hydra" and m.hydra_ssm_width is None:
        _check(m.expand >= 1, f"model.expand={m.expand}: must be >= 1 (the SSM's width is "
                              "expand * d_model unless model.hydra_ssm_width is set)")
    if m.name not in ("mamba", "mamba2"):
        return
    sizes = ["d_state", "expand", "d_conv", "ssm_chunk"]
    sizes += ["ssm_head_dim", "ssm_groups"] if m.name == "mamba2" else []
    for key in sizes:
        _check(getattr(m, key) >= 1, f"model.{key}={getattr(m, key)}: must be >= 1")
    _check(m.dt_rank is None or m.dt_rank >= 1,
           f"model.dt_rank={m.dt_rank}: must be >= 1, or None (ceil(d_model / 16))")
    if m.name == "mamba2":
        inner = m.expand * m.d_model
        _check(inner % m.ssm_head_dim == 0,
               f"model.ssm_head_dim={m.ssm_head_dim} must divide model.expand * model.d_model "
               f"= {inner}")
        _check(mamba2_heads(m) % m.ssm_groups == 0,
               f"model.ssm_groups={m.ssm_groups} must divide the {mamba2_heads(m)} SSM heads "
               "(model.expand * model.d_model / model.ssm_head_dim)")


MONARCH_TARGETS = ("mlp", "attention")


def monarch_targets(m: ModelConfig) -> set[str]:
    """The layer kinds ``model.monarch`` names (``"mlp,attention"`` -> both)."""
    return {part.strip() for part in m.monarch.split(",") if part.strip()}


def _validate_monarch(m: ModelConfig) -> None:
    from jaxsparse.ops.monarch import MONARCH_IMPLEMENTATIONS, valid_nblocks

    targets = monarch_targets(m)
    _check(targets <= set(MONARCH_TARGETS),
           f"model.monarch={m.monarch!r}: a comma-separated subset of {MONARCH_TARGETS}, or ''")
    _check(m.monarch_impl in MONARCH_IMPLEMENTATIONS,
           f"model.monarch_impl={m.monarch_impl!r}: allowed {MONARCH_IMPLEMENTATIONS}")
    if targets:
        _check_float32_kernel(m, "monarch_impl", "'xla' or None")
    if targets and m.monarch_impl in ("pallas", "pallas_interpret"):
        _check_monarch_kernel_shapes(m, targets)
    if not targets or m.monarch_blocks is None:
        return
    shapes = []
    if "mlp" in targets:
        shapes.append((m.d_model, m.d_ff))
    if "attention" in targets and m.name == "transformer":  # the only Monarch attention
        shapes += [(m.d_model, m.n_heads * m.resolved_head_dim),
                   (m.d_model, m.n_kv_heads * m.resolved_head_dim)]
    if not shapes:
        return
    allowed = sorted(set.intersection(*(set(valid_nblocks(a, b)) for a, b in shapes)))
    _check(m.monarch_blocks in allowed,
           f"model.monarch_blocks={m.monarch_blocks} cannot split the {sorted(targets)} "
           f"projections of widths {shapes}; valid: {allowed} (or None)")


def _check_monarch_kernel_shapes(m: ModelConfig, targets: set[str]) -> None:
    """``monarch_impl="pallas"`` needs a GPU or TPU kernel that takes every Monarch
    projection's factors (``"pallas_interpret"`` the GPU kernel): refused here, naming the
    key, instead of at the first trace."""
    import numpy as np

    from jaxsparse.ops.monarch import kernel_constraints, monarch_shapes

    d = m.d_model
    maps = [(d, m.d_ff), (m.d_ff, d)] if "mlp" in targets else []
    if "attention" in targets and m.name == "transformer":  # the only Monarch attention
        attn, kv = m.n_heads * m.resolved_head_dim, m.n_kv_heads * m.resolved_head_dim
        maps += [(d, attn), (d, kv), (attn, d)]
    backends = ("gpu",) if m.monarch_impl == "pallas_interpret" else ("gpu", "tpu")
    for n_in, n_out in maps:
        try:
            w1, w2 = (np.empty(shape, np.float32) for shape in
                      monarch_shapes(n_in, n_out, m.monarch_blocks))
        except ValueError:
            return  # the block count itself is refused below, naming model.monarch_blocks
        reasons = [kernel_constraints(backend, w1, w2) for backend in backends]
        if all(reasons):
            raise ConfigError(
                f"model.monarch_impl={m.monarch_impl!r}: no kernel takes the {n_in} -> {n_out} "
                f"projection's factors {w1.shape}, {w2.shape}: {'; '.join(reasons)}; use "
                "model.monarch_impl=None or 'xla', or other widths/model.monarch_blocks")


def _validate_routing(m: ModelConfig) -> None:
    if m.name != "routing_transformer":
        return
    _check(1 <= m.routing_heads <= m.n_heads,
           f"model.routing_heads={m.routing_heads}: must be in [1, model.n_heads={m.n_heads}]")
    _check(m.n_kv_heads == m.n_heads,
           f"model.n_kv_heads={m.n_kv_heads}: the routing transformer uses multi-head attention "
           f"(set it to model.n_heads={m.n_heads})")
    for key in ("routing_clusters", "routing_window", "routing_local_window"):
        _check(getattr(m, key) >= 1, f"model.{key}={getattr(m, key)}: must be >= 1")
    _check(0 <= m.routing_skip_first < m.n_layers,
           f"model.routing_skip_first={m.routing_skip_first}: must be in [0, model.n_layers="
           f"{m.n_layers}) so that some layer routes")
    _check(0 < m.routing_decay < 1, f"model.routing_decay={m.routing_decay}: must be in (0, 1)")
    _check(1 <= m.routing_probes <= m.routing_clusters,
           f"model.routing_probes={m.routing_probes}: must be in [1, model.routing_clusters="
           f"{m.routing_clusters}] (a query reads the windows of its best clusters)")
    _check(m.routing_dense_steps >= 0,
           f"model.routing_dense_steps={m.routing_dense_steps}: must be >= 0")
    _check(m.routing_commitment >= 0,
           f"model.routing_commitment={m.routing_commitment}: must be >= 0")


def _layer_indices(m: ModelConfig, field: str) -> set[int]:
    value = getattr(m, field)
    try:
        return {int(part) for part in value.split(",") if part.strip()}
    except ValueError:
        raise ConfigError(f"model.{field}={value!r}: comma-separated layer indices, "
                          "e.g. '1' or '3,7'") from None


def pkm_layer_indices(m: ModelConfig) -> set[int]:
    """The layers ``model.pkm_layers`` names ("1,3" -> {1, 3})."""
    return _layer_indices(m, "pkm_layers")


def workspace_layer_indices(m: ModelConfig) -> set[int]:
    """The Hydra blocks that read the workspace: ``model.workspace_layers``, or every block when
    it is empty; none without a workspace (``workspace_slots=0``)."""
    if m.workspace_slots == 0:
        return set()
    return _layer_indices(m, "workspace_layers") or set(range(m.n_layers))


def _validate_hydra(m: ModelConfig) -> None:
    if m.name != "hydra":
        return
    from jaxsparse.models.curriculum import parse_curriculum

    _check(m.hydra_sga_every >= 1,
           f"model.hydra_sga_every={m.hydra_sga_every}: must be >= 1 (SGA in every n-th block)")
    _check(m.hydra_window >= 1, f"model.hydra_window={m.hydra_window}: must be >= 1")
    _check(m.hydra_max_global >= 0,
           f"model.hydra_max_global={m.hydra_max_global}: the global-token budget must be >= 0")
    _check(m.hydra_ssm_width is None or m.hydra_ssm_width >= 1,
           f"model.hydra_ssm_width={m.hydra_ssm_width}: must be >= 1, or None")
    _check(m.hydra_ssm_conv >= 0,
           f"model.hydra_ssm_conv={m.hydra_ssm_conv}: the SSM's convolution width must be >= 0 "
           "(0: none)")
    from jaxsparse.ops.diagonal_ssm import DIAGONAL_SCAN_IMPLEMENTATIONS

    _check(m.hydra_scan_impl in DIAGONAL_SCAN_IMPLEMENTATIONS,
           f"model.hydra_scan_impl={m.hydra_scan_impl!r}: allowed {DIAGONAL_SCAN_IMPLEMENTATIONS}")
    from jaxsparse.ops.sga import SGA_IMPLEMENTATIONS

    _check(m.hydra_sga_impl in SGA_IMPLEMENTATIONS,
           f"model.hydra_sga_impl={m.hydra_sga_impl!r}: allowed {SGA_IMPLEMENTATIONS}")
    _check(m.hydra_gate_init > 0, f"model.hydra_gate_init={m.hydra_gate_init}: must be > 0")
    try:
        parse_curriculum(m.hydra_curriculum)
    except ValueError as err:
        raise ConfigError(f"model.hydra_curriculum={m.hydra_curriculum!r}: {err}") from None
    layers = pkm_layer_indices(m)
    _check(all(0 <= i < m.n_layers for i in layers),
           f"model.pkm_layers={m.pkm_layers!r}: indices must be in [0, model.n_layers={m.n_layers})")
    if layers:
        n_keys = int(round(max(m.pkm_slots, 0) ** 0.5))
        _check(m.pkm_slots >= 1 and n_keys * n_keys == m.pkm_slots,
               f"model.pkm_slots={m.pkm_slots}: must be a perfect square (n_keys² slots; "
               f"e.g. {max(n_keys, 1) ** 2} or {(n_keys + 1) ** 2})")
        _check(1 <= m.pkm_knn <= n_keys,
               f"model.pkm_knn={m.pkm_knn}: must be in [1, sqrt(model.pkm_slots)={n_keys}]")
        _check(m.pkm_k_dim >= 2 and m.pkm_k_dim % 2 == 0,
               f"model.pkm_k_dim={m.pkm_k_dim}: must be even (two halves of the product key)")
        _check(m.pkm_heads >= 1, f"model.pkm_heads={m.pkm_heads}: must be >= 1")
    _check(m.workspace_slots >= 0, f"model.workspace_slots={m.workspace_slots}: must be >= 0")
    _check(m.workspace_chunk >= 1, f"model.workspace_chunk={m.workspace_chunk}: must be >= 1")
    reading = _layer_indices(m, "workspace_layers")
    _check(not reading or m.workspace_slots > 0,
           f"model.workspace_layers={m.workspace_layers!r}: names blocks that read the workspace, "
           "but model.workspace_slots=0 builds none")
    _check(all(0 <= i < m.n_layers for i in reading),
           f"model.workspace_layers={m.workspace_layers!r}: indices must be in "
           f"[0, model.n_layers={m.n_layers})")


MESH_AXES = ("data", "fsdp", "expert", "sequence", "tensor")
ATTENTION_MODELS = ("transformer", "routing_transformer", "hydra")


def check_mesh_sizes(m: ModelConfig, d: DataConfig, preset_name: str,
                     sizes: dict[str, int]) -> None:
    """Refuse mesh axis ``sizes`` that the sharding preset or the model cannot use. Run twice
    on one code path: by :func:`validate` on the configured sizes, where a -1 axis is not
    known yet and passes, and by :func:`jaxsparse.parallel.mesh.check_mesh` on the sizes
    resolved for the devices."""
    from jaxsparse.parallel.rules import PRESETS

    _check(preset_name in PRESETS, f"mesh.preset={preset_name!r}: allowed {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    for axis, size in sizes.items():
        _check(size == 1 or axis in preset.axes,
               f"mesh.{axis}={size}: sharding preset {preset_name!r} does not use the {axis} "
               f"axis (it uses {', '.join(preset.axes)}); set mesh.{axis}=1 or pick a preset "
               "that uses it (`jaxsparse configs --sharding NAME` shows one)")
    if "expert" in preset.axes and preset_name != "full":
        _check(m.moe_experts > 0,
               f"mesh.preset={preset_name!r} splits MoE experts over the expert axis, but this "
               f"{m.name} model has no MoE layers (model.moe_experts=0); use a preset without "
               "expert parallelism")
    # a -1 axis (in validate, before the device count is known) passes as 1
    expert, sequence, tensor = (max(sizes[axis], 1) for axis in ("expert", "sequence", "tensor"))
    if expert > 1:
        _check(m.moe_experts > 0, f"mesh.expert={expert} needs MoE layers (model.moe_experts > 0)")
        _check(m.moe_experts % expert == 0,
               f"mesh.expert={expert} must divide model.moe_experts={m.moe_experts}")
    if tensor > 1 and m.name in ATTENTION_MODELS:
        for key, heads in (("model.n_heads", m.n_heads), ("model.n_kv_heads", m.n_kv_heads)):
            _check(heads % tensor == 0,
                   f"mesh.tensor={tensor} must divide {key}={heads}: tensor parallelism "
                   "splits attention heads")
    if tensor > 1 and m.name == "mamba2":
        # Mamba-2's heads and B/C groups are split over the tensor axis; an uneven split
        # reaches the native kernel's partitioning rule, which JAX cannot hand an uneven one
        for key, size in (("SSM heads (model.expand * model.d_model / model.ssm_head_dim)",
                           mamba2_heads(m)), ("model.ssm_groups", m.ssm_groups)):
            _check(size == 1 or size % tensor == 0,
                   f"mesh.tensor={tensor} must divide the {size} {key}")
    _check(d.seq_len % sequence == 0,
           f"mesh.sequence={sequence} must divide data.seq_len={d.seq_len}: sequence "
           "parallelism gives every shard the same number of positions")


def _validate_synthetic_sizes(m: ModelConfig, d: DataConfig) -> None:
    """The bounds of the non-MQAR synthetic generators (MQAR's are checked with key names in
    :func:`validate`), before anything is built."""
    from jaxsparse.data import synthetic

    checks = {
        "selective_copying": lambda: synthetic.check_selective_copying(
            d.seq_len, m.vocab_size, d.num_tokens_to_copy),
        "induction_heads": lambda: synthetic.check_induction_heads(
            d.seq_len, m.vocab_size, d.induction_prefix),
        "multi_hop": lambda: synthetic.check_multi_hop(d.seq_len, m.vocab_size, d.hops, d.chains),
    }
    if d.task in checks:
        try:
            checks[d.task]()
        except ValueError as err:  # named by the generator's parameters: say the config keys
            message = re.sub(r"(?<![\w.·])(\w+)=", lambda g: f"{GENERATOR_KEYS.get(g[1], g[1])}=",
                             str(err))
            raise ConfigError(f"data.task={d.task!r}: {message}") from None


# The synthetic generators' parameters, by the config key each is read from.
GENERATOR_KEYS = {"seq_len": "data.seq_len", "vocab_size": "model.vocab_size",
                  "prefix_len": "data.induction_prefix",
                  "num_tokens_to_copy": "data.num_tokens_to_copy", "hops": "data.hops",
                  "chains": "data.chains"}


def validate_data(m: ModelConfig, d: DataConfig) -> None:
    """The checks of the data section (with the model keys the data task depends on):
    :func:`validate` runs them, and so does :func:`jaxsparse.data.make_stream` on the keys its
    task reads, so a stream built from an unchecked config gets the same errors."""
    _check_fields("data", d, DataConfig)
    for key, value in (("data.seq_len", d.seq_len), ("data.batch_size", d.batch_size)):
        _check(value >= 1, f"{key}={value}: must be >= 1")
    # 1 would make every file validation: the split then held out a single file instead
    _check(d.valid_every >= 2, f"data.valid_every={d.valid_every}: must be >= 2 (every n-th "
                               "file is held out for validation)")
    _check(d.task in TASKS, f"data.task={d.task!r}: allowed {TASKS}")
    _check(d.mqar_filler in MQAR_FILLERS,
           f"data.mqar_filler={d.mqar_filler!r}: allowed {MQAR_FILLERS}")
    _check(d.path is None or d.task == "text",
           f"data.path={d.path!r} is only read when data.task='text' (got {d.task!r})")
    for key, path in (("data.path", d.path), ("data.cache_dir", d.cache_dir)):
        # an empty path would resolve to the current directory
        _check(path is None or path.strip(), f"{key}={path!r}: give a path, or leave it unset")
    if d.packed_documents:
        _check(d.task == "text", f"data.packed_documents=True needs data.task='text' (got "
                                 f"{d.task!r}: synthetic examples are one document each)")
        from jaxsparse.ops.mask_specs import GLOBAL_TOKEN_KINDS, spec_kinds

        global_kinds = sorted(spec_kinds(m.attention_mask) & set(GLOBAL_TOKEN_KINDS))
        _check(m.name != "transformer" or not global_kinds,
               f"model.attention_mask={m.attention_mask!r} with data.packed_documents=True: "
               f"the {'/'.join(global_kinds)} global tokens are each row's first positions, "
               "which belong to its first document: every other document would attend through "
               "the window alone; use a pattern without global tokens (local, strided, "
               "chunked, fixed) or data.packed_documents=False")
    if d.task == "text":
        _check(m.vocab_size >= 256,
               f"model.vocab_size={m.vocab_size}: byte-level text needs at least 256")
    if d.task == "mqar":  # the generator's own bounds, checked before anything is built
        from jaxsparse.data.synthetic import mqar_min_seq_len, mqar_min_vocab

        n = d.num_kv_pairs
        _check(n >= 1, f"data.num_kv_pairs={n}: must be >= 1")
        _check(m.vocab_size >= mqar_min_vocab(n),
               f"model.vocab_size={m.vocab_size} too small for data.num_kv_pairs={n}: MQAR "
               f"needs >= 2 * num_kv_pairs + 2 = {mqar_min_vocab(n)}")
        _check(d.seq_len >= mqar_min_seq_len(n),
               f"data.seq_len={d.seq_len} too short for data.num_kv_pairs={n}: MQAR needs "
               f">= 4 * num_kv_pairs - 1 = {mqar_min_seq_len(n)}")
    _validate_synthetic_sizes(m, d)
    # JAX keys take 32-bit seeds (without x64 a larger one is truncated)
    _check(0 <= d.seed < 2 ** 32, f"data.seed={d.seed}: must be in [0, 2**32)")


def validate_model(m: ModelConfig) -> ModelConfig:
    """The checks of :func:`validate` that need the model section only (types, sizes, dtypes,
    implementations, each family's options); returns ``m`` unchanged. The model builder
    (:func:`jaxsparse.models.build`) runs them too, so a model built straight from a
    ``ModelConfig`` is refused with the same :class:`ConfigError`, naming ``model.<key>``,
    its value and what is allowed, instead of failing (or silently building something else)
    deep inside a layer."""
    _check_fields("model", m, ModelConfig)
    from jaxsparse.models.registry import names as model_names

    known = model_names()
    if m.name not in known:
        close = difflib.get_close_matches(m.name, known, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"model.name={m.name!r} is not a registered model.{hint} "
                          f"Known: {', '.join(known)}")
    from jaxsparse.config_usage import MODEL_KEYS

    # heads, head_dim and rotary embeddings mean something only to models with attention
    # (a user-registered model, unknown to config_usage, is checked as one)
    attention = "n_heads" in MODEL_KEYS.get(m.name, {"n_heads"})
    for key in ("vocab_size", "d_model", "n_layers", "d_ff", "max_seq_len"):
        _check(getattr(m, key) >= 1, f"model.{key}={getattr(m, key)}: must be >= 1")
    if attention:
        for key, value in (("model.n_heads", m.n_heads), ("model.n_kv_heads", m.n_kv_heads)):
            _check(value >= 1, f"{key}={value}: must be >= 1")
        _check(m.n_heads % m.n_kv_heads == 0,
               f"model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={m.n_kv_heads}")
        _check(m.head_dim is None or m.head_dim >= 1,
               f"model.head_dim={m.head_dim}: must be >= 1 (or None: d_model // n_heads)")
        _check(m.head_dim is not None or m.d_model % m.n_heads == 0,
               f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; "
               "set model.head_dim explicitly")
        _check(m.resolved_head_dim % 2 == 0,
               f"model.head_dim={m.resolved_head_dim}: rotary embeddings need an even head dim")
        _check(m.rope_theta > 0, f"model.rope_theta={m.rope_theta}: must be > 0")
    _check(m.dtype in DTYPES, f"model.dtype={m.dtype!r}: allowed {DTYPES}")
    _check(m.param_dtype in DTYPES, f"model.param_dtype={m.param_dtype!r}: allowed {DTYPES}")
    _check(m.param_dtype != "float16",
           "model.param_dtype='float16': the optimiser's moments would be float16 too, where "
           "g² underflows and optimizer.eps rounds to 0 (0/0 updates); keep parameters in "
           "float32 and compute in float16 with model.dtype='float16'")
    _check(0 < m.norm_eps < 1, f"model.norm_eps={m.norm_eps}: must be in (0, 1)")
    from jaxsparse.ops.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS

    _check(m.attention_impl in ATTENTION_IMPLEMENTATIONS,
           f"model.attention_impl={m.attention_impl!r}: allowed {ATTENTION_IMPLEMENTATIONS}")
    if m.name == "transformer":  # the other models take no mask spec
        from jaxsparse.ops.mask_specs import parse_mask_spec

        try:
            parse_mask_spec(m.attention_mask, m.n_heads)
        except ValueError as err:
            raise ConfigError(f"model.attention_mask={m.attention_mask!r}: {err}") from None
    _validate_ssm(m)
    _validate_moe(m)
    _validate_monarch(m)
    _validate_routing(m)
    _validate_hydra(m)
    return m


def validate(cfg: Config) -> Config:
    """Check types and impossible values; returns ``cfg`` unchanged so calls can chain.
    Keys set away from their defaults that this model or data task never reads are reported
    as one :class:`jaxsparse.config_usage.UnreadKeyWarning` (:mod:`jaxsparse.config_usage`)."""
    _check(isinstance(cfg, Config), f"expected a Config, got {type(cfg).__name__}")
    for section in SECTIONS[2:]:  # model and data: validate_model, validate_data
        _check_fields(section, getattr(cfg, section), type(getattr(Config(), section)))

    _check(isinstance(cfg.name, str) and cfg.name.strip() != "" and cfg.name not in (".", "..")
           and "/" not in cfg.name and "\\" not in cfg.name,
           f"name={cfg.name!r}: expected a non-empty string without '/' (it names the run's "
           "default workdir, runs/<name>)")
    m, d, o, mesh, t, e = cfg.model, cfg.data, cfg.optimizer, cfg.mesh, cfg.train, cfg.eval
    validate_model(m)
    validate_data(m, d)
    for key, value in [
        ("train.steps", t.steps),
        ("train.log_every", t.log_every), ("train.eval_every", t.eval_every),
        ("train.checkpoint_every", t.checkpoint_every),
        ("train.keep_checkpoints", t.keep_checkpoints), ("eval.batches", e.batches),
    ]:
        _check(value >= 1, f"{key}={value}: must be >= 1")
    if m.name == "hydra":
        _check(m.hydra_max_global <= d.seq_len,
               f"model.hydra_max_global={m.hydra_max_global}: the global-token budget must be "
               f"in [0, data.seq_len={d.seq_len}]")
    _check(cfg.train.init_from is None or cfg.train.init_from.strip(),
           f"train.init_from={cfg.train.init_from!r}: give a path, or leave it unset")
    # JAX keys take 32-bit seeds (without x64 a larger one is truncated: 2**32 would silently
    # repeat seed 0)
    _check(0 <= t.seed < 2 ** 32, f"train.seed={t.seed}: must be in [0, 2**32)")
    if m.name == "routing_transformer":
        _check(m.routing_clusters <= d.seq_len,
               f"model.routing_clusters={m.routing_clusters} exceeds data.seq_len={d.seq_len}: "
               "more clusters than tokens")
    _check(d.seq_len <= m.max_seq_len,
           f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    _check(t.loss_chunk >= 0, f"train.loss_chunk={t.loss_chunk}: must be >= 0 (0: no chunks)")
    _check(t.nonfinite in NONFINITE_POLICIES,
           f"train.nonfinite={t.nonfinite!r}: allowed {NONFINITE_POLICIES}")
    _check(0 < o.lr < math.inf, f"optimizer.lr={o.lr}: must be a finite number > 0")
    _check(0 <= o.min_lr_ratio <= 1, f"optimizer.min_lr_ratio={o.min_lr_ratio}: must be in [0, 1]")
    _check(o.warmup_steps >= 0, f"optimizer.warmup_steps={o.warmup_steps}: must be >= 0")
    _check(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"optimizer.b1/b2=({o.b1}, {o.b2}): must be in [0, 1)")
    _check(o.eps > 0, f"optimizer.eps={o.eps}: must be > 0 (Adam divides by sqrt(v) + eps, and "
                      "v is 0 where a gradient is 0)")
    _check(o.weight_decay >= 0, f"optimizer.weight_decay={o.weight_decay}: must be >= 0")
    _check(o.grad_clip > 0, f"optimizer.grad_clip={o.grad_clip}: must be > 0")
    _check(o.memory_values_lr > 0, f"optimizer.memory_values_lr={o.memory_values_lr}: must be > 0")
    from jaxsparse.parallel.mesh import axis_sizes

    check_mesh_sizes(m, d, mesh.preset, axis_sizes(mesh))
    _check(e.temperature >= 0, f"eval.temperature={e.temperature}: must be >= 0")
    _check(0 <= e.top_k <= m.vocab_size,
           f"eval.top_k={e.top_k}: must be in [0, model.vocab_size={m.vocab_size}] (0: the "
           "full distribution)")
    _check(e.sample_tokens >= 0, f"eval.sample_tokens={e.sample_tokens}: must be >= 0 (0: no "
           "sample at the end of training)")
    try:
        prompt_bytes = len(e.sample_prompt.encode())
    except UnicodeEncodeError:  # undecodable bytes of a command line arrive as surrogates
        raise ConfigError(f"eval.sample_prompt={e.sample_prompt!r}: not valid UTF-8 text") from None
    _check(e.sample_tokens == 0 or 1 <= prompt_bytes < m.max_seq_len,
           f"eval.sample_prompt={e.sample_prompt!r} is {prompt_bytes} bytes: the end-of-training "
           f"sample needs 1 to model.max_seq_len - 1 = {m.max_seq_len - 1} (or "
           "eval.sample_tokens=0: no sample)")
    room = m.max_seq_len - prompt_bytes
    if d.task == "text" and e.sample_tokens > room:
        warnings.warn(f"eval.sample_tokens={e.sample_tokens}: the end-of-training sample will "
                      f"have {room} bytes after the {prompt_bytes}-byte eval.sample_prompt, "
                      f"as many as model.max_seq_len={m.max_seq_len} leaves; set "
                      f"eval.sample_tokens <= {room}", SampleLengthWarning)
    if m.param_dtype == "bfloat16":
        warnings.warn("model.param_dtype='bfloat16': the parameters and AdamW's moments are "
                      "bfloat16, with no float32 master copy, so an update below ~0.4% of a "
                      "weight (its bfloat16 spacing) rounds away — weight decay's lr·wd "
                      "(3e-4 at the defaults) does nothing; for bfloat16 speed keep float32 "
                      "parameters and set model.dtype='bfloat16'", PrecisionWarning)
    if m.moe_experts and m.moe_capacity_factor is not None:
        warnings.warn(f"model.moe_capacity_factor={m.moe_capacity_factor}: every first choice "
                      "takes a slot before any second one, so a later token can push an earlier "
                      "token out of an expert: training is not strictly causal, and generation "
                      "(which drops nothing) differs from the full pass; None (dropless) is "
                      "exact", CapacityWarning)
    for message in _schedules_past_the_run(cfg):
        warnings.warn(message, ScheduleLengthWarning)  # (no stacklevel: once per message)
    from jaxsparse.config_usage import UnreadKeyWarning, describe, unread_keys

    unread = unread_keys(cfg)
    if unread:  # legal, but almost always a mistake
        # from this line always (no stacklevel): Python's registry then says each distinct
        # message once, though a run validates its config at several places
        warnings.warn(describe(unread, cfg), UnreadKeyWarning)
    return cfg


def _schedules_past_the_run(cfg: Config) -> list[str]:
    """What of the schedules the run never reaches: legal (a short test of a long config),
    but it trains something else than the settings say."""
    m, o, steps = cfg.model, cfg.optimizer, cfg.train.steps
    found = []
    # (the setting not honoured; a warm-up of steps - 1 also ends undecayed, but as it was set)
    if o.warmup_steps >= steps > 1:  # lr_schedule: at most steps - 1
        found.append(f"optimizer.warmup_steps={o.warmup_steps} with train.steps={steps}: the "
                     f"warm-up is shortened to {steps - 1} steps, so the rate peaks at the last "
                     "step and never decays")
    if m.name == "routing_transformer" and m.routing_dense_steps >= steps:
        found.append(f"model.routing_dense_steps={m.routing_dense_steps} >= train.steps={steps}:"
                     " the routing heads attend densely for the whole run")
    if m.name == "hydra" and m.hydra_curriculum:
        from jaxsparse.models.curriculum import curriculum_entries

        late = [entry for entry, _, start in curriculum_entries(m.hydra_curriculum)
                if start >= steps]
        if late:
            found.append(f"model.hydra_curriculum={m.hydra_curriculum!r}: {', '.join(late)} "
                         f"start(s) at or after train.steps={steps}, so never in this run")
    if m.moe_experts and m.moe_k_end is not None:
        # ops.moe.routing.linear_k_schedule at the last step (round: half to even, as jnp.round)
        grown = min((steps - 1) / m.moe_k_schedule_steps, 1.0) * (m.moe_k_end - m.moe_k)
        last_k = round(m.moe_k + grown)
        if last_k != m.moe_k_end:
            found.append(f"model.moe_k_schedule_steps={m.moe_k_schedule_steps} with train.steps="
                         f"{steps}: k reaches {last_k} at the last step, not "
                         f"model.moe_k_end={m.moe_k_end}")
    return found


# --- JSON -----------------------------------------------------------------------------------


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_json(cfg: Config) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def from_dict(raw: dict[str, Any]) -> Config:
    """Inverse of :func:`to_dict`; unknown keys (e.g. from a newer version) are an error."""
    unknown = sorted(set(raw) - set(SECTIONS) - {"name"})
    if unknown:  # a misspelled section would otherwise be read as all defaults
        raise _unknown(unknown[0], ["name", *SECTIONS], "config section")
    sections = {}
    for section in SECTIONS:
        cls = type(getattr(Config(), section))
        values = dict(raw.get(section, {}))
        names = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(values) - names)
        if extra:
            raise ConfigError(f"{section}: unknown keys {extra}; valid: {sorted(names)}")
        sections[section] = cls(**values)
    return Config(name=raw.get("name", "custom"), **sections)


def from_json(text: str) -> Config:
    try:
        raw = json.loads(text)
    except ValueError as err:
        raise ConfigError(f"not a config: invalid JSON ({err})") from None
    if not isinstance(raw, dict) or not all(isinstance(raw.get(s, {}), dict) for s in SECTIONS):
        raise ConfigError("not a config: expected a JSON object of sections "
                          f"({', '.join(SECTIONS)}), each an object of keys")
    return from_dict(raw)


def diff(a: Config, b: Config, sections: tuple[str, ...] = SECTIONS) -> list[str]:
    """Human-readable ``key: a -> b`` lines for every differing key in ``sections``."""
    lines = []
    for section in sections:
        da, db = dataclasses.asdict(getattr(a, section)), dataclasses.asdict(getattr(b, section))
        for key in da:
            if da[key] != db[key]:
                lines.append(f"{section}.{key}: {da[key]!r} -> {db[key]!r}")
    return lines
