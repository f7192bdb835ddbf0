"""Fine-tune a multi-exit encoder with a recipe and save an eeengine checkpoint.

Data: a GLUE task of ``data/`` by name, or the user's CSV / TSV / JSONL files
(:func:`eeengine.data.file_dataset`). Backbone: any Hugging Face BERT, RoBERTa or ALBERT
directory. Recipe: see :mod:`eeengine.training.recipes`; it decides the loss of every step,
which parameters train in which stage, and its own parameters (own AdamW group).

The loop: AdamW with linear warm-up and decay, length-bucketed batches (sorted within random
pools of batches, batch order shuffled), a fixed seed, gradient clipping, bf16 autocast on
CUDA (fp32 on CPU), a tqdm bar with loss and throughput. Every ``save_every`` steps the
training state is saved atomically next to the output (:mod:`eeengine.training.state`); a
rerun with the same config resumes from it and ends exactly where an uninterrupted run would.
Every ``eval_every`` steps, and at the end, every exit is evaluated on dev; the weights with
the best mean dev metric over the exits are kept. Then a sweep of every exit policy
(``calibration.json``) and the default policy: the fastest within ``max_drop`` points of full
depth. The checkpoint is written atomically, so a failed run never damages an existing one.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from eeengine.batching import Encoded, collate, encode
from eeengine.checkpoint import save_checkpoint
from eeengine.data import Dataset, file_dataset, glue_dataset
from eeengine.evaluation import (
    all_exit_outputs,
    choose_operating_point,
    exit_metrics,
    flops_tables,
    policy_params,
    sweep,
)
from eeengine.modeling_multiexit import MultiExitBert, load_backbone_weights
from eeengine.token_pruning import TokenPruning
from eeengine.training.recipes import Recipe, make_recipe
from eeengine.training.state import load_state, remove_state, save_state

# Parameters trained at head_lr (everything else but the recipe's own is the backbone).
HEAD_PREFIXES = ("exit_heads.", "exit_pooler.", "lte.")
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight")
# Config fields that do not change the trained weights: a resumed run may change them.
RESUMABLE_CHANGES = ("resume", "save_every", "device")


@dataclass
class TrainConfig:
    """Hyperparameters of a training run (all recorded in ``eeengine.json``).

    Attributes:
        base_model: Hugging Face BERT, RoBERTa or ALBERT directory (config.json,
            model.safetensors, tokenizer files).
        task: GLUE task name (see :mod:`eeengine.data`); ignored when ``train_file`` is set.
        train_file, dev_file: the user's CSV / TSV / JSONL files (see
            :func:`eeengine.data.file_dataset`), with ``text_column``, ``label_column`` and
            optionally ``text_pair_column``; ``regression`` for a numeric target.
        recipe: training recipe (see :mod:`eeengine.training.recipes`); ``lte_base`` is the
            recipe under ``lte``.
        layout, pooling: exit heads (see :mod:`eeengine.heads`).
        epochs: passes over the (possibly limited) training set; fractions allowed.
        max_train_examples: use only the first N examples of a seeded shuffle (None: all).
        lr, head_lr: AdamW learning rates of the backbone and of the exit heads (and LTE).
        max_seq_length: truncation length in training (tokens); inference uses
            ``eval_max_seq_length``. Both are capped at the model's position embeddings.
        device: "cpu" or "cuda[:N]".
        mixed_precision: bf16 autocast where the device supports it (CUDA with bf16); fp32
            otherwise.
        eval_every: evaluate every exit on dev every N steps and keep the best weights
            (0: only at the end).
        save_every: save the resumable training state every N steps (0: never).
        resume: continue from a saved training state of the same config, if there is one.
        max_drop: the default policy is the fastest within this many metric points of full
            depth on dev.
        token_pruning: an MPEE token-pruning schedule (``{"layers", "keep_ratio", "beta"}``,
            e.g. :data:`eeengine.token_pruning.DEFAULT_TOKEN_PRUNING` for 6 layers) to train,
            evaluate and save with; None: no pruning.
    """

    base_model: str
    task: str = "sst2"
    train_file: str | None = None
    dev_file: str | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    regression: bool = False
    recipe: str = "weighted"
    lte_base: str = "alternating"
    layout: str = "per_layer"
    pooling: str = "mean"
    epochs: float = 1.0
    max_train_examples: int | None = None
    batch_size: int = 32
    lr: float = 1e-4
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    max_seq_length: int = 64
    eval_max_seq_length: int = 128
    seed: int = 42
    device: str = "cpu"
    mixed_precision: bool = True
    eval_every: int = 0
    save_every: int = 200
    resume: bool = True
    max_drop: float = 0.5
    token_pruning: dict | None = None


def load_dataset(config: TrainConfig) -> Dataset:
    """The GLUE task or the user files the config names.

    Raises:
        ValueError: ``train_file`` without ``dev_file``, ``text_column`` or ``label_column``.
    """
    if config.train_file is None:
        return glue_dataset(config.task)
    missing = [
        name for name in ("dev_file", "text_column", "label_column") if not getattr(config, name)
    ]
    if missing:
        flags = ", ".join("--" + name.replace("_", "-") for name in missing)
        raise ValueError(f"--train-file needs {flags}")
    return file_dataset(
        config.train_file,
        config.dev_file,
        config.text_column,
        config.label_column,
        config.text_pair_column,
        config.regression,
    )


def _batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, sort by length inside pools of 50 batches, then shuffle the batch order."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool = 50 * batch_size
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lengths.__getitem__)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def _param_groups(model: MultiExitBert, recipe: Recipe, config: TrainConfig) -> list[dict]:
    """AdamW groups: backbone with and without weight decay (lr), exit heads and LTE
    (head_lr), the recipe's own parameters (its lr, else head_lr; no weight decay)."""
    groups = [
        {"params": [], "lr": config.lr, "weight_decay": config.weight_decay},
        {"params": [], "lr": config.lr, "weight_decay": 0.0},
        {"params": [], "lr": config.head_lr, "weight_decay": config.weight_decay},
    ]
    for name, param in model.named_parameters():
        group = 2 if name.startswith(HEAD_PREFIXES) else int(name.endswith(NO_DECAY))
        groups[group]["params"].append(param)
    own = list(recipe.parameters())
    if own:
        groups.append({"params": own, "lr": recipe.lr or config.head_lr, "weight_decay": 0.0})
    return groups


def _uses_bf16(device: torch.device, mixed_precision: bool) -> bool:
    """bf16 autocast runs on a CUDA device that supports it; CPU trains in fp32."""
    return mixed_precision and device.type == "cuda" and torch.cuda.is_bf16_supported()


@dataclass
class _Evaluation:
    step: int
    per_exit: list[float]
    logits: torch.Tensor
    signals: dict[str, torch.Tensor]

    @property
    def score(self) -> float:
        """Mean dev metric over the exits: every exit matters to the early-exit trade-off."""
        return sum(self.per_exit) / len(self.per_exit)


def _evaluate(
    model: MultiExitBert,
    tokenizer: PreTrainedTokenizerBase,
    data: Dataset,
    max_length: int,
    step: int,
    progress: bool,
    token_pruning: TokenPruning | None,
) -> _Evaluation:
    """Every exit on dev (logits, signals and the metric per exit); leaves the model training."""
    logits, signals = all_exit_outputs(
        model,
        tokenizer,
        data.dev.texts,
        data.dev.text_pairs,
        max_length,
        progress=progress,
        token_pruning=token_pruning,
    )
    model.train()
    return _Evaluation(step, exit_metrics(logits, data.dev.labels, data.metric), logits, signals)


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


class _Loop:
    """The optimizer steps of a run and everything a resumed run must get back exactly."""

    def __init__(
        self,
        config: TrainConfig,
        model: MultiExitBert,
        recipe: Recipe,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        rng: random.Random,
        total_steps: int,
        token_pruning: TokenPruning | None,
    ) -> None:
        self.config, self.model, self.recipe = config, model, recipe
        self.token_pruning = token_pruning
        self.optimizer, self.scheduler, self.rng = optimizer, scheduler, rng
        self.total_steps = total_steps
        self.step = 0
        self.batches: list[list[int]] = []
        self.position = 0
        self.stage: int | None = None
        self.best: _Evaluation | None = None
        self.best_model: dict | None = None
        self.best_recipe: dict | None = None
        self.device = next(model.parameters()).device
        self.bf16 = _uses_bf16(self.device, config.mixed_precision)

    def next_batch(self, encoded: Encoded) -> list[int]:
        """The next batch's indices; a new epoch's batch order when the last one is used up."""
        if self.position == len(self.batches):
            self.batches = _batches(encoded.lengths, self.config.batch_size, self.rng)
            self.position = 0
        self.position += 1
        return self.batches[self.position - 1]

    def train_step(self, batch: tuple[torch.Tensor, ...], labels: torch.Tensor) -> float:
        """One optimizer step of the recipe's loss; returns the loss."""
        stage = self.recipe.stage(self.step, self.total_steps)
        if stage != self.stage:
            for name, param in self.model.named_parameters():
                param.requires_grad_(self.recipe.trains(name, stage))
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
        self.step += 1
        return loss.item()

    def offer(self, evaluation: _Evaluation) -> _Evaluation:
        """Keep ``evaluation`` and the current weights if they beat the best so far; return
        the best. Ties go to the later step."""
        if self.best is None or evaluation.score >= self.best.score:
            self.best = evaluation
            self.best_model, self.best_recipe = _cpu_state(self.model), _cpu_state(self.recipe)
        return self.best

    def state(self) -> dict:
        """What :meth:`restore` needs to continue exactly from this step."""
        return {
            "step": self.step,
            "batches": self.batches,
            "position": self.position,
            "rng": self.rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "model": self.model.state_dict(),
            "recipe": self.recipe.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "best": self.best,
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
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.best, self.best_model, self.best_recipe = (
            state["best"],
            state["best_model"],
            state["best_recipe"],
        )


def _manifest(
    config: TrainConfig,
    data: Dataset,
    model: MultiExitBert,
    recipe: Recipe,
    calibration: dict,
    max_seq_length: int,
    training: dict,
) -> dict:
    """``eeengine.json`` of the trained model: the default policy is the fastest calibrated
    point within ``config.max_drop`` of full depth; ``training`` gets the recipe and config."""
    chosen = choose_operating_point(calibration, config.max_drop)
    policy = {"name": "none"} if chosen is None else {"name": chosen[0], **policy_params(chosen[1])}
    return {
        "backbone": model.backbone_type,
        "task": {
            "name": data.name,
            "type": "classification" if data.label_names else "regression",
            "label_names": list(data.label_names) if data.label_names else None,
            "metric": data.metric,
        },
        "exit_heads": {
            "layout": config.layout,
            "pooling": config.pooling,
            "lte": model.lte is not None,
        },
        "policy": policy,
        "token_pruning": config.token_pruning,
        "max_seq_length": max_seq_length,
        "training": {
            "recipe": recipe.name,
            "recipe_params": recipe.hyperparameters(),
            "recipe_learned": recipe.learned(),
            "config": {**asdict(config), "base_model": str(config.base_model)},
            **training,
        },
    }


def train(config: TrainConfig, out: str | Path, progress: bool = True) -> Path:
    """Train and save a checkpoint to ``out``; returns its path.

    Raises:
        ValueError: unknown task, recipe, layout or pooling; bad user data (file, line and
            column named); a saved training state of another config.
        FileNotFoundError: missing base model or data.
    """
    started = time.time()
    data = load_dataset(config)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    device = torch.device(config.device)

    backbone_config, backbone_state = load_backbone_weights(config.base_model)
    tokenizer = AutoTokenizer.from_pretrained(config.base_model)
    num_labels = len(data.label_names) if data.label_names else 1
    num_layers = backbone_config.num_hidden_layers
    recipe = make_recipe(config.recipe, num_layers, num_labels, config.layout, config.lte_base)
    model = MultiExitBert(
        backbone_config, num_labels, config.pooling, config.layout, lte=recipe.needs_lte
    )
    model.backbone.load_state_dict(backbone_state)
    token_pruning = None
    if config.token_pruning is not None:
        token_pruning = TokenPruning.from_json(config.token_pruning, num_layers)
    model.to(device)
    recipe.to(device)
    max_seq_length = min(config.max_seq_length, model.backbone.max_positions)
    eval_max_seq_length = min(config.eval_max_seq_length, model.backbone.max_positions)

    order = list(range(len(data.train.texts)))
    rng.shuffle(order)
    order = order[: config.max_train_examples]
    texts = [data.train.texts[i] for i in order]
    pairs = [data.train.text_pairs[i] for i in order] if data.train.text_pairs else None
    labels = torch.tensor([data.train.labels[i] for i in order])
    encoded = encode(tokenizer, texts, pairs, max_seq_length)

    steps_per_epoch = math.ceil(len(texts) / config.batch_size)
    total_steps = max(1, round(config.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(_param_groups(model, recipe, config))
    scheduler = get_linear_schedule_with_warmup(
        optimizer, round(config.warmup_ratio * total_steps), total_steps
    )
    loop = _Loop(config, model, recipe, optimizer, scheduler, rng, total_steps, token_pruning)
    saved = load_state(out, asdict(config), RESUMABLE_CHANGES) if config.resume else None
    if saved is not None:
        loop.restore(saved)

    def evaluate(step: int) -> _Evaluation:
        return _evaluate(model, tokenizer, data, eval_max_seq_length, step, progress, token_pruning)

    model.train()
    bar = tqdm(
        total=total_steps,
        initial=loop.step,
        desc=f"training {data.name} ({recipe.name})",
        disable=not progress,
        unit="step",
    )
    seen, loop_started = 0, time.perf_counter()
    while loop.step < total_steps:
        indices = loop.next_batch(encoded)
        batch = collate(encoded, indices, tokenizer.pad_token_id, device)
        loss = loop.train_step(batch, labels[indices].to(device))
        seen += len(indices)
        rate = seen / max(time.perf_counter() - loop_started, 1e-9)
        bar.set_postfix(loss=f"{loss:.3f}", ex_per_s=f"{rate:.0f}")
        bar.update()
        if loop.step < total_steps:
            if config.eval_every and loop.step % config.eval_every == 0:
                loop.offer(evaluate(loop.step))
            if config.save_every and loop.step % config.save_every == 0:
                save_state(out, {"config": asdict(config), **loop.state()})
    bar.close()

    best = loop.offer(evaluate(total_steps))
    if best.step != total_steps:
        model.load_state_dict(loop.best_model)
        recipe.load_state_dict(loop.best_recipe)
    dev = data.dev
    flops = flops_tables(
        model, tokenizer, dev.texts, dev.text_pairs, eval_max_seq_length, token_pruning
    )
    calibration = sweep(
        best.logits, data.dev.labels, data.metric, best.signals, data.extra_metrics, flops
    )
    training = {
        "steps": total_steps,
        "best_step": best.step,
        "train_examples": len(texts),
        "mixed_precision": "bf16" if loop.bf16 else None,
        "seconds": round(time.time() - started, 1),
        "dev_metric": data.metric,
        "dev_exit_metrics": best.per_exit,
    }
    manifest = _manifest(config, data, model, recipe, calibration, eval_max_seq_length, training)
    path = save_checkpoint(out, model.cpu(), tokenizer, manifest, calibration)
    remove_state(out)
    return path
