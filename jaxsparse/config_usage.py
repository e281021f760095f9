"""Which config keys a run reads: settings that would have no effect are reported.

One ``ModelConfig``/``DataConfig`` serves every model family and data task, so most keys
mean nothing to a given run: ``model.routing_clusters`` to a Transformer,
``model.moe_k`` while ``model.moe_experts=0``, ``data.num_kv_pairs`` to a text run. Set away
from its default, such a key is almost always a mistake (a typo in ``model.name``, a sweep
over a knob this model lacks, a preset switched to another family) and the run would go on
as if it had never been set. :func:`unread_keys` names each one with the reason, and
:func:`jaxsparse.config.validate` reports them as one :class:`UnreadKeyWarning`. The same
tables let a run resume when only keys its model never reads have changed
(:func:`model_differences`).

The tables here are the contract; ``tests/test_config_usage.py`` records the attributes the
model builders, forward passes and data streams really read and checks that no key called
unread here is read by them.
"""

from __future__ import annotations

import dataclasses

from jaxsparse.config import Config, DataConfig, ModelConfig, diff, monarch_targets
from jaxsparse.errors import SettingsWarning


class UnreadKeyWarning(SettingsWarning):
    """Config keys set away from their defaults that this run's model or data task never reads."""


def _prefixed(prefix: str) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(ModelConfig) if f.name.startswith(prefix))


_COMMON = frozenset({"name", "vocab_size", "d_model", "n_layers", "max_seq_len", "tie_embeddings",
                     "remat", "norm_eps", "dtype", "param_dtype"})
_ATTENTION = frozenset({"n_heads", "n_kv_heads", "head_dim", "rope_theta"})
_MOE = _prefixed("moe_")
_MONARCH = frozenset({"monarch", "monarch_blocks", "monarch_impl"})
_HYDRA = _prefixed("hydra_") | _prefixed("pkm_") | _prefixed("workspace_")

# model.name -> the ModelConfig keys its builder and forward pass can read
MODEL_KEYS: dict[str, frozenset[str]] = {
    "transformer": _COMMON | _ATTENTION | {"d_ff", "attention_impl", "attention_mask"} | _MOE
                   | _MONARCH,
    "routing_transformer": _COMMON | _ATTENTION | {"d_ff", "attention_impl"}
                           | _prefixed("routing_") | _MOE | _MONARCH,
    "mamba": _COMMON | {"d_state", "expand", "d_conv", "dt_rank", "ssm_chunk", "ssm_impl"},
    "mamba2": _COMMON | {"d_state", "expand", "d_conv", "ssm_head_dim", "ssm_groups", "ssm_chunk"},
    "hydra": _COMMON | _ATTENTION | {"d_ff", "expand"} | _HYDRA | _MOE | _MONARCH,
}

# data.task -> the DataConfig keys only that task reads (the others are read by every task)
TASK_KEYS: dict[str, frozenset[str]] = {
    "text": frozenset({"path", "valid_every", "packed_documents", "cache_dir"}),
    "mqar": frozenset({"num_kv_pairs", "mqar_filler"}),
    "selective_copying": frozenset({"num_tokens_to_copy"}),
    "induction_heads": frozenset({"induction_prefix"}),
    "multi_hop": frozenset({"hops", "chains"}),
}

# eval keys that only the end-of-training text sample reads
_SAMPLE_KEYS = ("sample_tokens", "sample_prompt", "temperature", "top_k")


def _readers(key: str) -> str:
    names = [name for name, keys in MODEL_KEYS.items() if key in keys]
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def unread_model_keys(m: ModelConfig) -> dict[str, str]:
    """Every ``ModelConfig`` key (as ``model.<key>``) that a model built from ``m`` does not
    read, whatever its value, with the reason. Unknown model names give ``{}`` (validate
    refuses them)."""
    if m.name not in MODEL_KEYS:
        return {}
    reads = MODEL_KEYS[m.name]
    unread = {key: f"read by {_readers(key)} only; model.name={m.name!r} ignores it"
              for key in (f.name for f in dataclasses.fields(ModelConfig)) if key not in reads}

    def off(keys, reason):
        for key in keys:
            if key in reads:
                unread.setdefault(key, reason)

    # which feed-forward layers are MoE: the builders' own rule
    from jaxsparse.models.transformer import uses_moe

    moe_layers = sum(uses_moe(m, layer) for layer in range(m.n_layers))
    if moe_layers == 0:
        off(_MOE - {"moe_experts"}, f"no layer is MoE (model.moe_experts={m.moe_experts}, "
                                    f"model.moe_every={m.moe_every}, {m.n_layers} layers)")
    every_layer_moe = moe_layers == m.n_layers
    if every_layer_moe and m.moe_d_ff is not None:
        off({"d_ff"}, "every feed-forward layer is MoE and the experts' width is "
                      "model.moe_d_ff")
    if not monarch_targets(m):
        off({"monarch_blocks", "monarch_impl"}, "model.monarch='' builds no Monarch layer")
    elif not built_monarch_layers(m) and "monarch" in reads:
        why = "; ".join(_monarch_parts_unbuilt(m).values())
        unread["monarch"] = why
        off({"monarch_blocks", "monarch_impl"}, f"model.monarch={m.monarch!r} builds no Monarch "
                                                f"layer ({why})")
    if m.name == "routing_transformer" and m.routing_skip_first == 0:
        off({"attention_impl"}, "model.routing_skip_first=0: no layer uses dense attention")
    if not m.pkm_layers.strip():
        off({"pkm_slots", "pkm_heads", "pkm_k_dim", "pkm_knn"},
            "model.pkm_layers='' builds no product-key memory")
    if m.workspace_slots == 0:
        off({"workspace_chunk"}, "model.workspace_slots=0 builds no workspace")
    if m.name == "hydra" and m.hydra_ssm_width is not None:
        off({"expand"}, f"model.hydra_ssm_width={m.hydra_ssm_width} sets the SSM's width")
    return {f"model.{key}": reason for key, reason in unread.items()}


def _monarch_parts_unbuilt(m: ModelConfig) -> dict[str, str]:
    """The parts of ``model.monarch`` that build no layer in this model, each with the reason."""
    from jaxsparse.models.transformer import uses_moe

    unbuilt = {}
    targets = monarch_targets(m)
    if "attention" in targets and m.name != "transformer":
        unbuilt["attention"] = (f"only the Transformer's attention has Monarch projections; "
                                f"model.name={m.name!r} reads just 'mlp'")
    if "mlp" in targets and all(uses_moe(m, layer) for layer in range(m.n_layers)):
        unbuilt["mlp"] = "every feed-forward layer is MoE and experts stay dense"
    return unbuilt


def built_monarch_layers(m: ModelConfig) -> frozenset[str]:
    """The parts of ``model.monarch`` that build Monarch layers in this model: what the key
    means to it (``'mlp,attention'`` and ``'mlp'`` build the same Hydra)."""
    if m.name not in MODEL_KEYS or "monarch" not in MODEL_KEYS[m.name]:
        return frozenset()
    return frozenset(monarch_targets(m) - set(_monarch_parts_unbuilt(m)))


def unread_data_keys(d: DataConfig) -> dict[str, str]:
    """The ``DataConfig`` keys (as ``data.<key>``) that task ``d.task`` does not read."""
    if d.task not in TASK_KEYS:
        return {}
    unread = {}
    for task, keys in TASK_KEYS.items():
        if task != d.task:
            for key in keys:
                unread[f"data.{key}"] = (f"read by data.task={task!r} only; data.task="
                                         f"{d.task!r} ignores it")
    return unread


def idle_curriculum_entries(m: ModelConfig) -> dict[str, str]:
    """The entries of Hydra's ``model.hydra_curriculum`` that stage only components this model
    does not build (``"memory:50"`` without product-key memory or workspace, ``"sga:10"``
    with fewer than ``model.hydra_sga_every`` blocks), each with the reason: they switch
    nothing on. ``{}`` for other models and for a spec that does not parse (validate refuses
    it)."""
    if m.name != "hydra":
        return {}
    from jaxsparse.config import ConfigError, pkm_layer_indices, workspace_layer_indices
    from jaxsparse.models.curriculum import curriculum_entries

    try:
        entries = curriculum_entries(m.hydra_curriculum)
        missing = {
            "sga": (None if m.hydra_sga_every >= 1 and m.n_layers >= m.hydra_sga_every else
                    f"no sparse global attention (model.hydra_sga_every={m.hydra_sga_every}, "
                    f"{m.n_layers} blocks)"),
            "pkm": (None if pkm_layer_indices(m) else
                    f"no product-key memory (model.pkm_layers={m.pkm_layers!r})"),
            "workspace": (None if workspace_layer_indices(m) else
                          f"no workspace (model.workspace_slots={m.workspace_slots})"),
        }
    except (ValueError, ConfigError):  # refused by validate, naming the key
        return {}
    return {entry: "the model builds " + " and ".join(missing[t] for t in targets)
            for entry, targets, _ in entries if all(missing.get(t) for t in targets)}


def unread_keys(cfg: Config) -> dict[str, str]:
    """Keys set away from their defaults that this run never reads: ``{"model.moe_k": why}``.
    Also Hydra's ``model.hydra_curriculum`` where an entry stages only components the model
    does not build (:func:`idle_curriculum_entries`): the key is read, that entry does
    nothing."""
    unread = unread_model_keys(cfg.model) | unread_data_keys(cfg.data)
    unbuilt = _monarch_parts_unbuilt(cfg.model)
    if built_monarch_layers(cfg.model) and unbuilt:  # read, but a part of it builds nothing
        unread["model.monarch"] = "; ".join(f"its part {part!r} builds nothing: {why}"
                                            for part, why in unbuilt.items())
    idle = idle_curriculum_entries(cfg.model)
    if idle:
        unread["model.hydra_curriculum"] = "; ".join(f"its entry {entry!r} switches nothing on: "
                                                     f"{why}" for entry, why in idle.items())
    pkm = cfg.model.name == "hydra" and cfg.model.pkm_layers.strip()
    if not pkm:
        unread["optimizer.memory_values_lr"] = "no product-key memory (Hydra's model.pkm_layers)"
    if cfg.data.task != "text":
        # sample_tokens=0 says "no sample", which is what happens: not worth a warning
        for key in _SAMPLE_KEYS if cfg.eval.sample_tokens else _SAMPLE_KEYS[1:]:
            unread[f"eval.{key}"] = "the end-of-training sample is drawn for data.task='text' only"
    elif cfg.eval.sample_tokens == 0:  # `jaxsparse generate` takes its own flags
        for key in ("sample_prompt", "temperature", "top_k"):
            unread[f"eval.{key}"] = "eval.sample_tokens=0: no sample is drawn"
    if cfg.train.loss_chunk >= cfg.data.seq_len:
        unread["train.loss_chunk"] = (f"not below data.seq_len={cfg.data.seq_len}: the loss "
                                      "is computed in one piece, as with 0")
    defaults = Config()
    return {key: reason for key, reason in unread.items()
            if _value(cfg, key) != _value(defaults, key)}


def _value(cfg: Config, key: str):
    section, name = key.split(".", 1)
    return getattr(getattr(cfg, section), name)


def describe(unread: dict[str, str], cfg: Config) -> str:
    """One message for :class:`UnreadKeyWarning`: each key, its value and why it is unread."""
    items = "".join(f"\n  {key}={_value(cfg, key)!r}: {why}" for key, why in unread.items())
    return f"these settings have no effect on this run:{items}"


# model keys that choose how the model is computed, not what it is (the train state is the
# same): a run may resume with others, e.g. remat switched on after running out of memory
HOW_KEYS = frozenset({"remat", "dtype", "attention_impl", "ssm_impl", "moe_grouped_impl",
                      "monarch_impl", "hydra_scan_impl", "hydra_sga_impl"})


def model_differences(saved: Config, requested: Config) -> list[str]:
    """``model.key: saved -> requested`` lines for the differences that make ``saved``'s
    checkpoints another model's: every differing model key except the ``HOW_KEYS`` and those
    that neither model reads."""
    skip = set(unread_model_keys(saved.model)) & set(unread_model_keys(requested.model))
    skip |= {f"model.{key}" for key in HOW_KEYS}
    if built_monarch_layers(saved.model) == built_monarch_layers(requested.model):
        # the same Monarch layers: 'mlp,attention' -> 'mlp' on Hydra is no change, and
        # 'attention' -> 'mlp,attention' (none -> Monarch MLPs) is not skipped as unread
        skip.add("model.monarch")
    else:
        skip.discard("model.monarch")
    return [line for line in diff(saved, requested, ("model",))
            if line.split(":", 1)[0] not in skip]
