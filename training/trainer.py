"""Fine-tune a multi-exit encoder with a recipe and save an eeengine checkpoint.

Data: a GLUE task of ``data/`` by name, or the user's CSV / TSV / JSONL files
(:func:`eeengine.data.file_dataset`). Backbone: any Hugging Face BERT, RoBERTa or ALBERT
directory. Recipe: see :mod:`eeengine.training.recipes`; it decides the loss of every step,
which parameters train in which stage, and its own parameters (own AdamW group).

The loop: AdamW with linear warm-up and decay, length-bucketed batches (sorted within random
pools of batches, batch order shuffled), a fixed seed, gradient clipping, bf16 autocast on
CUDA and on CPUs with AMX (fp32 elsewhere: AVX-512 BF16 alone was slower), a tqdm bar with
loss and throughput. Every ``save_every`` steps the training state is saved atomically next
to the output (:mod:`eeengine.training.state`); a rerun with the same config resumes from it
and ends exactly where an uninterrupted run would.
Model selection and threshold calibration never see the dev set: a stratified, seeded slice of
the training data (:func:`eeengine.data.calibration_size` rows, or ``calib_file``) is held out.
Every ``eval_every`` steps (by default every epoch of a multi-epoch run), and at the end, every
exit is evaluated on that slice; the weights with the best mean metric over the exits are kept,
and training stops early after ``early_stopping`` evaluations without a gain (from
``small_data`` training rows up by default). Then a sweep of
every exit policy on the slice (``calibration.json``) and the default policy: the fastest within
``max_drop`` points of full depth there. Dev is only reported: every exit, and the default
policy's metric and drop beside the drop promised on the slice. Where the int8 layers can run
(onnxruntime installed, a BERT backbone), the same sweep on the same slice with int8 layers goes
to ``calibration-int8.json``, so ``Engine(ckpt, precision="int8")`` picks its own thresholds;
``eeengine.json`` records whether it was written (``training.int8_calibration``). Small data
sets get more epochs (at least ``min_steps`` optimizer steps, up to ``max_auto_epochs``), and
sentence pairs below ``small_data`` training rows train at the inference length instead of 64
tokens; the run says what it chose. Classification below ``small_data`` rows first tunes the
encoder contrastively on pairs of rows (SetFit's first stage,
:mod:`eeengine.training.contrastive`) and smooths its labels (0.1); the stage runs before the
resumable loop (a resumed run starts
from the saved weights, after it). ``probe_init`` starts the exit heads as linear probes of the
backbone (LP-FT, :mod:`eeengine.training.probe_init`). ``max_train_seconds`` gives the steps
a time budget: the run is cut where the planned steps do not fit it
(:mod:`eeengine.training.time_budget`).
The checkpoint is written atomically, so a failed run never damages an existing one.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from eeengine.batching import collate, encode
from eeengine.calibration import OperatingPoint, check_confidence, measure_trade_off
from eeengine.checkpoint import save_checkpoint
from eeengine.data import Dataset
from eeengine.evaluation import predictions_of
from eeengine.metrics import METRICS
from eeengine.modeling_multiexit import MultiExitBert, load_backbone_weights
from eeengine.policies import run_policy
from eeengine.precision import calibration_file
from eeengine.token_pruning import TokenPruning
from eeengine.training.config import TrainConfig
from eeengine.training.contrastive import contrastive_tune
from eeengine.training.loop import (
    Evaluation,
    TrainLoop,
    adamw,
    evaluate_exits,
    param_groups,
)
from eeengine.training.plan import describe_plan, load_dataset, schedule, split_calibration
from eeengine.training.precision_calibration import int8_calibration, int8_static_calibration
from eeengine.training.probe_init import probe_init
from eeengine.training.recipes import Recipe, make_recipe
from eeengine.training.state import load_state, remove_state, save_state
from eeengine.training.time_budget import StepTimer, describe_cut, padded_tokens

# Config fields that do not change the trained weights: a resumed run may change them.
RESUMABLE_CHANGES = ("resume", "save_every", "device")


def _manifest(
    config: TrainConfig,
    data: Dataset,
    model: MultiExitBert,
    recipe: Recipe,
    policy: dict,
    max_seq_length: int,
    training: dict,
) -> dict:
    """``eeengine.json`` of the trained model; ``training`` gets the recipe and config."""
    return {
        "backbone": model.backbone_type,
        "task": {
            "name": data.name,
            "type": "classification" if data.label_names else "regression",
            "label_names": list(data.label_names) if data.label_names else None,
            "metric": data.metric,
            "metrics": [data.metric, *data.extra_metrics],
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


def _policy_report(
    point: OperatingPoint | None, evaluation: Evaluation, labels: list, metric: str
) -> dict:
    """The default policy on one split (run exactly as the engine runs it, on the logits of
    every exit): its metric, full depth's, the drop and the average exit layer."""
    full_depth = evaluation.per_exit[-1]
    if point is None:
        return {
            "metric": full_depth,
            "full_depth": full_depth,
            "drop": 0.0,
            "avg_exit_layer": float(len(evaluation.per_exit)),
        }
    exit_layer, logits = run_policy(point.policy(), evaluation.logits, evaluation.signals)
    value = METRICS[metric](predictions_of(logits), labels)
    return {
        "metric": value,
        "full_depth": full_depth,
        "drop": full_depth - value,
        "avg_exit_layer": exit_layer.double().mean().item(),
    }


def train(config: TrainConfig, out: str | Path, progress: bool = True) -> Path:
    """Train and save a checkpoint to ``out``; returns its path.

    Raises:
        ValueError: unknown task, recipe, layout or pooling; bad user data (file, line and
            column named); a saved training state of another config; a
            ``max_drop_confidence`` or ``ema_decay`` outside (0, 1), a ``max_train_seconds``
            that is not positive (before any work is done).
        FileNotFoundError: missing base model or data.
    """
    started = time.time()
    check_confidence(config.max_drop_confidence, config.max_drop)
    if config.ema_decay is not None and not 0.0 < config.ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1), got {config.ema_decay}")
    if config.max_train_seconds is not None and not config.max_train_seconds > 0:
        raise ValueError(f"max_train_seconds must be > 0, got {config.max_train_seconds}")
    data = load_dataset(config)
    train_split, calib, calib_source = split_calibration(config, data)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    device = torch.device(config.device)

    backbone_config, backbone_state = load_backbone_weights(config.base_model)
    tokenizer = AutoTokenizer.from_pretrained(config.base_model)
    num_labels = len(data.label_names) if data.label_names else 1
    num_layers = backbone_config.num_hidden_layers
    order = list(range(len(train_split.texts)))
    rng.shuffle(order)
    order = order[: config.max_train_examples]
    texts = [train_split.texts[i] for i in order]
    pairs = [train_split.text_pairs[i] for i in order] if train_split.text_pairs else None
    labels = torch.tensor([train_split.labels[i] for i in order])
    plan = schedule(config, len(texts), pairs is not None, data.label_names is not None)
    recipe = make_recipe(
        config.recipe,
        num_layers,
        num_labels,
        config.layout,
        config.lte_base,
        plan["label_smoothing"],
    )
    model = MultiExitBert(
        backbone_config, num_labels, config.pooling, config.layout, lte=recipe.needs_lte
    )
    model.backbone.load_state_dict(backbone_state)
    token_pruning = None
    if config.token_pruning is not None:
        token_pruning = TokenPruning.from_json(config.token_pruning, num_layers)
    model.to(device)
    recipe.to(device)
    eval_max_seq_length = min(config.eval_max_seq_length, model.backbone.max_positions)

    max_seq_length = min(plan["max_seq_length"], model.backbone.max_positions)
    encoded = encode(tokenizer, texts, pairs, max_seq_length)

    optimizer = adamw(param_groups(model, recipe, config, plan["lr"]))
    loop = TrainLoop(config, model, recipe, optimizer, rng, plan["total_steps"], token_pruning)
    if progress:
        print(describe_plan(plan, len(texts), calib_source, loop.bf16, config), file=sys.stderr)
    saved = load_state(out, asdict(config), RESUMABLE_CHANGES) if config.resume else None
    contrastive = None  # what the contrastive stage did (it is not resumed inside)
    if saved is not None:
        loop.restore(saved)
        contrastive = saved["contrastive"]
    else:
        if plan["contrastive_steps"]:
            contrastive = contrastive_tune(
                model,
                encoded,
                labels.tolist(),
                tokenizer.pad_token_id,
                rounds=config.contrastive_rounds,
                lr=config.contrastive_lr,
                batch_size=config.contrastive_batch_size,
                exits=config.contrastive_exits,
                seed=config.seed,
                frozen=loop.frozen,
                bf16=loop.bf16,
                max_grad_norm=config.max_grad_norm,
                progress=progress,
            )
        if config.probe_init:
            probe_init(
                model, encoded, labels, tokenizer.pad_token_id, config.probe_l2, token_pruning
            )

    def evaluate(step: int) -> Evaluation:
        return evaluate_exits(
            loop.weights,
            tokenizer,
            calib,
            data.metric,
            eval_max_seq_length,
            step,
            progress,
            token_pruning,
        )

    model.train()
    bar = tqdm(
        total=loop.total_steps,
        initial=loop.step,
        desc=f"training {data.name} ({recipe.name})",
        disable=not progress,
        unit="step",
    )
    seen, loop_started = 0, time.perf_counter()
    stopped_early = False
    budget = saved["time_budget"] if saved is not None else None
    timer = StepTimer() if config.max_train_seconds is not None and budget is None else None
    while loop.step < loop.total_steps:
        indices = loop.next_batch(encoded)
        step_started = time.perf_counter()
        batch = collate(encoded, indices, tokenizer.pad_token_id, device)
        loss = loop.train_step(batch, labels[indices].to(device))
        now = time.perf_counter()
        if timer is not None:
            tokens = padded_tokens(indices, encoded.lengths)
            if timer.add(loop.step - 1, now - step_started, tokens):
                budget = loop.fit_to_budget(config.max_train_seconds, timer, encoded.lengths)
                timer = None  # timed once; the rest of the run is not timed
                bar.total = loop.total_steps
                if progress:
                    tqdm.write(describe_cut(budget, plan["steps_per_epoch"]), file=sys.stderr)
        seen += len(indices)
        rate = seen / max(now - loop_started, 1e-9)
        bar.set_postfix(loss=f"{loss:.3f}", ex_per_s=f"{rate:.0f}")
        bar.update()
        if loop.step < loop.total_steps:
            if plan["eval_every"] and loop.step % plan["eval_every"] == 0:
                loop.offer(evaluate(loop.step))
                if plan["early_stopping"] and loop.stale >= plan["early_stopping"]:
                    stopped_early = True
                    break
            if config.save_every and loop.step % config.save_every == 0:
                state = {
                    "config": asdict(config),
                    "contrastive": contrastive,
                    "time_budget": budget,
                    **loop.state(),
                }
                save_state(out, state)
    bar.close()

    best = loop.best if stopped_early else loop.offer(evaluate(loop.step))
    loop.load_best()
    # Every policy swept on the calibration slice: at fp32 from the best step's logits, then
    # (below) with int8 layers.
    sweep_slice = partial(
        measure_trade_off,
        model,
        tokenizer,
        calib.texts,
        calib.text_pairs,
        calib.labels,
        data.metric,
        eval_max_seq_length,
        data.extra_metrics,
        token_pruning,
    )
    trade_off = sweep_slice(outputs=(best.logits, best.signals))
    try:
        point: OperatingPoint | None = trade_off.select(
            max_drop=config.max_drop, confidence=config.max_drop_confidence
        )
    except ValueError as e:
        point = None
        if progress:
            print(
                f"eeengine train: the default policy runs every layer: {e}. Calibrate on more "
                "in-domain text (eeengine calibrate --unlabeled FILE, or --calib-file) to exit "
                "early.",
                file=sys.stderr,
            )
    dev = evaluate_exits(
        model,
        tokenizer,
        data.dev,
        data.metric,
        eval_max_seq_length,
        best.step,
        progress,
        token_pruning,
    )
    int8_sweep, int8_record = int8_calibration(
        model, sweep_slice, token_pruning, progress, trade_off.sweep["full_depth"]
    )
    static_sweep, static_files, static_record = int8_static_calibration(
        model, tokenizer, calib, eval_max_seq_length, sweep_slice, token_pruning, progress,
        trade_off.sweep["full_depth"],
    )  # fmt: skip
    training = {
        "steps": loop.step,
        "schedule": {**plan, "stopped_early": stopped_early, "time_budget": budget},
        "best_step": best.step,
        "train_examples": len(texts),
        "contrastive": contrastive,
        "calibration_data": {"source": calib_source, "examples": len(calib.texts)},
        "mixed_precision": "bf16" if loop.bf16 else None,
        "seconds": round(time.time() - started, 1),
        "dev_metric": data.metric,
        "calibration_exit_metrics": best.per_exit,
        "dev_exit_metrics": dev.per_exit,
        "default_policy": {
            "calibration": _policy_report(point, best, calib.labels, data.metric),
            "dev": _policy_report(point, dev, data.dev.labels, data.metric),
        },
        "int8_calibration": int8_record,
        "int8_static_calibration": static_record,
    }
    policy = {"name": "none"} if point is None else point.to_json()
    manifest = _manifest(config, data, model, recipe, policy, eval_max_seq_length, training)
    extra = {} if int8_sweep is None else {calibration_file("int8"): int8_sweep}
    if static_sweep is not None:
        extra[calibration_file("int8_static")] = static_sweep
    path = save_checkpoint(
        out, model.cpu(), tokenizer, manifest, trade_off.sweep, extra, static_files
    )
    remove_state(out)
    return path
