"""The training-time budget (``TrainConfig.max_train_seconds``): the projection of a step's cost
against hand-computed values, and a budgeted run against the schedule, moving average and
resume it must give (the learning rate from the linear warm-up / decay formula, the average
from snapshots of the raw weights)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import eeengine.training.loop as loop_module
from eeengine.cli import main
from eeengine.training import train
from eeengine.training.state import state_dir
from eeengine.training.time_budget import (
    TIMED_STEPS,
    WARMUP_STEPS,
    StepTimer,
    describe_cut,
    fit_to_budget,
    padded_tokens,
    steps_within,
)
from tests.conftest import csv_config


def test_padded_tokens_is_rows_times_the_longest_row():
    assert padded_tokens([0, 2], [3, 5, 7]) == 14
    assert padded_tokens([1], [3, 5, 7]) == 5


def test_steps_within_is_the_budget_over_a_step_between_done_and_planned():
    # 1 ms a token, 1,000 tokens a step: a step is 1 s.
    assert steps_within(100.0, 1e-3, 1000.0, total_steps=500, done_steps=12) == 100
    assert steps_within(100.5, 1e-3, 1000.0, total_steps=500, done_steps=12) == 100
    assert steps_within(1e6, 1e-3, 1000.0, total_steps=500, done_steps=12) == 500
    assert steps_within(1.0, 1e-3, 1000.0, total_steps=500, done_steps=12) == 12
    with pytest.raises(ValueError, match="positive budget"):
        steps_within(0.0, 1e-3, 1000.0, total_steps=500, done_steps=12)


def test_step_timer_counts_only_the_timed_steps():
    timer = StepTimer()
    last = WARMUP_STEPS + TIMED_STEPS - 1
    fired = [timer.add(step, seconds=1.0 + step, tokens=10) for step in range(last + 3)]
    assert fired.index(True) == last and fired.count(True) == 1
    assert timer.steps == TIMED_STEPS and timer.tokens == [10] * TIMED_STEPS
    assert timer.seconds == [1.0 + s for s in range(WARMUP_STEPS, last + 1)]
    resumed = StepTimer()  # a run resumed inside the window times what is left of it
    assert [resumed.add(s, 1.0, 10) for s in range(last - 1, last + 1)] == [False, True]
    assert resumed.steps == 2


def test_a_step_costs_the_median_seconds_per_token_of_the_timed_steps():
    """One slow step (a first allocation) does not move the cost, where the ratio of sums
    (12 s over 2,000 tokens, 6 ms) would have."""
    timer = StepTimer(seconds=[1.0, 2.0, 1.1, 8.0, 0.5], tokens=[200, 400, 200, 1000, 100])
    assert timer.seconds_per_token() == pytest.approx(5e-3)  # ratios 5, 5, 5.5, 8, 5 ms


def test_fit_to_budget_projects_the_timed_cost_over_the_epoch():
    timer = StepTimer(seconds=[1.0, 1.0], tokens=[200, 200])  # 5 ms a padded token
    lengths = [10, 20, 30, 40]
    batches = [[0, 1], [2, 3]]  # 40 and 80 padded tokens: 60 a step, 0.3 s
    fit = fit_to_budget(6.0, timer, batches, lengths, total_steps=50, done_steps=12)
    assert fit == {
        "max_train_seconds": 6.0,
        "seconds_per_step": 0.3,
        "planned_steps": 50,
        "steps": 20,
    }
    line = describe_cut(fit, steps_per_epoch=8)
    assert "20 of the 50 planned steps fit the 6 s" in line and "(2.50 epochs)" in line
    whole = fit_to_budget(60.0, timer, batches, lengths, total_steps=50, done_steps=12)
    assert whole["steps"] == 50 and describe_cut(whole, 8).endswith("training them all")


PLANNED, CUT = 24, 18  # 30 training rows in batches of 4 for 3 epochs; the budget keeps 18


def budget_config(tiny_bert_dir, tiny_csv_task, **overrides):
    """Batches of 4 for 3 epochs (24 steps), one evaluation at the end, no contrastive stage."""
    return csv_config(
        tiny_bert_dir,
        tiny_csv_task,
        batch_size=4,
        epochs=3.0,
        lr=1e-4,
        contrastive=False,
        eval_every=1000,
        early_stopping=0,
        **overrides,
    )


def cut_at(steps: int):
    """A fit_to_budget that keeps ``steps``, whatever the clock says."""

    def fit(budget, timer, batches, lengths, total_steps, done_steps):
        assert timer.steps == TIMED_STEPS and done_steps == WARMUP_STEPS + TIMED_STEPS
        return {
            "max_train_seconds": budget,
            "seconds_per_step": 1.0,
            "planned_steps": total_steps,
            "steps": steps,
        }

    return fit


def linear_lr(peak: float, step: int, total: int, warmup_ratio: float = 0.06) -> float:
    """The learning rate of 0-based step ``step`` of a ``total``-step linear warm-up / decay."""
    warmup = round(warmup_ratio * total)
    if step < warmup:
        return peak * step / warmup
    return peak * max(0.0, (total - step) / (total - warmup))


def test_a_cut_run_follows_the_shorter_schedule_and_average(
    tiny_bert_dir, tiny_csv_task, tmp_path, monkeypatch, capsys
):
    """Up to the timed steps the planned 24-step schedule and decay d; from the cut on the
    learning rate of an 18-step schedule at the same step and decay d^(24/18). ``eeengine
    info`` says the run was cut."""
    lrs, raw = [], []
    real_step = loop_module.TrainLoop.train_step

    def spy(loop, batch, labels):
        lrs.append(loop.optimizer.param_groups[0]["lr"])
        loss = real_step(loop, batch, labels)
        raw.append({k: v.detach().clone() for k, v in loop.model.named_parameters()})
        return loss

    monkeypatch.setattr(loop_module.TrainLoop, "train_step", spy)
    monkeypatch.setattr(loop_module, "fit_to_budget", cut_at(CUT))
    config = budget_config(tiny_bert_dir, tiny_csv_task, ema_decay=0.9, max_train_seconds=5.0)
    path = train(config, tmp_path / "cut", progress=True)
    err = capsys.readouterr().err
    assert "at most 5 s of steps (max_train_seconds)" in err  # the plan, before training
    assert "18 of the 24 planned steps fit the 5 s training budget" in err  # the cut

    timed = WARMUP_STEPS + TIMED_STEPS
    assert len(lrs) == CUT
    expected = [linear_lr(1e-4, t, PLANNED if t < timed else CUT) for t in range(CUT)]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-15)
    decay = 0.9 ** (PLANNED / CUT)
    average = raw[0]
    for t, weights in enumerate(raw[1:], start=1):
        d = 0.9 if t < timed else decay
        average = {k: d * average[k] + (1 - d) * weights[k] for k in average}
    saved = load_file(path / "model.safetensors")
    for key, value in average.items():
        torch.testing.assert_close(saved[key], value, rtol=1e-5, atol=1e-6, msg=key)
    training = json.loads((path / "eeengine.json").read_text())["training"]
    assert training["steps"] == CUT
    assert training["schedule"]["time_budget"] == {
        "max_train_seconds": 5.0,
        "seconds_per_step": 1.0,
        "planned_steps": PLANNED,
        "steps": CUT,
        "ema_decay": pytest.approx(decay),
    }
    assert main(["info", str(path)]) == 0
    assert "18 of 24 planned steps (the 5 s time budget)" in capsys.readouterr().out


def test_a_budget_the_run_fits_changes_nothing(tiny_bert_dir, tiny_csv_task, tmp_path):
    """A budget the planned steps fit: the same weights, bit for bit, as no budget."""
    config = budget_config(tiny_bert_dir, tiny_csv_task, ema_decay=0.9)
    plain = train(config, tmp_path / "plain", progress=False)
    config.max_train_seconds = 1e9
    budgeted = train(config, tmp_path / "budget", progress=False)
    expected, actual = (load_file(p / "model.safetensors") for p in (plain, budgeted))
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
    record = json.loads((budgeted / "eeengine.json").read_text())["training"]["schedule"]
    assert record["time_budget"]["steps"] == record["time_budget"]["planned_steps"] == PLANNED
    assert record["time_budget"]["seconds_per_step"] > 0


class Interrupted(Exception):
    pass


def test_a_cut_run_resumes_to_the_same_weights(tiny_bert_dir, tiny_csv_task, tmp_path, monkeypatch):
    """Interrupted after the cut, a resumed run keeps the shorter schedule and average (from
    the saved state, not a new timing) and ends where the uninterrupted cut run ends."""
    monkeypatch.setattr(loop_module, "fit_to_budget", cut_at(CUT))
    config = budget_config(
        tiny_bert_dir, tiny_csv_task, ema_decay=0.9, max_train_seconds=5.0, save_every=2
    )
    reference = train(config, tmp_path / "reference", progress=False)
    out = tmp_path / "resumed"
    real_step = loop_module.TrainLoop.train_step

    def crash(loop, *args):
        if loop.step == 15:
            raise Interrupted
        return real_step(loop, *args)

    monkeypatch.setattr(loop_module.TrainLoop, "train_step", crash)
    with pytest.raises(Interrupted):
        train(config, out, progress=False)
    assert (state_dir(out) / "state.pt").is_file()
    monkeypatch.setattr(loop_module.TrainLoop, "train_step", real_step)
    monkeypatch.setattr(loop_module, "fit_to_budget", cut_at(PLANNED))  # must not be asked
    resumed = train(config, out, progress=False)
    expected, actual = (load_file(p / "model.safetensors") for p in (reference, resumed))
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
    training = json.loads((resumed / "eeengine.json").read_text())["training"]
    assert training["steps"] == CUT and training["schedule"]["time_budget"]["steps"] == CUT


@pytest.mark.parametrize("seconds", [0.0, -5.0, float("nan")])
def test_a_budget_that_is_not_positive_is_refused_before_any_work(
    seconds, tiny_bert_dir, tiny_csv_task, tmp_path
):
    config = budget_config(tiny_bert_dir, tiny_csv_task, max_train_seconds=seconds)
    with pytest.raises(ValueError, match="max_train_seconds must be > 0, got"):
        train(config, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()
