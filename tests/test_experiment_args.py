"""The experiment scripts' command lines and run directories (experiments/): a size of 0 or less
or an unknown name is refused by argparse naming the flag (it crashed late, or silently became
a default, or trained nothing and rewrote the table), and no study resumes a run saved with
other settings (it resumed it and labelled the table with the new ones).

Nothing here trains: ``train`` (and every other entry point that would do work) is replaced by
a stand-in that saves the run's config as ``train`` does and stops, so each test takes
seconds."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import ROOT
from jaxsparse.config import to_json
from jaxsparse.train.loop import with_absolute_paths

EXPERIMENTS = ROOT / "experiments"


class Trained(Exception):
    """Raised by :func:`fake_train`: the script got as far as training ``args[0]``."""


def fake_train(cfg, workdir, **kwargs):
    """Save the run's config where ``train`` saves it, then stop."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(to_json(with_absolute_paths(cfg)))
    raise Trained(str(workdir))


def must_not_run(*args, **kwargs):
    raise AssertionError("the script went on with a bad argument instead of refusing it")


@pytest.fixture
def load(monkeypatch):
    """``load(name, path)``: import ``experiments/<path>`` as module ``name`` (registered in
    ``sys.modules``, and ``sys.path`` restored, for this test only)."""
    monkeypatch.setattr(sys, "path", list(sys.path))

    def load(name: str, path: str):
        spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / path)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def ssm(load, monkeypatch):
    """``(study, mqar, selective_copying)`` of experiments/ssm, with ``train`` faked."""
    study = load("study", "ssm/study.py")  # the task scripts import it as ``study``
    monkeypatch.setattr(study, "train", fake_train)
    return study, load("ssm_mqar", "ssm/mqar.py"), load("ssm_selective_copying",
                                                          "ssm/selective_copying.py")


def assert_refused(main, argv, capsys, *expected: str) -> None:
    """``main(argv)`` stops in argparse (exit 2) with every ``expected`` text on stderr."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err


def assert_other_settings_refused(main, argv, workdir: Path, *changes: str) -> None:
    """``main(argv)`` stops before training, naming ``workdir`` and each ``changes`` key."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    message = str(stop.value.code)
    assert f"{workdir} holds a run trained with other settings" in message, message
    assert "another --out" in message and f"delete {workdir}" in message, message
    for change in changes:
        assert change in message, message


# --- 1. a run directory holding a run with other settings is refused ---------------------------


def test_ssm_studies_refuse_other_settings_before_training_anything(ssm, tmp_path):
    _, mqar, selective_copying = ssm
    out = str(tmp_path / "mqar")
    small = ["--widths", "64", "--out", out]
    with pytest.raises(Trained):
        mqar.main(["--steps", "4", "--models", "mamba"] + small)
    # The transformer would train first; the saved mamba run (4 steps) is refused before it.
    assert_other_settings_refused(
        mqar.main, ["--steps", "5", "--models", "transformer", "mamba"] + small,
        tmp_path / "mqar" / "runs" / "Mamba d64", "train.steps: 4 -> 5")
    assert not (tmp_path / "mqar" / "runs" / "Transformer d64").exists()
    with pytest.raises(Trained, match="Mamba d64"):  # the same settings: read back / resumed
        mqar.main(["--steps", "4", "--models", "mamba"] + small)

    out = str(tmp_path / "copy")
    with pytest.raises(Trained):
        selective_copying.main(["--models", "mamba", "--out", out])
    assert_other_settings_refused(
        selective_copying.main, ["--models", "mamba", "--lr", "4e-3", "--out", out],
        tmp_path / "copy" / "runs" / "Mamba (2 layers, d64, N16)", "optimizer.lr: 0.002 -> 0.004")


def test_hydra_study_refuses_other_settings_unless_fresh(load, monkeypatch, tmp_path):
    study = load("hydra_study", "hydra/study.py")
    monkeypatch.setattr(study, "train", fake_train)

    def variants(lr):
        return {"v": study.SMALL_TRANSFORMER + study.synthetic(
            "mqar", 32, 4, "data.num_kv_pairs=4", f"optimizer.lr={lr}", vocab=16)}

    with pytest.raises(Trained):
        study.run_variants("s", variants("3e-3"), "accuracy", tmp_path)
    with pytest.raises(SystemExit) as stop:
        study.run_variants("s", variants("1e-5"), "accuracy", tmp_path)
    message = str(stop.value.code)
    assert f"{tmp_path / 's' / 'v'} holds a run trained with other settings" in message
    assert "optimizer.lr: 0.003 -> 1e-05" in message and "--fresh" in message
    with pytest.raises(Trained):  # the same settings (not finished): resumed
        study.run_variants("s", variants("3e-3"), "accuracy", tmp_path)
    with pytest.raises(Trained):  # --fresh retrains with the new ones
        study.run_variants("s", variants("1e-5"), "accuracy", tmp_path, fresh=True)


def test_moe_and_monarch_studies_refuse_other_settings(load, monkeypatch, tmp_path):
    for name, path, first in (("moe_study", "moe/study.py", "transformer_tiny"),
                              ("monarch_study", "monarch/study.py", "dense")):
        study = load(name, path)
        monkeypatch.setattr(study, "train", fake_train)
        out = tmp_path / name
        with pytest.raises(Trained, match=first):
            study.main(["--steps", "4", "--out", str(out)])
        assert_other_settings_refused(study.main, ["--steps", "6", "--out", str(out)],
                                      out / "runs" / first, "train.steps: 4 -> 6")
        with pytest.raises(Trained, match=first):
            study.main(["--steps", "4", "--out", str(out)])


def test_routing_study_refuses_other_settings_with_the_shared_helper(load, monkeypatch,
                                                                     tmp_path):
    study = load("routing_study", "routing/study.py")
    monkeypatch.setattr(study, "train", fake_train)
    argv = ["--task", "mqar", "--only", "full", "--out", str(tmp_path)]
    with pytest.raises(Trained):
        study.main(argv + ["--steps", "4"])
    assert_other_settings_refused(study.main, argv + ["--steps", "5"],
                                  tmp_path / "runs" / "full", "train.steps: 4 -> 5")


# --- 3-7. bad arguments are refused by argparse, naming the flag -------------------------------


@pytest.mark.parametrize("argv, expected", [
    (["--only", "rout,ful"], ["--only", "unknown variant(s) 'rout', 'ful'",
                              "full, local, routing"]),
    (["--only", ","], ["--only", "names no variant"]),
    (["--answer-batches", "-1"], ["--answer-batches", "-1 must be >= 0"]),
    (["--window", "0"], ["--window", "0 must be >= 1"]),
    (["--seq-len", "0"], ["--seq-len", "0 must be >= 1"]),
])
def test_routing_study_refuses_bad_arguments(load, monkeypatch, capsys, tmp_path, argv,
                                             expected):
    study = load("routing_study", "routing/study.py")
    monkeypatch.setattr(study, "train", must_not_run)
    monkeypatch.setattr(study, "write_results", must_not_run)  # --only trained nothing
    assert_refused(study.main, ["--task", "mqar", "--out", str(tmp_path)] + argv, capsys,
                   *expected)


def test_routing_study_only_and_window_pass_valid_values_through(load, monkeypatch, tmp_path):
    study = load("routing_study", "routing/study.py")
    monkeypatch.setattr(study, "train", fake_train)
    with pytest.raises(Trained, match="routing_separate_qk.*_probes4_window8"):
        study.main(["--task", "mqar", "--steps", "4", "--only", "routing", "--separate-qk",
                    "--probes", "4", "--window", "8", "--out", str(tmp_path)])
    assert study.variant_names(" local,full ") == ("local", "full")


def test_routing_probe_refuses_zero_batches(load, monkeypatch, capsys, tmp_path):
    probe = load("routing_probe", "routing/probe.py")
    monkeypatch.setattr(probe, "probe", must_not_run)
    assert_refused(probe.main, [str(tmp_path), "--batches", "0"], capsys, "--batches",
                   "0 must be >= 1")
    assert_refused(probe.main, [str(tmp_path), "--probes", "0"], capsys, "--probes")


@pytest.mark.parametrize("argv, expected", [
    (["pkm", "--steps", "0"], ["--steps", "0 must be >= 1"]),
    (["routing", "--steps", "-3"], ["--steps", "-3 must be >= 1"]),
    (["pkm", "--seq-len", "0"], ["--seq-len", "0 must be >= 1"]),
    (["throughput", "--lengths", "0"], ["--lengths", "'0': item 0 must be >= 1"]),
    (["throughput", "--lengths", "1024,x"], ["--lengths", "'x' is not an integer"]),
    (["throughput", "--repeats", "0"], ["--repeats", "0 must be >= 1"]),
    # a repeated seed was read back and reported as a spread of 0; a negative one failed
    # only when its turn came, after the earlier seeds had trained
    (["pkm", "--seeds", "0", "0"], ["--seeds", "0 0 repeats a seed"]),
    (["ablations", "--seeds", "0", "-1"], ["--seeds", "-1 must be >= 0"]),
    (["composition", "--seeds", str(2 ** 32)], ["--seeds", "must be < 2**32"]),
])
def test_hydra_study_refuses_bad_sizes(load, monkeypatch, capsys, tmp_path, argv, expected):
    study = load("hydra_study", "hydra/study.py")
    for name in list(study.STUDIES):
        monkeypatch.setitem(study.STUDIES, name, must_not_run)
    assert_refused(study.main, argv + ["--out", str(tmp_path)], capsys, *expected)


def test_hydra_study_parses_lengths_and_keeps_an_explicit_seq_len(load, monkeypatch, tmp_path):
    study = load("hydra_study", "hydra/study.py")
    seen = {}
    monkeypatch.setitem(study.STUDIES, "throughput", lambda args, out: seen.update(vars(args)))
    study.main(["throughput", "--lengths", "1024, 2048", "--out", str(tmp_path)])
    assert seen["lengths"] == [1024, 2048] and seen["seq_len"] is None
    study.main(["throughput", "--out", str(tmp_path)])
    assert seen["lengths"] == [1024, 2048, 4096, 8192]


@pytest.mark.parametrize("argv, expected", [
    (["--rounds", "0"], ["--rounds", "0 must be >= 1"]),
    (["--rounds", "-1"], ["--rounds", "-1 must be >= 1"]),
    (["--minutes", "0"], ["--minutes", "must be a finite number > 0"]),
    (["--minutes", "-2"], ["--minutes", "-2 must be a finite number > 0"]),
    (["--minutes", "nan"], ["--minutes", "must be a finite number > 0"]),
    # both runs went to one workdir, the second deleting the first, the means mixing them
    (["--configs", "hydra_tiny,hydra_tiny"], ["--configs", "names one config twice"]),
])
def test_hydra_default_vs_dense_refuses_bad_rounds_and_minutes(load, monkeypatch, capsys,
                                                               tmp_path, argv, expected):
    load("study", "hydra/study.py")  # what the script imports step_timing from
    script = load("default_vs_dense", "hydra/default_vs_dense.py")
    monkeypatch.setattr(script, "run_one", must_not_run)
    monkeypatch.setattr(script, "write_results", must_not_run)
    assert_refused(script.main, argv + ["--out", str(tmp_path)], capsys, *expected)


def test_ssm_studies_refuse_unknown_model_names(ssm, monkeypatch, capsys, tmp_path):
    study, mqar, selective_copying = ssm
    monkeypatch.setattr(study, "train", must_not_run)
    assert_refused(mqar.main, ["--models", "mamba", "mamba3", "--out", str(tmp_path)], capsys,
                   "--models", "invalid choice: 'mamba3'")
    assert_refused(selective_copying.main, ["--models", "transformr", "--out", str(tmp_path)],
                   capsys, "--models", "invalid choice: 'transformr'")


def test_the_monarch_study_refuses_a_conversion_of_an_earlier_dense_run(load, tmp_path):
    """The conversion run names the dense run's directory, not its weights: after the dense run
    was deleted and retrained (another --steps), the old conversion was read back as finished
    and the notes mixed the two models' scores."""
    import os

    study = load("monarch_study", "monarch/study.py")
    dense, converted = tmp_path / "dense", tmp_path / "dense_to_monarch"
    study.refuse_a_stale_conversion(dense, converted)  # nothing converted yet: fine
    converted.mkdir()
    (converted / "config.json").write_text("{}")
    for retrained in (False, True):  # the dense run gone, then retrained after the conversion
        if retrained:
            dense.mkdir()
            (dense / "config.json").write_text("{}")
            os.utime(converted / "config.json", (1, 1))
        with pytest.raises(SystemExit, match=f"{converted} was converted from an earlier dense "
                                             "run"):
            study.refuse_a_stale_conversion(dense, converted)
    os.utime(dense / "config.json", (0, 0))  # converted from this dense run: read back
    study.refuse_a_stale_conversion(dense, converted)


def test_the_moe_study_counts_active_parameters_at_the_k_a_row_is_scored_at(load):
    """SMoE-Dropout trains k from 2 to every expert and is scored at the end of the schedule:
    all its parameters are active there (the table counted them at k=2, beside the dense
    row's, as if the two used the same compute)."""
    from jaxsparse import configs
    from jaxsparse.config import apply_overrides
    from jaxsparse.models import count_params

    study = load("moe_study", "moe/study.py")
    cfg = apply_overrides(configs.get("moe_tiny"), ["model.moe_experts=4", "model.moe_every=1",
                                                    "model.moe_k=2", "model.moe_k_end=4"])
    assert study.active_params(cfg) == count_params(cfg.model)
    fixed = apply_overrides(cfg, ["model.moe_k_end=null"])
    assert study.active_params(fixed) < count_params(cfg.model)


def test_an_ssm_study_call_on_a_subset_keeps_the_other_runs_rows(ssm, monkeypatch, tmp_path,
                                                                    capsys):
    """``--models mamba`` and then ``--models transformer`` make one table of both (the second
    call rewrote it with the transformer's row alone); a row trained on other shared settings
    (another ``--steps``) is dropped and named, not mixed in."""
    study, mqar, _ = ssm

    def finished_train(cfg, workdir, **kwargs):
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(to_json(with_absolute_paths(cfg)))
        accuracy = {"transformer": 0.9, "mamba": 0.5, "mamba2": 0.7}[cfg.model.name]
        record = {"split": "eval", "step": cfg.train.steps, "accuracy": accuracy, "loss": 1.0}
        (workdir / "metrics.jsonl").write_text(json.dumps(record) + "\n")
        return SimpleNamespace(step=cfg.train.steps, eval_metrics=record)

    monkeypatch.setattr(study, "train", finished_train)
    out = tmp_path / "mqar"
    common = ["--widths", "64", "--out", str(out)]

    def table():
        return {row["model"]: (row["steps"], row["eval_accuracy"])
                for row in json.loads((out / "mqar.json").read_text())["rows"]}

    mqar.main(["--steps", "4", "--models", "mamba"] + common)
    mqar.main(["--steps", "4", "--models", "transformer"] + common)
    assert table() == {"Mamba d64": (4, 0.5), "Transformer d64": (4, 0.9)}
    capsys.readouterr()
    mqar.main(["--steps", "5", "--models", "mamba2"] + common)
    assert table() == {"Mamba-2 d64": (5, 0.7)}
    assert "not kept from the earlier mqar table" in capsys.readouterr().out


def test_the_scaling_table_writes_into_its_out_directory(load, monkeypatch, tmp_path):
    """``--out`` is a directory, as every other script's: it was a file stem, so ``--out DIR/``
    wrote ``DIR.json`` beside a directory that was never made."""
    table = load("scaling_table", "scale/scaling_table.py")
    size = {"16 GB": True, "95 GB": True}

    def fake_dry_run(model, devices, preset, mesh, depths):
        return {"model": model, "devices": devices, "preset": preset, "mesh": mesh,
                "state_bytes": 1, "total_bytes": 2, "total_bytes_remat": 2,
                "flops_per_device": 3, "collective_bytes": {}, "fits": size, "fits_remat": size}

    monkeypatch.setattr(table, "one", fake_dry_run)
    out = tmp_path / "tables"
    table.main(["--models", "mqar_tiny", "--sizes", "1", "--presets", "data", "--out", f"{out}/"])
    assert sorted(p.name for p in out.iterdir()) == ["scaling.json", "scaling.md"]
    assert [p.name for p in tmp_path.iterdir()] == ["tables"]
