"""Config checks and the command line where they meet the models: conversion follows the
builders' own rule, validation asks only what a model reads, and the CLI reports what it did
(the sample it drew, the files it wrote, the device count it chose) and names a broken config
file instead of failing on it. Nothing here trains; the models are a few thousand parameters."""

import dataclasses
import shutil
import warnings
from pathlib import Path

import jax
import pytest
from flax import nnx

from jaxsparse import configs
from jaxsparse.cli import main
from jaxsparse.config import (Config, ConfigError, ModelConfig, SampleLengthWarning,
                              apply_overrides, validate)
from jaxsparse.models.registry import build

TINY = dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64, max_seq_len=64)


def structure(model) -> dict[str, tuple]:
    """Every parameter's path and shape."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {jax.tree_util.keystr(path): leaf.shape for path, leaf in leaves}


# --- jaxsparse.sparsify: the builders' rule ---------------------------------------------------


@pytest.mark.parametrize("source, target", [
    # MoE's shared expert is a SwiGLU inside the MoE layer: it stays dense, as experts do
    (dict(TINY, moe_experts=4, moe_k=1, moe_every=2, moe_shared_experts=1), "mlp"),
    # a routing transformer's lower layers are dense Attention: no Monarch attention anywhere
    (dict(TINY, name="routing_transformer", routing_skip_first=1, routing_clusters=4,
          routing_window=4, routing_local_window=4), "mlp,attention"),
])
def test_converted_params_have_the_structure_the_target_config_builds(source, target):
    src = ModelConfig(**source)
    tgt = dataclasses.replace(src, monarch=target)
    from jaxsparse.sparsify import convert_params

    converted = convert_params(build(src, nnx.Rngs(0)), src, tgt)
    assert structure(converted) == structure(build(tgt, nnx.Rngs(0)))


def test_conversion_ignores_what_resuming_ignores_and_names_the_rest():
    """Keys that only choose how the model is computed (remat, dtype, *_impl) and keys neither
    model reads may differ, as on resuming (config_usage.model_differences); others are named."""
    from jaxsparse.sparsify import convert_params

    src = ModelConfig(**TINY)
    model = build(src, nnx.Rngs(0))
    tgt = dataclasses.replace(src, monarch="mlp", remat=True, dtype="bfloat16",
                              attention_impl="xla", routing_clusters=4, d_state=8)
    converted = convert_params(model, src, tgt)
    assert structure(converted) == structure(build(tgt, nnx.Rngs(0)))
    with pytest.raises(ConfigError, match=r"model\.d_ff differs \(64 in the source run, 128 "
                                          r"here\)") as err:
        convert_params(model, src, dataclasses.replace(tgt, d_ff=128))
    assert "routing_clusters" not in str(err.value) and "remat" not in str(err.value).split(";")[0]


def test_monarch_layers_are_reblocked_where_monarch_blocks_differs():
    from jaxsparse.sparsify import convert_params

    src = ModelConfig(**TINY, monarch="mlp", monarch_blocks=2)
    tgt = dataclasses.replace(src, monarch_blocks=4)
    converted = convert_params(build(src, nnx.Rngs(0)), src, tgt)
    assert structure(converted) == structure(build(tgt, nnx.Rngs(0)))


# --- jaxsparse.config.validate ------------------------------------------------------------------


@pytest.mark.parametrize("name, overrides", [
    ("mamba_tiny", ["model.d_model=100"]),  # head_dim 25 would be odd: no rotary embeddings here
    ("mamba_tiny", ["model.d_model=130"]),  # not divisible by n_heads=4: mamba has no heads
    ("mamba2_tiny", ["model.d_model=100", "model.ssm_head_dim=50"]),
])
def test_head_checks_apply_only_to_models_with_attention(name, overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate(apply_overrides(configs.get(name), overrides))
    with pytest.raises(ConfigError, match="rotary embeddings need an even head dim"):
        validate(apply_overrides(configs.get("transformer_tiny"), ["model.d_model=100"]))


def test_an_unknown_model_name_is_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"model.name='transfromer' is not a registered model\. "
                                          r"Did you mean 'transformer'"):
        validate(apply_overrides(Config(), ["model.name=transfromer"]))


@pytest.mark.parametrize("name", [5, "", "  ", "a/b", "..", None])
def test_the_run_name_must_name_a_directory(name):
    with pytest.raises(ConfigError, match=r"name=.*: expected a non-empty string without '/'"):
        validate(Config(name=name))


def test_a_sample_longer_than_max_seq_len_allows_is_reported():
    cfg = apply_overrides(Config(), ["model.max_seq_len=64", "data.seq_len=32"])
    with pytest.warns(SampleLengthWarning, match=r"eval.sample_tokens=160: the end-of-training "
                                                 r"sample will have 60 bytes .* <= 60"):
        validate(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate(apply_overrides(cfg, ["eval.sample_tokens=60"]))
        validate(apply_overrides(cfg, ["data.task=mqar", "eval.sample_tokens=0"]))


# --- projection FLOPs ---------------------------------------------------------------------------


def test_projection_flops_count_no_key_projection_in_shared_qk_routing_layers():
    """Two FLOPs per weight of a projection: shared_qk removes exactly the routing layers' k
    projections, in FLOPs as in parameters; a routing transformer's attention is never Monarch."""
    from jaxsparse.models import count_params
    from jaxsparse.models.transformer import projection_flops_per_token

    m = configs.get("routing_tiny").model
    shared = dataclasses.replace(m, routing_shared_qk=True)
    saved_params = count_params(m) - count_params(shared)
    assert saved_params == (m.n_layers - m.routing_skip_first) * m.d_model * m.n_heads * 32
    assert projection_flops_per_token(m) - projection_flops_per_token(shared) == 2 * saved_params
    assert (projection_flops_per_token(dataclasses.replace(m, monarch="mlp,attention"))
            == projection_flops_per_token(dataclasses.replace(m, monarch="mlp")))


# --- the command line ---------------------------------------------------------------------------


def test_train_reports_the_sample_it_drew_and_the_files_it_wrote(tmp_path, capsys, monkeypatch):
    import jaxsparse.train
    from jaxsparse.train import TrainResult

    def fake_train(cfg, workdir):
        return TrainResult(step=1, losses={}, eval_metrics={"loss": 1.0}, stopped_early=False,
                           sample=cfg.eval.sample_prompt + "x" * 60)

    monkeypatch.setattr(jaxsparse.train, "train", fake_train)
    assert main(["train", "--config", "transformer_tiny", "--workdir", str(tmp_path), "--set",
                 "model.max_seq_len=64", "--set", "data.seq_len=32", "--set",
                 "train.tensorboard=false"]) == 0
    out, err = capsys.readouterr()
    assert "sample (4-byte prompt + 60 generated bytes, temperature 0.8)" in out
    assert "160" not in out
    assert f"workdir: {tmp_path} (metrics.jsonl, checkpoints/;" in out and "tensorboard" not in out
    assert "jaxsparse train: warning: eval.sample_tokens=160:" in err


@pytest.mark.parametrize("overrides, devices, note", [
    # the -1 axis splits the batch: as many devices as split it
    ([], 32, "--devices 32: 64 emulated devices cannot split data.batch_size=32"),
    # the -1 axis is the tensor axis: the batch is not what limits it, the kv heads are
    (["mesh.data=1", "mesh.tensor=-1", "mesh.preset=fsdp_tp"], 2,
     "--devices 2: 64 emulated devices are refused: mesh.tensor=64 must divide model.n_heads=4"),
    (["mesh.data=-1", "mesh.fsdp=2", "mesh.preset=fsdp"], 32, "cannot split data.batch_size=32"),
    (["mesh.data=-1", "data.batch_size=64"], 64, None),
    (["mesh.data=4"], 4, None),
])
def test_dryrun_chooses_a_device_count_the_minus_one_axis_allows(overrides, devices, note):
    from jaxsparse.dryrun import default_device_count

    cfg = validate(apply_overrides(configs.get("transformer_tiny"), overrides))
    chosen, message = default_device_count(cfg)
    assert chosen == devices
    assert (message is None) if note is None else (note in message)


def test_dryrun_asks_for_devices_where_no_count_suits():
    from jaxsparse.dryrun import default_device_count

    cfg = validate(apply_overrides(configs.get("transformer_tiny"),
                                   ["mesh.data=-1", "mesh.fsdp=3", "mesh.preset=fsdp"]))
    with pytest.raises(ConfigError, match=r"mesh.data=-1: no emulated device count .* --devices"):
        default_device_count(cfg)


def test_a_config_error_in_the_dry_runs_own_process_is_one_line(tmp_path, capsys):
    """A check that fails only in the child process (here: the config file refuses to load
    there) was a RuntimeError wrapping the child's traceback."""
    path = tmp_path / "child.py"
    path.write_text("import sys\nfrom jaxsparse.config import Config, ConfigError\n"
                    "def get_config():\n"
                    "    if sys.argv[0] == '-c':  # the dry run's own interpreter\n"
                    "        raise ConfigError('refused in the child')\n"
                    "    return Config(name='child')\n")
    code = main(["dryrun", "--config", str(path), "--devices", "1", "--no-compile"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "RuntimeError" not in err
    assert err.startswith("jaxsparse dryrun: error: ") and "refused in the child" in err


def test_configs_lists_the_others_beside_a_broken_file(tmp_path, capsys, monkeypatch):
    shutil.copy(Path(configs.config_dir()) / "transformer_tiny.py", tmp_path)
    (tmp_path / "bad.py").write_text(
        "from jaxsparse.config import Config, ModelConfig\n"
        "def get_config():\n"
        "    return Config(name='bad', model=ModelConfig(d_model=0))\n")
    (tmp_path / "crash.py").write_text("import nonexistent_module_xyz\n")
    monkeypatch.setenv("JAXSPARSE_CONFIG_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match=rf"config file {tmp_path / 'bad.py'}: model.d_model=0"):
        configs.get("bad")
    with pytest.raises(ConfigError, match=rf"config file {tmp_path / 'crash.py'}, line 1: "
                                          "ModuleNotFoundError"):
        configs.get("crash")
    assert main(["configs"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:] if line}
    assert f"error: config file {tmp_path / 'bad.py'}: model.d_model=0: must be >= 1" in rows["bad"]
    assert "error: config file" in rows["crash"]
    assert "853,120" in rows["transformer_tiny"] and "error" not in rows["transformer_tiny"]


def test_a_config_file_is_validated_after_the_command_lines_overrides(tmp_path, capsys):
    """An override can repair what the file alone would be refused for, and the warnings
    describe the model that runs, not the file's (both were checked before the overrides)."""
    path = tmp_path / "long.py"
    path.write_text("from jaxsparse.config import Config, DataConfig, ModelConfig\n"
                    "def get_config():\n"
                    "    return Config(name='long', model=ModelConfig(name='mamba', n_heads=8,\n"
                    "                  max_seq_len=256), data=DataConfig(seq_len=512))\n")
    with pytest.raises(ConfigError, match=rf"config file {path}: data.seq_len=512 exceeds "
                                          "model.max_seq_len=256"):
        configs.get(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # mamba ignores n_heads; the transformer reads it
        cfg = configs.get(str(path), ["model.max_seq_len=1024", "model.name=transformer"])
    assert cfg.model.max_seq_len == 1024 and cfg.model.name == "transformer"


def test_a_misspelled_keyword_in_a_config_file_gets_a_suggestion(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text("from jaxsparse.config import Config, ModelConfig\n"
                    "def get_config():\n"
                    "    return Config(model=ModelConfig(dmodel=64))\n")
    with pytest.raises(ConfigError, match=r"unexpected keyword argument 'dmodel'. Did you mean "
                                          r"d_model\?"):
        configs.get(str(path))
    path.write_text("from jaxsparse.config import Config\n"
                    "def get_config():\n"
                    "    return Config(nmae='x')\n")
    with pytest.raises(ConfigError, match=r"'nmae'. Did you mean name\?"):
        configs.get(str(path))
    # an override's mistake says the overrides were applied (it named the file alone)
    with pytest.raises(ConfigError, match=r"transformer_tiny.py with overrides "
                                          r"\['data.batch_size=0'\]: data.batch_size=0: must"):
        configs.get("transformer_tiny", ["data.batch_size=0"])


def test_a_config_section_that_is_not_its_dataclass_is_refused(tmp_path, capsys):
    """Config(model={...}) from a config file was an AttributeError traceback."""
    path = tmp_path / "dicts.py"
    path.write_text("from jaxsparse.config import Config\n"
                    "def get_config():\n"
                    "    return Config(model={'d_model': 64})\n")
    assert main(["dryrun", "--config", str(path), "--devices", "1", "--no-compile"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "model={'d_model': 64}: expected a ModelConfig" in err
    for section in ("data", "optimizer", "mesh", "train", "eval"):
        with pytest.raises(ConfigError, match=rf"{section}={{}}: expected a \w+Config"):
            validate(dataclasses.replace(Config(), **{section: {}}))
