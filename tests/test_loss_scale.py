"""float16's dynamic loss scale: an overflow halves the scale and skips the update without
counting as a non-finite step; a run of applied steps doubles it; a resumed run continues with
the scale its checkpoint holds."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse.train.loss_scale as loss_scale
from jaxsparse.train import train

from helpers import tiny_config


def scale_state(scale, good=0):
    return {"scale": jnp.asarray(scale, jnp.float32), "good_steps": jnp.asarray(good, jnp.int32)}


def step_rule(state, overflow, applied):
    new = loss_scale.next_loss_scale(state, jnp.asarray(overflow), jnp.asarray(applied))
    return float(new["scale"]), int(new["good_steps"])


def test_the_scale_halves_on_overflow_doubles_after_a_period_and_is_bounded():
    period = loss_scale.PERIOD
    assert step_rule(scale_state(8.0, 5), True, False) == (4.0, 0)
    assert step_rule(scale_state(8.0, 5), False, True) == (8.0, 6)
    assert step_rule(scale_state(8.0, period - 1), False, True) == (16.0, 0)
    # a step skipped for a non-finite loss is not the scale's: nothing changes
    assert step_rule(scale_state(8.0, 5), False, False) == (8.0, 5)
    assert step_rule(scale_state(loss_scale.MAX_SCALE, period - 1), False, True) == \
        (loss_scale.MAX_SCALE, 0)
    # at the smallest scale a non-finite gradient is no overflow: train.nonfinite decides
    at_min = scale_state(loss_scale.MIN_SCALE)
    assert not bool(loss_scale.is_overflow(at_min, jnp.asarray(True), jnp.asarray(False)))
    assert bool(loss_scale.is_overflow(scale_state(2.0), jnp.asarray(True), jnp.asarray(False)))
    assert not bool(loss_scale.is_overflow(scale_state(2.0), jnp.asarray(False),
                                           jnp.asarray(False)))


def float16_config(steps):
    return tiny_config("model.dtype=float16", f"train.steps={steps}",
                       "train.checkpoint_every=100")


def train_records(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


def test_overflowing_steps_lower_the_scale_and_are_not_non_finite_steps(tmp_path, monkeypatch):
    # 2^20 overflows float16's cotangents (65504) here (2^16 does not): the first steps must halve it until
    # the gradients fit, and the run (train.nonfinite=stop) must go on
    monkeypatch.setattr(loss_scale, "INITIAL_SCALE", 2.0 ** 20)
    monkeypatch.setattr(loss_scale, "PERIOD", 3)
    result = train(float16_config(14), tmp_path, sample=False, quiet=True)
    records = train_records(tmp_path)
    scales = [r["loss_scale"] for r in records]
    overflowed = [r["scale_overflow"] for r in records]
    assert scales[0] == 2.0 ** 20 and overflowed[0] == 1.0
    first_applied = overflowed.index(0.0)
    assert 0 < first_applied < 10, overflowed
    # halved at every overflow, then doubled after each PERIOD applied steps in a row
    for before, after, over in zip(scales, scales[1:], overflowed):
        assert after in (before / 2, before, before * 2)
        assert (after == before / 2) == bool(over)
    assert any(after == 2 * before for before, after in zip(scales, scales[1:]))
    assert all(r["nonfinite"] == 0.0 for r in records) and not result.skipped_steps
    assert records[-1]["skipped_steps"] == sum(overflowed)
    assert np.isfinite(result.eval_metrics["loss"])


def test_the_scale_of_a_resumed_float16_run_is_the_checkpoint_s(tmp_path, monkeypatch):
    monkeypatch.setattr(loss_scale, "INITIAL_SCALE", 2.0 ** 20)
    cfg = float16_config(10)
    straight = train(cfg, tmp_path / "straight", sample=False, quiet=True)
    first = train(cfg, tmp_path / "resumed", should_stop=lambda step: step == 3, sample=False,
                  quiet=True)
    assert first.stopped_early and float(first.state["loss_scale"]["scale"]) < 2.0 ** 20
    second = train(cfg, tmp_path / "resumed", sample=False, quiet=True)
    assert first.losses | second.losses == straight.losses
    assert [r["loss_scale"] for r in train_records(tmp_path / "resumed")] == \
        [r["loss_scale"] for r in train_records(tmp_path / "straight")]
    np.testing.assert_array_equal(np.asarray(second.state["loss_scale"]["scale"]),
                                  np.asarray(straight.state["loss_scale"]["scale"]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_only_float16_runs_carry_a_loss_scale(tmp_path, dtype):
    result = train(tiny_config(f"model.dtype={dtype}", "train.steps=1"), tmp_path, sample=False,
                   quiet=True)
    assert "loss_scale" not in result.state
    assert "loss_scale" not in train_records(tmp_path)[0]
    assert jax.tree.leaves(result.state["params"])


@pytest.mark.parametrize("before, after", [("float32", "float16"), ("float16", "float32")])
def test_a_resume_may_switch_to_or_from_float16(tmp_path, before, after):
    """model.dtype only chooses how the model is computed, and may change on a resume; the
    float16 state's loss scale then starts afresh, or is dropped."""
    train(tiny_config(f"model.dtype={before}", "train.steps=2"), tmp_path, sample=False,
          quiet=True)
    resumed = train(tiny_config(f"model.dtype={after}", "train.steps=4"), tmp_path,
                    sample=False, quiet=True)
    assert resumed.step == 4 and sorted(resumed.losses) == [2, 3]
    if after == "float16":
        assert float(resumed.state["loss_scale"]["scale"]) == loss_scale.INITIAL_SCALE
    else:
        assert "loss_scale" not in resumed.state
    assert np.isfinite(resumed.eval_metrics["loss"])
