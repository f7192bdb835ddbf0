"""The optimizer loop of :func:`eeengine.training.train`: which parameters train and with what
learning rate (AdamW groups, frozen parameters, fused AdamW), bf16 autocast where it is faster,
the evaluation of every exit on a split, and :class:`TrainLoop`, the steps of a run with the
state a resumed run needs to continue exactly.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from eeengine.batching import Encoded, bucketed_batches
from eeengine.cpu_flags import cpu_has_amx_bf16
from eeengine.data import Split
from eeengine.evaluation import all_exit_outputs, exit_metrics
from eeengine.modeling_multiexit import MultiExitBert
from eeengine.token_pruning import TokenPruning
from eeengine.training.config import TrainConfig
from eeengine.training.recipes import Recipe
from eeengine.training.time_budget import StepTimer, fit_to_budget

# Parameters trained at head_lr (everything else but the recipe's own is the backbone).
HEAD_PREFIXES = ("exit_heads.", "exit_pooler.", "lte.")
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight")


def frozen_parameters(model: MultiExitBert, config: TrainConfig) -> set[str]:
    """Names of the parameters no stage trains: the word embeddings with
    ``freeze_word_embeddings``, else none."""
    if not config.freeze_word_embeddings:
        return set()
    table = model.backbone.embeddings.word_embeddings.weight
    return {name for name, param in model.named_parameters() if param is table}


def param_groups(
    model: MultiExitBert, recipe: Recipe, config: TrainConfig, lr: float
) -> list[dict]:
    """AdamW groups: backbone with and without weight decay (``lr``), exit heads and LTE
    (head_lr), the recipe's own parameters (its lr, else head_lr; no weight decay); frozen
    parameters (:func:`frozen_parameters`) in none."""
    groups = [
        {"params": [], "lr": lr, "weight_decay": config.weight_decay},
        {"params": [], "lr": lr, "weight_decay": 0.0},
        {"params": [], "lr": config.head_lr, "weight_decay": config.weight_decay},
    ]
    frozen = frozen_parameters(model, config)
    for name, param in model.named_parameters():
        if name in frozen:
            continue
        group = 2 if name.startswith(HEAD_PREFIXES) else int(name.endswith(NO_DECAY))
        groups[group]["params"].append(param)
    own = list(recipe.parameters())
    if own:
        groups.append({"params": own, "lr": recipe.lr or config.head_lr, "weight_decay": 0.0})
    return groups


def adamw(groups: list[dict]) -> torch.optim.AdamW:
    """AdamW with torch's fused implementation (one kernel over all parameters; the default
    per-parameter loop took 44 % of a MiniLM step on SST-2 batches on 2 CPU cores, fused
    22 %: ``benchmarks/train_step.py``), the per-parameter loop where fusing is not
    supported."""
    try:
        return torch.optim.AdamW(groups, fused=True)
    except RuntimeError:
        return torch.optim.AdamW(groups)


def uses_bf16(device: torch.device, mixed_precision: bool) -> bool:
    """bf16 autocast runs on a CUDA device that supports it and on CPUs with AMX (AMX-BF16
    tiles). Not on AVX-512 BF16 alone: there a MiniLM training step (batch 32, 48 tokens, one
    thread) measured 0.69x the speed of fp32 here, so those CPUs train in fp32."""
    if not mixed_precision:
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_amx_bf16()


@dataclass
class Evaluation:
    step: int
    per_exit: list[float]
    logits: torch.Tensor
    signals: dict[str, torch.Tensor]

    @property
    def score(self) -> float:
        """Mean dev metric over the exits: every exit matters to the early-exit trade-off."""
        return sum(self.per_exit) / len(self.per_exit)


def evaluate_exits(
    model: MultiExitBert,
    tokenizer: PreTrainedTokenizerBase,
    split: Split,
    metric: str,
    max_length: int,
    step: int,
    progress: bool,
    token_pruning: TokenPruning | None,
) -> Evaluation:
    """Every exit on ``split`` (logits, signals and the metric per exit); leaves the model
    training."""
    logits, signals = all_exit_outputs(
        model,
        tokenizer,
        split.texts,
        split.text_pairs,
        max_length,
        progress=progress,
        token_pruning=token_pruning,
    )
    model.train()
    return Evaluation(step, exit_metrics(logits, split.labels, metric), logits, signals)


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


class TrainLoop:
    """The optimizer steps of a run and everything a resumed run must get back exactly."""

    def __init__(
        self,
        config: TrainConfig,
        model: MultiExitBert,
        recipe: Recipe,
        optimizer: torch.optim.Optimizer,
        rng: random.Random,
        total_steps: int,
        token_pruning: TokenPruning | None,
    ) -> None:
        self.config, self.model, self.recipe = config, model, recipe
        self.token_pruning = token_pruning
        self.optimizer, self.rng = optimizer, rng
        self.step = 0
        self.planned_steps = total_steps
        self.batches: list[list[int]] = []
        self.position = 0
        self.stage: int | None = None
        self.best: Evaluation | None = None
        self.stale = 0  # evaluations since the best one
        self.best_model: dict | None = None
        self.best_recipe: dict | None = None
        self.ema = None
        if config.ema_decay is not None:
            self.ema = AveragedModel(model)
        self.device = next(model.parameters()).device
        self.bf16 = uses_bf16(self.device, config.mixed_precision)
        self.frozen = frozen_parameters(model, config)
        self.set_total_steps(total_steps)

    def set_total_steps(self, total_steps: int) -> None:
        """Run ``total_steps`` optimizer steps: linear warm-up over ``warmup_ratio`` of them,
        then linear decay to 0. Called again (a time budget shortened the run), the schedule
        is rebuilt for the new length and goes on from this step, and the moving average's
        decay is raised to the power planned / ``total_steps``: its horizon, 1 / (1 - decay)
        steps, stays the same share of the run (``ema_decay`` 0.998 averages about the last
        500 of 1,533 planned steps; cut to 453 steps, 0.9932 the last 148), so the start
        weights keep the weight they had in the planned run (0.998^1533 = 5 %, not
        0.998^453 = 40 %)."""
        self.total_steps = total_steps
        if self.ema is not None:
            self.ema.multi_avg_fn = get_ema_multi_avg_fn(self.ema_decay)
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer,
            round(self.config.warmup_ratio * total_steps),
            total_steps,
            last_epoch=self.step - 1,
        )

    def fit_to_budget(self, seconds: float, timer: StepTimer, lengths: Sequence[int]) -> dict:
        """Apply a time budget of ``seconds`` after the timed steps: project the cost of this
        epoch's batches (rows' token ``lengths``) from ``timer`` and shorten the run where the
        planned steps do not fit (:func:`eeengine.training.time_budget.fit_to_budget`).

        Returns:
            The fit, with the shortened run's ``ema_decay`` where it was cut.
        """
        fit = fit_to_budget(seconds, timer, self.batches, lengths, self.total_steps, self.step)
        if fit["steps"] < self.total_steps:
            self.set_total_steps(fit["steps"])
            fit["ema_decay"] = self.ema_decay
        return fit

    @property
    def ema_decay(self) -> float | None:
        """The moving average's decay for this run's length (see :meth:`set_total_steps`)."""
        if self.config.ema_decay is None:
            return None
        return self.config.ema_decay ** (self.planned_steps / self.total_steps)

    def next_batch(self, encoded: Encoded) -> list[int]:
        """The next batch's indices; a new epoch's batch order when the last one is used up."""
        if self.position == len(self.batches):
            self.batches = bucketed_batches(encoded.lengths, self.config.batch_size, self.rng)
            self.position = 0
        self.position += 1
        return self.batches[self.position - 1]

    def train_step(self, batch: tuple[torch.Tensor, ...], labels: torch.Tensor) -> float:
        """One optimizer step of the recipe's loss; returns the loss."""
        stage = self.recipe.stage(self.step, self.total_steps)
        if stage != self.stage:
            for name, param in self.model.named_parameters():
                param.requires_grad_(name not in self.frozen and self.recipe.trains(name, stage))
            self.stage = stage
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        with autocast:
            all_logits, signals = self.model.exits(*batch, self.token_pruning)
        loss = self.recipe.loss(self.step, stage, all_logits.float(), labels, signals)
        loss.backward()
        params = [*self.model.parameters(), *self.recipe.parameters()]
        torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.step += 1
        return loss.item()

    @property
    def weights(self) -> MultiExitBert:
        """The model that is evaluated, selected and saved: the moving average of the weights
        with ``ema_decay``, else the trained model itself."""
        return self.model if self.ema is None else self.ema.module

    def offer(self, evaluation: Evaluation) -> Evaluation:
        """Keep ``evaluation`` and the current weights if they beat the best so far; return
        the best. Ties go to the later step."""
        if self.best is None or evaluation.score >= self.best.score:
            self.best, self.stale = evaluation, 0
            self.best_model, self.best_recipe = _cpu_state(self.weights), _cpu_state(self.recipe)
        else:
            self.stale += 1
        return self.best

    def load_best(self) -> None:
        """Put the kept weights into the model and the recipe, where the live ones are not
        them: an earlier step's, or the moving average's with ``ema_decay``."""
        if self.best.step != self.step or self.ema is not None:
            self.model.load_state_dict(self.best_model)
            self.recipe.load_state_dict(self.best_recipe)

    def state(self) -> dict:
        """What :meth:`restore` needs to continue exactly from this step."""
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "batches": self.batches,
            "position": self.position,
            "rng": self.rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "model": self.model.state_dict(),
            "recipe": self.recipe.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "best": self.best,
            "stale": self.stale,
            "best_model": self.best_model,
            "best_recipe": self.best_recipe,
        }

    def restore(self, state: dict) -> None:
        self.step, self.batches, self.position = state["step"], state["batches"], state["position"]
        self.rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.model.load_state_dict(state["model"])
        self.recipe.load_state_dict(state["recipe"])
        if state["total_steps"] != self.total_steps:
            self.set_total_steps(state["total_steps"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.best, self.stale = state["best"], state["stale"]
        self.best_model, self.best_recipe = state["best_model"], state["best_recipe"]
