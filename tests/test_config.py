import dataclasses
import re
import warnings

import pytest

from jaxsparse import configs
from jaxsparse.cli import main
from jaxsparse.config import (Config, ConfigError, PrecisionWarning, ScheduleLengthWarning,
                              apply_overrides, from_json, to_json, valid_keys, validate)


def test_every_named_config_is_valid_and_round_trips_through_json():
    assert "transformer_tiny" in configs.names()
    for name in configs.names():
        cfg = configs.get(name)
        assert cfg.name == name
        assert from_json(to_json(cfg)) == cfg


def test_override_parses_by_field_type():
    cfg = apply_overrides(Config(), ["model.d_model=256", "optimizer.lr=1e-4",
                                     "model.tie_embeddings=false", "model.head_dim=none",
                                     "data.path=/x/*.txt", "data.task=text"])
    assert cfg.model.d_model == 256 and cfg.optimizer.lr == 1e-4
    assert cfg.model.tie_embeddings is False and cfg.model.head_dim is None
    assert cfg.data.path == "/x/*.txt"


def test_unknown_key_is_named_with_suggestion_and_valid_keys():
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), ["model.d_modle=3"])
    message = str(err.value)
    assert "model.d_modle" in message and "Did you mean model.d_model" in message
    assert "model.n_layers" in message  # lists what is valid


def test_unknown_section_lists_sections():
    with pytest.raises(ConfigError, match="unknown config section 'modle'.*model, data"):
        apply_overrides(Config(), ["modle.d_model=3"])


@pytest.mark.parametrize("item, fragment", [
    ("model.d_model=abc", "model.d_model='abc': expected an int"),
    ("optimizer.lr=fast", "optimizer.lr='fast': expected a float"),
    ("model.tie_embeddings=maybe", "expected a bool"),
    ("model.d_model", "expected the form section.key=value"),
])
def test_wrong_types_name_the_key(item, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        apply_overrides(Config(), [item])


@pytest.mark.parametrize("overrides, fragment", [
    (["model.n_heads=4", "model.n_kv_heads=3"], "model.n_heads=4 must be a multiple of model.n_kv_heads=3"),
    (["model.d_model=0"], "model.d_model=0: must be >= 1"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "at most one axis may be -1"),
    (["data.task=images"], "data.task='images': allowed"),
    (["data.seq_len=4096"], "data.seq_len=4096 exceeds model.max_seq_len"),
    (["model.dtype=float8"], "model.dtype='float8'"),
    (["model.d_model=30", "model.n_heads=4"], "set model.head_dim explicitly"),
    (["optimizer.min_lr_ratio=2"], "optimizer.min_lr_ratio=2.0"),
    (["data.packed_documents=true", "data.task=mqar", "model.vocab_size=64"],
     "data.packed_documents=True needs data.task='text'"),
    (["optimizer.lr=inf"], "optimizer.lr=inf: must be a finite number"),
    (["model.norm_eps=nan"], "model.norm_eps=nan: must be a finite number"),
    (["eval.temperature=inf"], "eval.temperature=inf: must be a finite number"),
    (["model.norm_eps=-1"], "model.norm_eps=-1.0: must be in (0, 1)"),
    (["optimizer.eps=0"], "optimizer.eps=0.0: must be > 0"),
    (["model.param_dtype=float16"], "model.param_dtype='float16': the optimiser's moments"),
    (["model.attention_impl=bogus"], "model.attention_impl='bogus': allowed"),
    (["model.attention_mask=heads:local:4;local:8"],
     "model.attention_mask='heads:local:4;local:8': mask spec 'heads:local:4;local:8' gives 2 "
     "heads; the model has 4"),
    (["eval.top_k=257"], "eval.top_k=257: must be in [0, model.vocab_size=256]"),
    (["data.seed=-1"], "data.seed=-1: must be in [0, 2**32)"),
    (["train.seed=4294967296"], "train.seed=4294967296: must be in [0, 2**32)"),
    (["train.seed=99999999999999999999"], "train.seed=99999999999999999999: must be in"),
    (["model.moe_experts=4", "model.moe_capacity_factor=inf"],
     "model.moe_capacity_factor=inf: must be a finite number"),
    (["model.moe_experts=4", "model.moe_jitter=1.5"], "model.moe_jitter=1.5: must be in [0, 1)"),
    (["model.moe_experts=4", "model.moe_z_weight=-1"], "model.moe_z_weight=-1.0: must be >= 0"),
    (["model.moe_experts=4", "model.moe_shared_experts=-1"],
     "model.moe_shared_experts=-1: must be >= 0"),
    (["model.moe_experts=4", "model.moe_grouped_impl=bogus"],
     "model.moe_grouped_impl='bogus': allowed"),
    (["model.name=mamba", "model.d_state=0"], "model.d_state=0: must be >= 1"),
    (["model.name=mamba", "model.dt_rank=-1"], "model.dt_rank=-1: must be >= 1, or None"),
    (["model.name=mamba", "model.ssm_impl=bogus"], "model.ssm_impl='bogus': allowed"),
    (["model.name=mamba2", "model.ssm_head_dim=48"],
     "model.ssm_head_dim=48 must divide model.expand * model.d_model = 256"),
    (["model.name=mamba2", "model.ssm_groups=3"], "model.ssm_groups=3 must divide the 4 SSM heads"),
    (["model.name=mamba2", "mesh.data=1", "mesh.tensor=8"],
     "mesh.tensor=8 must divide the 4 SSM heads"),
    (["model.name=mamba2", "model.ssm_groups=2", "mesh.data=1", "mesh.tensor=4"],
     "mesh.tensor=4 must divide the 2 model.ssm_groups"),
    (["model.name=hydra", "model.hydra_max_global=64", "model.pkm_layers=1",
      "model.pkm_slots=-1"], "model.pkm_slots=-1: must be a perfect square"),
    (["data.task=selective_copying", "data.num_tokens_to_copy=0"],
     "data.task='selective_copying': selective_copying: data.num_tokens_to_copy=0 must be >= 1"),
    (["data.task=induction_heads", "data.induction_prefix=0"],
     "data.task='induction_heads': induction_heads: data.induction_prefix=0 must be >= 2"),
    (["data.task=induction_heads", "data.induction_prefix=100"],
     "data.seq_len=128 too short for data.induction_prefix=100 (need >= 199"),
    (["data.task=induction_heads", "model.vocab_size=8"],
     "model.vocab_size=8 too small for data.induction_prefix=16 (need >= 17"),
    (["data.task=multi_hop", "data.hops=-1"],
     "multi_hop: data.hops=-1 and data.chains=4 must be >= 1"),
    (["model.monarch=mlp", "model.monarch_impl=pallas_interpret"],
     "model.monarch_impl='pallas_interpret': no kernel takes the 128 -> 384 projection's factors"),
    # the float32-only C++ kernels: the run wrote its workdir and failed at its first step
    (["model.monarch=mlp", "model.monarch_impl=native", "model.dtype=float16"],
     "model.monarch_impl='native' computes in float32; model.dtype='float16' needs 'xla' or None"),
    (["model.moe_experts=4", "model.moe_grouped_impl=native", "model.dtype=bfloat16"],
     "model.moe_grouped_impl='native' computes in float32; model.dtype='bfloat16' needs 'tiles'"),
    (["model.head_dim=0"], "model.head_dim=0: must be >= 1"),
    (["eval.sample_tokens=-1"], "eval.sample_tokens=-1: must be >= 0"),
    (["model.max_seq_len=64", "data.seq_len=64", "eval.sample_prompt=" + "x" * 64],
     "is 64 bytes: the end-of-training sample needs 1 to model.max_seq_len - 1 = 63"),
    (["train.nonfinite=ignore"], "train.nonfinite='ignore': allowed"),
    (["train.init_from="], "train.init_from='': give a path, or leave it unset"),
    (["data.path= "], "data.path=' ': give a path, or leave it unset"),
])
def test_impossible_values_are_refused(overrides, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        validate(apply_overrides(Config(), overrides))


def test_validate_catches_wrong_types_set_in_python():
    cfg = dataclasses.replace(Config(), train=dataclasses.replace(Config().train, steps="10"))
    with pytest.raises(ConfigError, match="train.steps='10': expected"):
        validate(cfg)


def test_unknown_config_name_lists_names():
    with pytest.raises(ConfigError, match="unknown config 'nope'.*transformer_tiny"):
        configs.get("nope")


def test_valid_keys_cover_every_section():
    keys = valid_keys(Config())
    for section in ("model", "data", "optimizer", "mesh", "train", "eval"):
        assert any(k.startswith(section + ".") for k in keys)


def test_cli_reports_bad_input_without_traceback(capsys, tmp_path):
    assert main(["train", "--config", "nope", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown config 'nope'" in err and "transformer_tiny" in err and "Traceback" not in err
    assert main(["train", "--set", "model.wat=1", "--workdir", str(tmp_path)]) == 2
    assert "model.wat" in capsys.readouterr().err
    assert main(["train", "--set", "data.path=/definitely/missing/*.txt",
                 "--workdir", str(tmp_path)]) == 2
    assert "matched no files" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "a failed start must not write into the workdir"


def test_cli_configs_lists_parameter_counts(capsys):
    from jaxsparse.models import count_params

    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    expected = count_params(configs.get("transformer_tiny").model)
    line = next(l for l in out.splitlines() if l.startswith("transformer_tiny"))
    assert f"{expected:,}" in line
    default = next(l for l in out.splitlines() if l.startswith(configs.DEFAULT + " "))
    assert "(default)" in default
    assert expected > 500_000  # the real model, not an empty shell


def test_a_saved_config_older_than_a_setting_is_read_with_a_warning_naming_it(tmp_path):
    """A workdir saved before a setting existed reads it as today's default: said, with the
    default taken (a routing run saved before ``routing_reseed`` was read as reseeding)."""
    import json

    from jaxsparse.errors import OlderConfigWarning
    from jaxsparse.train.loop import read_config

    raw = json.loads(to_json(configs.get("routing_tiny")))
    del raw["model"]["routing_reseed"], raw["train"]["nonfinite"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    with pytest.warns(OlderConfigWarning) as caught:
        cfg = read_config(path)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert str(path) in message
    assert "model.routing_reseed=True" in message and "train.nonfinite='stop'" in message
    assert "model.routing_window" not in message  # saved keys are not named
    assert cfg.model.routing_reseed is True

    path.write_text(to_json(configs.get("routing_tiny")))  # a config of this version: silent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_config(path)


def test_a_sample_prompt_that_is_not_utf8_is_a_config_error(capsys):
    """Undecodable command-line bytes arrive as surrogates; validate's len(prompt.encode())
    was an uncaught UnicodeEncodeError."""
    cfg = apply_overrides(configs.get("transformer_tiny"), ["eval.sample_prompt=\udcffdef"])
    with pytest.raises(ConfigError, match="eval.sample_prompt='\\\\udcffdef': not valid UTF-8"):
        validate(cfg)
    assert main(["dryrun", "--config", "transformer_tiny", "--devices", "1", "--no-compile",
                 "--set", "eval.sample_prompt=\udcffdef"]) == 2
    assert "not valid UTF-8" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["data.batch_size", "model.d_ff", "train.steps", "mesh.data"])
def test_integers_beyond_32_bits_are_refused_by_name(key):
    """99999999999999999999 as a batch size crashed in MLIR lowering; the seeds keep their
    own bound, [0, 2**32)."""
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}=99999999999999999999: must be "
                                          r"below 2\*\*31"):
        validate(apply_overrides(configs.get("transformer_tiny"), [f"{key}=99999999999999999999"]))
    for seed in ("data.seed", "train.seed"):
        validate(apply_overrides(configs.get("transformer_tiny"), [f"{seed}=3000000000"]))


def test_an_unknown_section_in_a_saved_config_is_refused():
    """A misspelled section was read as all defaults, contrary to from_dict's docstring."""
    with pytest.raises(ConfigError, match=r"unknown config section 'modle'. Did you mean model\?"):
        from_json('{"modle": {"d_model": 3}}')


@pytest.mark.parametrize("preset, overrides, message", [
    ("transformer_tiny", ["optimizer.warmup_steps=50"],
     r"optimizer.warmup_steps=50 with train.steps=10: the warm-up is shortened to 9 steps"),
    ("transformer_tiny", ["optimizer.warmup_steps=10"],
     r"optimizer.warmup_steps=10 with train.steps=10: the warm-up is shortened to 9 steps"),
    ("routing_tiny", ["model.routing_dense_steps=10"],
     r"model.routing_dense_steps=10 >= train.steps=10: the routing heads attend densely"),
    ("hydra_tiny", ["model.hydra_curriculum=sga:4,moe:10"],
     r"'sga:4,moe:10': moe:10 start\(s\) at or after train.steps=10"),
    ("transformer_tiny", ["model.moe_experts=4", "model.moe_k=1", "model.moe_k_end=3",
                          "model.moe_router=random", "model.moe_k_schedule_steps=30"],
     r"k reaches 2 at the last step, not model.moe_k_end=3"),
])
def test_schedules_longer_than_the_run_are_warned_about(preset, overrides, message):
    cfg = apply_overrides(configs.get(preset),
                          ["train.steps=10", "optimizer.warmup_steps=2"] + overrides)
    with pytest.warns(ScheduleLengthWarning, match=message):
        validate(cfg)
    with warnings.catch_warnings():  # the same schedules in a long enough run: silent
        warnings.simplefilter("error", ScheduleLengthWarning)
        validate(apply_overrides(cfg, ["train.steps=100"]))


def test_bfloat16_parameters_are_warned_about_and_their_rounding_is_real():
    """No float32 master copy: AdamW's decoupled decay (lr·wd·p, 3e-4 of p at lr 3e-3, wd
    0.1) is below bfloat16's spacing, so a bfloat16 weight never shrinks."""
    import jax
    import jax.numpy as jnp
    import optax

    from jaxsparse.config import OptimizerConfig
    from jaxsparse.train.optim import make_optimizer

    with pytest.warns(PrecisionWarning, match="no float32 master copy"):
        validate(apply_overrides(configs.get("transformer_tiny"), ["model.param_dtype=bfloat16"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        validate(apply_overrides(configs.get("transformer_tiny"), ["model.dtype=bfloat16"]))
    tx = make_optimizer(OptimizerConfig(lr=3e-3, warmup_steps=0, weight_decay=0.1), 100)
    ends = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        p = {"w": jnp.full((2, 2), 0.05, dtype)}
        state = tx.init(p)
        for _ in range(20):
            updates, state = tx.update(jax.tree.map(jnp.zeros_like, p), state, p)
            p = optax.apply_updates(p, updates)
        ends[dtype.__name__] = float(p["w"][0, 0])
    assert ends["float32"] < 0.0499  # 20 steps of 3e-4 shrinkage
    assert ends["bfloat16"] == float(jnp.bfloat16(0.05))  # not one of them taken


@pytest.mark.parametrize("spec", ["longformer:16,2", "bigbird:8,3,1,1",
                                  "heads:local:8*2;longformer:8,1*2"])
def test_global_token_masks_are_refused_with_packed_documents(spec):
    """Their global tokens are each row's first positions: with packed documents only the
    first document had any (document 1 of a packed row attended through the window alone,
    1.7 off the same document run alone)."""
    packed = ["data.packed_documents=true", f"model.attention_mask={spec}"]
    with pytest.raises(ConfigError, match=r"global tokens are each row's first positions"):
        validate(apply_overrides(configs.get("transformer_tiny"), packed))
    validate(apply_overrides(configs.get("transformer_tiny"), packed[1:]))  # unpacked: fine
    validate(apply_overrides(configs.get("transformer_tiny"),
                             ["data.packed_documents=true", "model.attention_mask=strided:8"]))
