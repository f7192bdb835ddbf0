"""A time budget for the optimizer steps of a run (``TrainConfig.max_train_seconds``).

The first run of ``eeengine predict`` promises a checkpoint within 15 minutes on 2 CPU cores,
but its 1,533 steps of 128 SST-2 rows took 415 s in bf16 on 2 cores with AMX and take about 35
minutes in fp32 on 2 AVX2-only cores (1.2-1.5 s a step; BENCHMARKS.md, "Training step"). So
the trainer times a few steps, projects the cost of a step over the epoch's batches, and where
the planned steps do not fit the budget, ends the run at the last step that does (the
learning-rate schedule and the moving average's decay are rebuilt for the shorter run,
:meth:`eeengine.training.loop.TrainLoop.set_total_steps`). Where the planned steps fit,
nothing changes: the run is the same, step for step, as one without a budget.

A step's time is taken as proportional to its padded tokens (rows x the longest row): batches
are bucketed by length (:func:`eeengine.batching.bucketed_batches`), so steps differ in cost
several-fold, and the timed steps are a random draw of them. The cost of a padded token is the
median over the timed steps, not their total seconds over total tokens: one early step can
take twice its share (on 2 AMX cores the first batch of the longest rows took 2.4 s against
1.1 s for such a batch later), and the ratio of sums, 0.48 s a step projected against 0.30 s
run, cut the first-run recipe to 1,485 of its 1,533 steps where all of them fit. A step also
has a fixed cost (about 60 ms there), so the median step, smaller than the mean, costs a
little more per token: the median projects a few per cent high (0.32 s), on the safe side.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

# Steps before timing starts (allocator and cache warm-up), then steps timed.
WARMUP_STEPS = 2
TIMED_STEPS = 10


def padded_tokens(batch: Sequence[int], lengths: Sequence[int]) -> int:
    """Tokens of ``batch`` (row indices) once right-padded to its longest row."""
    return len(batch) * max(lengths[i] for i in batch)


@dataclass
class StepTimer:
    """Seconds and padded tokens of each timed step (steps ``WARMUP_STEPS`` to
    ``WARMUP_STEPS + TIMED_STEPS - 1``, 0-based)."""

    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    @property
    def steps(self) -> int:
        """Steps timed so far."""
        return len(self.seconds)

    def add(self, step: int, seconds: float, tokens: int) -> bool:
        """Count step ``step`` (0-based; seconds of wall time, padded tokens) if it is a timed
        one; True at the last timed step (a resumed run may have timed fewer)."""
        if WARMUP_STEPS <= step < WARMUP_STEPS + TIMED_STEPS:
            self.seconds.append(seconds)
            self.tokens.append(tokens)
        return step == WARMUP_STEPS + TIMED_STEPS - 1 and self.steps > 0

    def seconds_per_token(self) -> float:
        """The median over the timed steps of seconds per padded token (s)."""
        return statistics.median(s / t for s, t in zip(self.seconds, self.tokens, strict=True))


def steps_within(
    budget_seconds: float,
    seconds_per_token: float,
    tokens_per_step: float,
    total_steps: int,
    done_steps: int,
) -> int:
    """The steps of a run that fit ``budget_seconds`` (s) at ``seconds_per_token`` (s per
    padded token) and ``tokens_per_step`` (mean padded tokens of a step): at most
    ``total_steps`` (the plan), at least ``done_steps`` (already run).

    Raises:
        ValueError: a budget, a cost or a step size that is not positive.
    """
    if budget_seconds <= 0 or seconds_per_token <= 0 or tokens_per_step <= 0:
        raise ValueError(
            "steps_within needs a positive budget, cost and step size, got "
            f"{budget_seconds}, {seconds_per_token}, {tokens_per_step}"
        )
    fits = math.floor(budget_seconds / (seconds_per_token * tokens_per_step))
    return max(done_steps, min(total_steps, fits))


def fit_to_budget(
    budget_seconds: float,
    timer: StepTimer,
    batches: Sequence[Sequence[int]],
    lengths: Sequence[int],
    total_steps: int,
    done_steps: int,
) -> dict:
    """Project the run's cost from ``timer`` over the epoch's ``batches`` (row indices; rows'
    token ``lengths``) and the steps that fit ``budget_seconds``.

    Returns:
        ``{"max_train_seconds", "seconds_per_step" (s, projected mean), "planned_steps",
        "steps"}``: ``steps`` < ``planned_steps`` where the budget cut the run.
    """
    tokens_per_step = sum(padded_tokens(b, lengths) for b in batches) / len(batches)
    seconds_per_token = timer.seconds_per_token()
    steps = steps_within(
        budget_seconds, seconds_per_token, tokens_per_step, total_steps, done_steps
    )
    return {
        "max_train_seconds": budget_seconds,
        "seconds_per_step": round(seconds_per_token * tokens_per_step, 4),
        "planned_steps": total_steps,
        "steps": steps,
    }


def describe_cut(fit: dict, steps_per_epoch: int) -> str:
    """One line for the user on what the budget did to the run."""
    head = (
        f"eeengine train: {fit['seconds_per_step']:.2f} s a step here, so "
        f"{fit['steps']} of the {fit['planned_steps']} planned steps fit the "
        f"{fit['max_train_seconds']:g} s training budget (max_train_seconds)"
    )
    if fit["steps"] == fit["planned_steps"]:
        return head + "; training them all"
    return head + f"; training {fit['steps']} ({fit['steps'] / steps_per_epoch:.2f} epochs)"
