"""experiments/hydra/study.py: several seeds per variant, and finished runs read back."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("hydra_study", ROOT / "experiments/hydra/study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_variants(study, steps: int) -> dict[str, list[str]]:
    """The study machinery on the smallest model that compiles fast (a 1-layer Transformer)."""
    task = study.synthetic("mqar", 32, steps, "data.num_kv_pairs=4", vocab=16)
    small = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=2",
             "model.d_ff=64"]
    return {"tiny model": study.SMALL_TRANSFORMER + small + task}


def test_seeds_give_one_row_with_each_seed_mean_and_std_and_finished_runs_are_read_back(
        study, tmp_path, monkeypatch):
    rows, curves = study.run_variants("check", tiny_variants(study, 4), "accuracy", tmp_path,
                                      seeds=(0, 3))
    (row,) = rows
    assert (tmp_path / "check/tiny_model").is_dir() and (tmp_path / "check/tiny_model_seed3").is_dir()
    saved = json.loads((tmp_path / "check/tiny_model_seed3/config.json").read_text())
    assert saved["train"]["seed"] == 3 and saved["data"]["seed"] == 3
    per_seed = [row["seed 0"], row["seed 3"]]
    assert row["accuracy"] == pytest.approx(np.mean(per_seed))
    assert row["std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert row["minutes"] > 0 and row["steps"] == 4
    assert [s for s, _ in curves["tiny model"]] == sorted({s for s, _ in curves["tiny model"]})
    assert list(row) == study.table_columns((0, 3), "accuracy")

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run with the same config was retrained")

    monkeypatch.setattr(study, "train", must_not_train)
    again, _ = study.run_variants("check", tiny_variants(study, 4), "accuracy", tmp_path,
                                  seeds=(0, 3))
    assert again[0]["seed 3"] == row["seed 3"] and again[0]["minutes"] == 0
    # Another config (more steps) in the same directory is refused before anything trains
    # (it was resumed on the new settings and labelled with them); --fresh trains again.
    with pytest.raises(SystemExit, match=r"(?s)tiny_model holds a run trained with other "
                                         r"settings.*train.steps: 4 -> 5.*--fresh"):
        study.run_variants("check", tiny_variants(study, 5), "accuracy", tmp_path, seeds=(0,))
    with pytest.raises(AssertionError, match="retrained"):
        study.run_variants("check", tiny_variants(study, 4), "accuracy", tmp_path, seeds=(3,),
                           fresh=True)


def test_eval_note_counts_answers_and_names_the_seeds(study):
    note = study.eval_note(16 * study.BATCH, [0, 1, 2])
    assert f"{16 * study.BATCH * study.EVAL_BATCHES} answers" in note
    assert "mean of 3 seeds (0, 1, 2" in note
    assert "seed 5." in study.eval_note(4, [5])


def test_routing_study_measures_expert_usage_on_validation_text(study):
    """The routing study's held-out batch is validation-split text (it was drawn with
    ``stream.batch`` at a far-off step: training text), and mixed_batch reverses the second
    half of the rows of the batch it gets and labels their domain."""
    from jaxsparse import configs
    from jaxsparse.config import apply_overrides
    from jaxsparse.data import make_stream

    stream = make_stream(apply_overrides(configs.get("hydra_tiny"), ["data.batch_size=4"]))
    batch, domain = study.held_out_batch(stream)
    valid = np.asarray(stream.valid).tobytes()
    python = batch["inputs"][domain == 0].astype(np.uint8)
    assert len(python) == 2 and all(row.tobytes() in valid for row in python)

    seq = np.arange(4 * 6, dtype=np.int32).reshape(4, 6)
    batch = {"inputs": seq[:, :-1], "targets": seq[:, 1:]}
    mixed, domain = study.mixed_batch(batch)
    assert domain.tolist() == [0, 0, 1, 1]
    np.testing.assert_array_equal(mixed["inputs"][:2], seq[:2, :-1])
    np.testing.assert_array_equal(mixed["inputs"][2:], seq[2:, ::-1][:, :-1])
    np.testing.assert_array_equal(mixed["targets"][2:], seq[2:, ::-1][:, 1:])
