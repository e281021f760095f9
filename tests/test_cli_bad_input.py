"""Bad command-line input and damaged workdirs give one line naming what is wrong (exit status
2), never a traceback; a torn metrics file loses no later record. None of these compiles a
model: every check runs before anything is built."""

import json
import warnings

import pytest

from jaxsparse.cli import main
from jaxsparse.config import ConfigError, from_json, to_json, Config
from jaxsparse.train.metrics import MetricWriter, read_metrics


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize("text, fragment", [
    ("", "invalid JSON"),
    ("{'model': ", "invalid JSON"),
    ("[1, 2]", "expected a JSON object of sections"),
    ('{"model": 3}', "expected a JSON object of sections"),
])
def test_a_damaged_config_json_is_named(tmp_path, capsys, text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        from_json(text)
    (tmp_path / "config.json").write_text(text)
    code, err = run_cli(capsys, "eval", "--workdir", str(tmp_path))
    assert code == 2 and f"{tmp_path}/config.json: not a config" in err and fragment in err


def test_a_config_json_that_is_a_directory_or_a_workdir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "run" / "config.json").mkdir(parents=True)
    code, err = run_cli(capsys, "eval", "--workdir", str(tmp_path / "run"))
    assert code == 2 and "config.json is not a file" in err
    (tmp_path / "afile").write_text("x")
    code, err = run_cli(capsys, "train", "--workdir", str(tmp_path / "afile"))
    assert code == 2 and "is a file, not a directory" in err
    assert from_json(to_json(Config())) == Config()  # the round trip still holds


@pytest.mark.parametrize("argv, fragment", [
    (["--prompt", ""], "--prompt='': give at least one character"),
    (["--prompt", "ab\udcff"], "is not valid UTF-8 text"),  # undecodable bytes of argv
    (["--temperature", "inf"], "--temperature=inf: must be a finite number >= 0"),
    (["--temperature", "nan"], "--temperature=nan: must be a finite number >= 0"),
    (["--seed", "4294967296"], "--seed=4294967296: must be in [0, 2**32)"),  # would repeat 0
    (["--seed", "-1"], "--seed=-1: must be in [0, 2**32)"),
    (["--top-p", "0"], "--top-p=0.0: must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p=1.5: must be in (0, 1]"),
    (["--top-p", "nan"], "--top-p=nan: must be in (0, 1]"),
])
def test_generate_checks_its_flags_before_loading(tmp_path, capsys, argv, fragment):
    code, err = run_cli(capsys, "generate", "--workdir", str(tmp_path / "missing"), *argv)
    assert code == 2 and fragment in err


@pytest.mark.parametrize("argv, fragment", [
    (["--mesh", "data=2,data=2"], "names the data axis twice"),
    (["--mesh", ""], "names no axis"),
    (["--devices", "0"], "0 emulated devices: must be in [1, 4096]"),
    (["--mesh", "data=100000"], "100000 emulated devices: must be in [1, 4096]"),
    # 3 devices cannot split transformer_tiny's batch of 32: refused, not "compiled"
    (["--config", "transformer_tiny", "--mesh", "data=3"],
     "data.batch_size=32 is not divisible by the data-parallel size 3"),
    # a -1 axis gets the same checks once resolved (these ended in XLA or the MoE layer)
    (["--config", "mamba2_tiny", "--devices", "4", "--set", "mesh.data=1", "--set",
      "mesh.tensor=-1", "--set", "model.d_model=32"], "mesh.tensor=4 must divide the 2 SSM heads"),
    (["--config", "moe_tiny", "--devices", "16", "--set", "mesh.data=1", "--set",
      "mesh.expert=-1"], "mesh.expert=16 must divide model.moe_experts=8"),
    # the mesh's own device count (4), not the 32 that split the batch
    (["--config", "transformer_tiny", "--set", "mesh.data=2", "--set", "mesh.fsdp=2",
      "--set", "data.batch_size=6"], "data.batch_size=6 is not divisible by the data-parallel "
                                     "size 4"),
])
def test_dryrun_refuses_meshes_it_cannot_emulate_or_split(capsys, argv, fragment):
    code, err = run_cli(capsys, "dryrun", *argv)
    assert code == 2 and fragment in err


def test_dryrun_prints_no_device_note_before_an_unrelated_error(capsys):
    """The bare dryrun's note (--devices 32: 64 emulated devices cannot split ...) came before
    any config error; the config is now validated before a device count is chosen."""
    code = main(["dryrun", "--preset", "bogus"])
    out, err = capsys.readouterr()
    assert code == 2 and "mesh.preset='bogus': allowed" in err and "Traceback" not in err
    assert out == ""


def test_dryrun_of_a_mesh_without_minus_one_emulates_its_own_device_count(capsys):
    """mesh.data=4 names 4 devices: the default is 4, not the 32 that split the batch (that
    was refused: the mesh needs 4 devices but 32 are available)."""
    assert main(["dryrun", "--config", "transformer_tiny", "--set", "mesh.data=4",
                 "--no-compile"]) == 0
    out = capsys.readouterr().out
    assert "--devices" not in out and "on 4 emulated devices" in out


def test_a_bare_dryrun_emulates_as_many_devices_as_split_the_batch(capsys):
    """The default 64 emulated devices cannot split the default config's batch of 32: the bare
    command was refused; it now emulates 32."""
    assert main(["dryrun", "--no-compile"]) == 0
    out = capsys.readouterr().out
    assert "--devices 32: 64 emulated devices cannot split data.batch_size=32" in out
    assert "hydra_tiny: " in out and "on 32 emulated devices" in out


def test_configs_refuses_an_empty_sharding_name(capsys):
    code, err = run_cli(capsys, "configs", "--sharding", "")
    assert code == 2 and "--sharding '' is not a sharding preset" in err


@pytest.mark.parametrize("argv, fragment", [
    (["--coordinator", "notaport"], "coordinator address 'notaport': must be HOST:PORT"),
    (["--num-processes", "0"], "number of processes 0: must be >= 1"),
    (["--coordinator", "localhost:1", "--num-processes", "1", "--process-id", "5"],
     "process id 5: must be in [0, number of processes = 1)"),
])
def test_multi_process_flags_are_checked(tmp_path, capsys, argv, fragment):
    code, err = run_cli(capsys, "train", "--workdir", str(tmp_path), *argv)
    assert code == 2 and fragment in err


@pytest.mark.parametrize("env, fragment", [
    ({"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two': must be an integer >= 1"),
    ({"JAX_NUM_PROCESSES": "0"}, "JAX_NUM_PROCESSES='0': must be an integer >= 1"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "first"},
     "JAX_PROCESS_ID='first': must be an integer >= 0 and < the number of processes (2)"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     "JAX_PROCESS_ID='2': must be an integer >= 0 and < the number of processes (2)"),
])
def test_multi_process_environment_is_checked(tmp_path, capsys, monkeypatch, env, fragment):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, err = run_cli(capsys, "train", "--workdir", str(tmp_path / "run"))
    assert code == 2 and fragment in err
    assert not (tmp_path / "run").exists()


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_a_torn_metrics_line_loses_no_later_record(tmp_path):
    """A run killed mid-write leaves half a line; the resumed run's writer ends it first (its
    records used to be glued onto it and lost), and readers skip it with a warning."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "split": "train", "loss": 2.0}) + "\n"
                    + '{"step": 2, "split": "tr')
    writer = MetricWriter(tmp_path, tensorboard=False)
    writer.write(3, "train", {"loss": 1.5})
    writer.close()
    with pytest.warns(UserWarning, match=r"skipped 1 line\(s\) that are not metric records \(line 2\)"):
        records = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in records] == [(1, 2.0), (3, 1.5)]
    with open(path, "a") as f:  # records that are JSON but not records
        f.write("[1, 2]\n" + json.dumps({"split": "train"}) + "\n")
    with pytest.warns(UserWarning, match=r"skipped 3 line\(s\) .*\(line 2, 4, 5\)"):
        assert len(read_metrics(tmp_path)) == 2


def test_a_restarted_run_drops_the_given_up_records_past_its_checkpoint(tmp_path):
    """A run resumed from its checkpoint at step 4 gave up what an earlier run logged past it
    (a divergence, a kill): those records are dropped, as TensorBoard's are. Kept, a diverged
    run's record at a step the resumed run did not log again stayed in every plot (lr 6.7e29,
    grad_norm NaN). A fresh start (step 0) keeps only the step-0 evaluation, which it reruns."""
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "split": "train", "loss": float(s)} for s in range(1, 8)]
    lines += [{"step": 4, "split": "eval", "loss": 0.5}, {"step": 7, "split": "eval", "loss": 9.0}]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n" + "[torn]\n")
    MetricWriter(tmp_path, tensorboard=False).close()  # no resume step: nothing dropped
    assert len(path.read_text().splitlines()) == 10
    writer = MetricWriter(tmp_path, tensorboard=False, resume_step=4)
    writer.write(5, "train", {"loss": 0.25})
    writer.close()
    with pytest.warns(UserWarning, match="skipped 1 line"):  # the torn line is left as it was
        records = read_metrics(tmp_path)
    assert [(r["split"], r["step"], r["loss"]) for r in records] == [
        ("eval", 4, 0.5), ("train", 1, 1.0), ("train", 2, 2.0), ("train", 3, 3.0),
        ("train", 4, 4.0), ("train", 5, 0.25)]
    MetricWriter(tmp_path, tensorboard=False, resume_step=0).close()
    assert path.read_text() == "[torn]\n"  # every record was past step 0


def test_plot_of_records_without_values_is_a_clear_error(tmp_path, capsys):
    writer = MetricWriter(tmp_path, tensorboard=False)
    writer.write(1, "train", {})
    writer.close()
    code, err = run_cli(capsys, "plot", str(tmp_path))
    assert code == 2 and "records without any metric values; nothing to plot" in err, err


def test_eval_and_generate_of_a_workdir_without_checkpoints_leave_it_as_it_was(tmp_path, capsys):
    (tmp_path / "config.json").write_text(to_json(Config()))
    for command in ("eval", "generate"):
        code, err = run_cli(capsys, command, "--workdir", str(tmp_path))
        assert code == 2 and f"{tmp_path}/checkpoints holds no checkpoint" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # nothing created


def test_plot_output_paths(tmp_path, capsys):
    lines = [{"step": s, "split": "train", "loss": 3.0 - s / 10} for s in range(1, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    (tmp_path / "into").mkdir()
    for out, written in [("into", "into/metrics.png"), ("curves", "curves.png"),
                         ("curves.svg", "curves.svg")]:
        code = main(["plot", str(tmp_path), "--out", str(tmp_path / out)])
        printed = capsys.readouterr().out.strip()
        assert code == 0 and printed == str(tmp_path / written)  # the file actually written
        assert (tmp_path / written).stat().st_size > 0
    # a trailing slash names a directory to create, not "new.png"
    code = main(["plot", str(tmp_path), "--out", str(tmp_path / "new") + "/"])
    assert code == 0 and capsys.readouterr().out.strip() == str(tmp_path / "new/metrics.png")
    code, err = run_cli(capsys, "plot", str(tmp_path), "--out", str(tmp_path / "x.xyz"))
    assert code == 2 and "matplotlib cannot write '.xyz' files" in err
    code, err = run_cli(capsys, "plot", str(tmp_path), "--out", str(tmp_path / "curves.svg/x.png"))
    assert code == 2 and "Not a directory" in err  # a file where a directory should be
    code, err = run_cli(capsys, "plot", str(tmp_path / "missing"))
    assert code == 2 and f"workdir {tmp_path / 'missing'} is not a directory" in err
    # a place no one may write (even root: sysfs) was a 30-line PermissionError traceback
    code, err = run_cli(capsys, "plot", str(tmp_path), "--out", "/sys/jaxsparse-test.png")
    assert code == 2 and "Traceback" not in err and "/sys/jaxsparse-test.png" in err, err
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean file reads without warnings
        assert len(read_metrics(tmp_path)) == 3


@pytest.mark.parametrize("source, fragment", [
    ("from jaxsparse.config import Config\ndef get_config(:\n    return Config()\n",
     "line 2: invalid syntax: 'def get_config(:'"),
    ("X = 1\n", "has no get_config() function"),
    ("def get_config():\n    return {'model': {}}\n", "get_config() returned dict, not a Config"),
])
def test_a_broken_config_file_is_named(tmp_path, capsys, source, fragment):
    path = tmp_path / "mine.py"
    path.write_text(source)
    code, err = run_cli(capsys, "dryrun", "--config", str(path))
    assert code == 2 and err.startswith("jaxsparse dryrun: error: ") and str(path) in err
    assert fragment in err


def test_an_interrupt_outside_training_is_one_line_and_status_130(capsys):
    """Ctrl-C during the end-of-training sample, an eval or a generation (training's own loop
    saves and exits cleanly instead): no KeyboardInterrupt traceback."""
    import argparse

    from jaxsparse.cli import _run

    def interrupted(args):
        raise KeyboardInterrupt

    assert _run(argparse.Namespace(command="generate", func=interrupted)) == 130
    assert capsys.readouterr().err == "jaxsparse generate: interrupted\n"


def test_the_training_sample_is_printed_with_control_bytes_escaped(tmp_path, capsys,
                                                                  monkeypatch):
    """An early model samples ESC, BEL and carriage returns as readily as letters: printed raw,
    they reached the terminal as escape sequences (``jaxsparse generate`` escaped them)."""
    import jaxsparse.train as training
    from jaxsparse.train import TrainResult

    sample = "ok\x1b[2J\x07\r\tend\nline"
    monkeypatch.setattr(training, "train", lambda cfg, workdir: TrainResult(
        step=1, losses={}, eval_metrics={"loss": 1.0}, stopped_early=False, sample=sample))
    assert main(["train", "--workdir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "ok\\x1b[2J\\x07\\r\tend\nline" in out and "\x1b" not in out and "\x07" not in out


def test_a_single_file_corpus_is_said_as_the_commands_own_warning(tmp_path, capsys):
    """Like the other warnings about the user's settings, without a library file and source
    line (it printed as a raw UserWarning from jaxsparse/data/stream.py)."""
    from jaxsparse.cli import _print_config_warnings
    from jaxsparse.data import corpus
    from jaxsparse.errors import CorpusWarning

    (tmp_path / "a.txt").write_text("text")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _print_config_warnings("train")
        corpus.split_files(tmp_path, [tmp_path / "a.txt"], 20)
    err = capsys.readouterr().err
    assert err.startswith("jaxsparse train: warning: the corpus is a single file"), err
    assert "corpus.py" not in err and "stream.py" not in err
    assert issubclass(CorpusWarning, UserWarning)
