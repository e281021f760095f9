"""Settings that have no effect: the tables of jaxsparse.config_usage against what the model
builders, forward passes, decoding and data streams really read; the warning; resuming."""

import dataclasses
import os
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jaxsparse
from jaxsparse import configs, models
from jaxsparse.config import Config, apply_overrides, validate
from jaxsparse.config_usage import (HOW_KEYS, MODEL_KEYS, TASK_KEYS, UnreadKeyWarning,
                                    model_differences, unread_data_keys, unread_model_keys)
from jaxsparse.data import make_stream

from helpers import short_documents

SMALL = ["model.d_model=32", "model.n_layers=4", "model.max_seq_len=64", "data.seq_len=32",
         "data.batch_size=2", "eval.sample_tokens=16"]  # a sample that fits max_seq_len

# each model with its optional parts on, and with them off or replaced (the gates)
MODEL_CASES = {
    "transformer: MoE with a k schedule, Monarch everywhere": (
        "transformer_tiny", ["model.moe_experts=4", "model.moe_k=1", "model.moe_k_end=2",
                             "model.moe_every=2", "model.monarch=mlp,attention",
                             "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64"]),
    "transformer: dense, local mask": ("transformer_sparse_tiny", ["model.n_heads=4"]),
    "transformer: every layer MoE of width moe_d_ff, no k schedule": (
        "moe_tiny", ["model.moe_every=1", "model.moe_d_ff=48", "model.moe_experts=4"]),
    "routing transformer: local layers below": ("routing_tiny", ["model.routing_clusters=4"]),
    "routing transformer: routing from layer 0, Monarch MLP": (
        "routing_tiny", ["model.routing_skip_first=0", "model.routing_clusters=4",
                         "model.monarch=mlp", "model.moe_experts=4", "model.moe_k=1",
                         "model.moe_k_end=2"]),
    "mamba": ("mamba_tiny", ["model.d_state=8"]),
    "mamba2": ("mamba2_tiny", ["model.d_state=8", "model.ssm_head_dim=16", "model.ssm_chunk=8"]),
    "hydra: memories, workspace, MoE every layer": (
        "hydra_tiny", ["model.pkm_layers=1", "model.pkm_slots=64", "model.pkm_knn=4",
                       "model.pkm_k_dim=16", "model.workspace_slots=4", "model.workspace_chunk=8",
                       "model.hydra_window=8", "model.hydra_max_global=8", "model.moe_chunk=8"]),
    "hydra: dense Monarch FFN, own SSM width, no memories": (
        "hydra_tiny", ["model.moe_experts=0", "model.monarch=mlp", "model.hydra_ssm_width=48",
                       "model.pkm_layers=",
                       "model.workspace_slots=0", "model.workspace_layers=", "model.hydra_window=8",
                       "model.hydra_max_global=8"]),
}


PACKAGE = str(Path(jaxsparse.__file__).parent) + os.sep  # the code whose reads count


def _recording(instance, reads: set[str]):
    """A copy of the frozen config dataclass ``instance`` that adds to ``reads`` each field
    jaxsparse's own code asks it for (not the dataclass's generated hash/eq/repr, which read
    every field when JAX hashes a static argument)."""
    cls = type(instance)
    names = {f.name for f in dataclasses.fields(cls)}

    class Recording(cls):
        def __getattribute__(self, name):
            if name in names and sys._getframe(1).f_code.co_filename.startswith(PACKAGE):
                reads.add(name)
            return object.__getattribute__(self, name)

    return Recording(**{name: getattr(instance, name) for name in names})


def _model_reads(cfg: Config) -> set[str]:
    """The model keys read by building the model, a forward pass, ``init_cache`` and a decode
    step — traced abstractly (``jax.eval_shape``): the same Python runs, no arithmetic."""
    reads: set[str] = set()
    recording = _recording(cfg.model, reads)

    def build_and_run(tokens):
        model = models.build(recording, nnx.Rngs(0))
        model(tokens)
        cache = model.init_cache(2)  # of model.max_seq_len positions
        return model.decode(tokens[:, :1], cache)[0]

    jax.eval_shape(build_and_run, jax.ShapeDtypeStruct((2, 16), jnp.int32))
    return reads


def _case(name):
    preset, overrides = MODEL_CASES[name]
    with warnings.catch_warnings():  # the cases with parts off leave the presets' keys unread
        warnings.simplefilter("ignore", UnreadKeyWarning)
        return validate(apply_overrides(configs.get(preset), SMALL + overrides))


@pytest.fixture(scope="module")
def model_reads():
    return {name: _model_reads(_case(name)) for name in MODEL_CASES}


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_no_key_called_unread_is_read_by_the_model(name, model_reads):
    """The direction that matters: a key reported as having no effect must really have none."""
    cfg = _case(name)
    claimed = {key.removeprefix("model.") for key in unread_model_keys(cfg.model)}
    assert not model_reads[name] & claimed, sorted(model_reads[name] & claimed)
    assert model_reads[name] <= MODEL_KEYS[cfg.model.name]


def test_every_key_a_model_claims_is_read_by_one_of_its_cases(model_reads):
    """The tables are not too generous either: each key listed for a model is read in some
    configuration of it."""
    for model_name, keys in MODEL_KEYS.items():
        read = set().union(*(reads for case, reads in model_reads.items()
                             if _case(case).model.name == model_name))
        assert keys <= read, (model_name, sorted(keys - read))


@pytest.mark.parametrize("task", list(TASK_KEYS))
def test_data_streams_read_only_their_task_keys(task, tmp_path):
    overrides = [f"data.task={task}", "data.seq_len=64", "model.max_seq_len=64",
                 "data.batch_size=2"]
    if task == "text":  # with a sample that fits max_seq_len
        overrides += short_documents(tmp_path) + ["data.packed_documents=true",
                                                  "eval.sample_tokens=16"]
    cfg = validate(apply_overrides(configs.get("transformer_tiny"), overrides))
    reads: set[str] = set()
    stream = make_stream(dataclasses.replace(cfg, data=_recording(cfg.data, reads)))
    stream.batch(0)
    stream.eval_batch(0, 2)
    claimed = {key.removeprefix("data.") for key in unread_data_keys(cfg.data)}
    assert not reads & claimed, sorted(reads & claimed)
    assert TASK_KEYS[task] <= reads, sorted(TASK_KEYS[task] - reads)


def test_every_named_config_sets_only_keys_it_reads():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnreadKeyWarning)
        for name in configs.names():
            configs.get(name)


@pytest.mark.parametrize("overrides, expected", [
    (["model.routing_clusters=16"],
     "\n  model.routing_clusters=16: read by routing_transformer only; "
     "model.name='transformer' ignores it"),
    (["model.moe_k=1"], "\n  model.moe_k=1: no layer is MoE (model.moe_experts=0, "
                        "model.moe_every=2, 4 layers)"),
    (["model.moe_experts=4", "model.moe_every=5", "model.moe_k=1"],
     "\n  model.moe_k=1: no layer is MoE (model.moe_experts=4, model.moe_every=5, 4 layers)"),
    (["model.name=mamba2", "model.ssm_impl=chunked", "model.ssm_head_dim=32"],
     "\n  model.ssm_impl='chunked': read by mamba only; model.name='mamba2' ignores it"),
    (["model.name=mamba", "model.attention_mask=local:64"],
     "\n  model.attention_mask='local:64': read by transformer only; model.name='mamba' "
     "ignores it"),
    (["model.name=mamba", "model.rope_theta=500.0"],
     "\n  model.rope_theta=500.0: read by transformer, routing_transformer and hydra only"),
    (["model.monarch_blocks=4"], "\n  model.monarch_blocks=4: model.monarch='' builds no Monarch"),
    (["data.num_kv_pairs=4"],
     "\n  data.num_kv_pairs=4: read by data.task='mqar' only; data.task='text' ignores it"),
    (["data.task=mqar", "eval.sample_tokens=50"],
     "\n  eval.sample_tokens=50: the end-of-training sample is drawn for data.task='text' only"),
    (["data.task=mqar", "eval.temperature=0.5"],
     "\n  eval.temperature=0.5: the end-of-training sample is drawn for data.task='text' only"),
    (["optimizer.memory_values_lr=0.01"], "\n  optimizer.memory_values_lr=0.01: no product-key"),
    (["train.loss_chunk=128"], "\n  train.loss_chunk=128: not below data.seq_len=128: the "
                               "loss is computed in one piece"),
    (["eval.sample_tokens=0", "eval.top_k=5"],
     "\n  eval.top_k=5: eval.sample_tokens=0: no sample is drawn"),
])
def test_settings_without_effect_are_reported_by_name(overrides, expected):
    cfg = apply_overrides(configs.get("transformer_tiny"), overrides)
    with pytest.warns(UnreadKeyWarning) as record:
        assert validate(cfg) is cfg
    assert len(record) == 1 and expected in str(record[0].message), str(record[0].message)


def test_monarch_attention_outside_the_transformer_is_reported():
    """Hydra builds Monarch MLPs from 'mlp,attention': only the attention part is reported, and
    the key is still read (a resume compares it); from 'attention' alone it builds none."""
    cfg = apply_overrides(configs.get("hydra_tiny"),
                          ["model.moe_experts=0", "model.monarch=mlp,attention"])
    with pytest.warns(UnreadKeyWarning, match=r"model.monarch='mlp,attention': its part "
                                              r"'attention' builds nothing: only the "
                                              r"Transformer's attention has Monarch"):
        validate(cfg)
    assert "model.monarch" not in unread_model_keys(cfg.model)
    only_attention = apply_overrides(configs.get("hydra_tiny"),
                                     ["model.monarch=attention", "model.monarch_blocks=4"])
    unread = unread_model_keys(only_attention.model)
    assert unread["model.monarch"].startswith("only the Transformer's attention")
    assert "builds no Monarch layer" in unread["model.monarch_blocks"]


def test_resuming_compares_the_monarch_layers_a_model_builds():
    """'attention' -> 'mlp,attention' turns Hydra's feed-forward layers into Monarch ones (was
    skipped as unread on both sides: the resume ran on, then failed in the restore on missing
    parameters); 'mlp,attention' -> 'mlp' builds the same Hydra (was refused)."""
    hydra = configs.get("hydra_tiny")
    none, both, mlp = (apply_overrides(hydra, ["model.moe_experts=0", f"model.monarch={value}"])
                       for value in ("attention", "mlp,attention", "mlp"))
    assert model_differences(none, both) == ["model.monarch: 'attention' -> 'mlp,attention'"]
    assert model_differences(both, mlp) == []
    # every feed-forward layer MoE: a Monarch MLP is built nowhere, so nothing differs
    moe = [apply_overrides(hydra, ["model.moe_experts=4", "model.moe_every=1",
                                   f"model.monarch={value}"]) for value in ("", "mlp")]
    assert model_differences(*moe) == []


def test_defaults_and_read_keys_are_not_reported():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnreadKeyWarning)
        validate(Config())
        validate(apply_overrides(configs.get("transformer_tiny"),
                                 ["model.moe_experts=4", "model.moe_k=1", "data.task=mqar",
                                  "data.num_kv_pairs=4", "data.seq_len=64",
                                  "eval.sample_tokens=0"]))  # "no sample" is what happens


def test_resuming_compares_only_what_makes_another_model():
    saved = configs.get("transformer_tiny")
    how = apply_overrides(saved, [f"model.{key}={value}" for key, value in [
        ("remat", "true"), ("dtype", "bfloat16"), ("attention_impl", "xla")]])
    unread = apply_overrides(saved, ["model.routing_clusters=3", "model.d_state=4"])
    assert {"remat", "dtype", "attention_impl"} <= HOW_KEYS
    assert model_differences(saved, how) == [] and model_differences(saved, unread) == []
    assert model_differences(saved, apply_overrides(saved, ["model.d_ff=64"])) == [
        "model.d_ff: 384 -> 64"]
    # a key read by one side counts: a Transformer and a routing transformer differ
    routing = apply_overrides(saved, ["model.name=routing_transformer", "model.n_kv_heads=4",
                                      "model.routing_clusters=3"])
    assert model_differences(saved, routing)[:1] == [
        "model.name: 'transformer' -> 'routing_transformer'"]
    assert "model.routing_clusters: 8 -> 3" in model_differences(saved, routing)


# the rerun extends train.steps on purpose, which moves the learning rate it resumes at
@pytest.mark.filterwarnings("ignore::jaxsparse.errors.ScheduleChangeWarning")
def test_a_run_resumes_with_remat_and_an_unread_key_changed(tmp_path):
    from helpers import tiny_config
    from jaxsparse.train import train

    train(tiny_config("train.steps=2"), tmp_path, sample=False, quiet=True)
    with pytest.warns(UnreadKeyWarning, match="model.routing_decay=0.9"):
        cfg = tiny_config("train.steps=3", "model.remat=true", "model.routing_decay=0.9")
        result = train(cfg, tmp_path, sample=False, quiet=True)
    assert result.step == 3 and list(result.losses) == [2]


def test_the_cli_prints_them_as_its_own_warning(capsys):
    from jaxsparse.cli import main

    with warnings.catch_warnings():  # as outside pytest, which makes this warning an error
        warnings.simplefilter("default", UnreadKeyWarning)
        assert main(["dryrun", "--config", "transformer_tiny", "--devices", "1", "--set",
                     "model.moe_k=1", "--set", "data.batch_size=2", "--set",
                     "data.seq_len=16"]) == 0
    err = capsys.readouterr().err
    assert ("jaxsparse dryrun: warning: these settings have no effect on this run:\n"
            "  model.moe_k=1: no layer is MoE (model.moe_experts=0, model.moe_every=2, 4 "
            "layers)\n") in err
    assert "config_usage.py" not in err and "dryrun.py" not in err  # no source location
