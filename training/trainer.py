"""Fine-tune a multi-exit BERT on a GLUE task and save an eeengine checkpoint.

AdamW with linear warm-up and decay, length-bucketed batches (sorted within random pools of
batches, batch order shuffled), a fixed seed, gradient clipping, a tqdm bar with loss and
throughput. At the end: dev metric of every exit, a sweep of every exit policy
(``calibration.json``) and the default policy, the fastest one within ``max_drop`` points of
full depth. The checkpoint is written atomically, so a failed run never damages an existing
one.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_linear_schedule_with_warmup

from eeengine.batching import collate, encode
from eeengine.checkpoint import save_checkpoint
from eeengine.data import get_task, load_split
from eeengine.evaluation import (
    all_exit_logits,
    choose_operating_point,
    exit_metrics,
    policy_params,
    sweep,
)
from eeengine.modeling_multiexit import MultiExitBert, load_bert_weights
from eeengine.token_pruning import TokenPruning
from eeengine.training.recipes import get_recipe


@dataclass
class TrainConfig:
    """Hyperparameters of a training run (all recorded in ``eeengine.json``).

    Attributes:
        base_model: Hugging Face BERT directory (config.json, model.safetensors, tokenizer).
        task: GLUE task name (see :mod:`eeengine.data`).
        recipe: training loss (see :mod:`eeengine.training.recipes`).
        epochs: passes over the (possibly limited) training set; fractions allowed.
        max_train_examples: use only the first N examples of a seeded shuffle (None: all).
        lr, head_lr: AdamW learning rates of the backbone and of the exit heads.
        max_seq_length: truncation length in training (tokens); inference uses
            ``eval_max_seq_length``. Both are capped at the model's position embeddings.
        max_drop: the default policy is the fastest within this many metric points of full
            depth on dev.
        token_pruning: an MPEE token-pruning schedule (``{"layers", "keep_ratio", "beta"}``,
            e.g. :data:`eeengine.token_pruning.DEFAULT_TOKEN_PRUNING` for 6 layers) to train,
            evaluate and save with; None: no pruning.
    """

    base_model: str
    task: str = "sst2"
    recipe: str = "weighted"
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
    max_drop: float = 0.5
    token_pruning: dict | None = None


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


def train(config: TrainConfig, out: str | Path, progress: bool = True) -> Path:
    """Train and save a checkpoint to ``out``; returns its path.

    Raises:
        ValueError: unknown task or recipe; FileNotFoundError: missing base model or data.
    """
    started = time.time()
    task = get_task(config.task)
    loss_fn = get_recipe(config.recipe)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)

    bert_config, bert_state = load_bert_weights(config.base_model)
    tokenizer = AutoTokenizer.from_pretrained(config.base_model)
    num_labels = len(task.label_names) if task.label_names else 1
    model = MultiExitBert(bert_config, num_labels, pooling=config.pooling)
    model.bert.load_state_dict(bert_state)
    token_pruning = None
    if config.token_pruning is not None:
        token_pruning = TokenPruning.from_json(config.token_pruning, model.num_layers)
    # Lengths cannot exceed the model's position embeddings.
    max_seq_length = min(config.max_seq_length, bert_config.max_position_embeddings)
    eval_max_seq_length = min(config.eval_max_seq_length, bert_config.max_position_embeddings)

    train_split = load_split(task, "train")
    order = list(range(len(train_split.texts)))
    rng.shuffle(order)
    order = order[: config.max_train_examples]
    texts = [train_split.texts[i] for i in order]
    pairs = [train_split.text_pairs[i] for i in order] if train_split.text_pairs else None
    labels = torch.tensor([train_split.labels[i] for i in order])
    encoded = encode(tokenizer, texts, pairs, max_seq_length)

    steps_per_epoch = math.ceil(len(texts) / config.batch_size)
    total_steps = max(1, round(config.epochs * steps_per_epoch))
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [], "lr": config.lr, "weight_decay": config.weight_decay},
        {"params": [], "lr": config.lr, "weight_decay": 0.0},
        {"params": [], "lr": config.head_lr, "weight_decay": config.weight_decay},
    ]
    for name, param in model.named_parameters():
        group = 2 if name.startswith("exit_heads.") else int(name.endswith(no_decay))
        groups[group]["params"].append(param)
    optimizer = torch.optim.AdamW(groups)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, round(config.warmup_ratio * total_steps), total_steps
    )

    model.train()
    bar = tqdm(total=total_steps, desc=f"training {task.name}", disable=not progress, unit="step")
    step, seen, loop_started = 0, 0, time.perf_counter()
    while step < total_steps:
        for indices in _batches(encoded.lengths, config.batch_size, rng):
            if step == total_steps:
                break
            batch = collate(encoded, indices, tokenizer.pad_token_id)
            loss = loss_fn(model(*batch, token_pruning=token_pruning), labels[indices])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seen += len(indices)
            rate = seen / max(time.perf_counter() - loop_started, 1e-9)
            bar.set_postfix(loss=f"{loss.item():.3f}", ex_per_s=f"{rate:.0f}")
            bar.update()
    bar.close()

    dev = load_split(task, "dev")
    dev_logits = all_exit_logits(
        model,
        tokenizer,
        dev.texts,
        dev.text_pairs,
        eval_max_seq_length,
        progress=progress,
        token_pruning=token_pruning,
    )
    per_exit = exit_metrics(dev_logits, dev.labels, task.metric)
    calibration = sweep(dev_logits, dev.labels, task.metric)
    chosen = choose_operating_point(calibration, config.max_drop)
    policy = {"name": "none"} if chosen is None else {"name": chosen[0], **policy_params(chosen[1])}

    manifest = {
        "backbone": "bert",
        "task": {
            "name": task.name,
            "type": "classification" if task.label_names else "regression",
            "label_names": list(task.label_names) if task.label_names else None,
            "metric": task.metric,
        },
        "exit_heads": {"layout": "per_layer", "pooling": config.pooling},
        "policy": policy,
        "token_pruning": None if token_pruning is None else token_pruning.to_json(),
        "max_seq_length": eval_max_seq_length,
        "training": {
            "recipe": config.recipe,
            "config": {**asdict(config), "base_model": str(config.base_model)},
            "steps": total_steps,
            "train_examples": len(texts),
            "seconds": round(time.time() - started, 1),
            "dev_metric": task.metric,
            "dev_exit_metrics": per_exit,
        },
    }
    return save_checkpoint(out, model, tokenizer, manifest, calibration)
