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
and training stops early after ``early_stopping`` evaluations without a gain. Then a sweep of
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
from dataclasses import asdict, dataclass
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


@dataclass
class TrainConfig:
    """Hyperparameters of a training run (all recorded in ``eeengine.json``).

    Attributes:
        base_model: Hugging Face BERT, RoBERTa or ALBERT directory (config.json,
            model.safetensors, tokenizer files).
        task: GLUE task name (see :mod:`eeengine.data`); ignored when ``train_file`` is set.
        train_file, dev_file, text_column, text_pair_column, label_column, regression: the
            user's CSV / TSV / JSONL files (see :func:`eeengine.data.file_dataset`), with
            ``text_column``, ``label_column`` and optionally ``text_pair_column``;
            ``regression`` for a numeric target.
        recipe, lte_base: training recipe (see :mod:`eeengine.training.recipes`); ``lte_base``
            is the recipe under ``lte``.
        layout, pooling: exit heads (see :mod:`eeengine.heads`).
        epochs: passes over the (possibly limited) training set; fractions allowed. None:
            enough epochs for ``min_steps`` optimizer steps, at least 1 and at most
            ``max_auto_epochs`` (SST-2: 1; a 600-row file: 10).
        min_steps, max_auto_epochs: the rule of ``epochs=None``.
        calib_file: the user's labelled file (same columns as ``train_file``) to select the
            best step and calibrate thresholds on; None: hold out
            :func:`eeengine.data.calibration_size` training rows (stratified, seeded).
        early_stopping: stop after this many evaluations on the calibration slice without a
            better mean metric over the exits (0: never stop early).
        probe_init, probe_l2: before fine-tuning, set every exit head's classifier to an
            L2-regularised linear probe (penalty ``probe_l2``) of its layer's frozen features on
            the training rows (LP-FT, :mod:`eeengine.training.probe_init`), after the
            contrastive stage if it runs. Off by default: on 600 rows, without the stage, it
            gave SST-2 80.05 % on dev instead of 79.13 but MRPC 61.03 instead of 65.44; after a
            10-round stage (then lr 1e-4), SST-2 77.52.
        freeze_word_embeddings: keep the word-embedding table (MiniLM: 11.7M of 22.7M
            parameters) at its pre-trained values. Off by default; the default checkpoint
            turns it on (:func:`eeengine.defaults.default_config`): the table gets no gradient
            and no AdamW update, which made a step on SST-2 batches 1.15x faster.
        small_data: the training-row count (after the calibration hold-out) below which
            ``max_seq_length=None`` trains sentence pairs at ``eval_max_seq_length`` and
            ``contrastive=None`` runs the contrastive stage.
        contrastive, contrastive_rounds, contrastive_lr, contrastive_batch_size, contrastive_exits:
            before fine-tuning, train the encoder on pairs of training rows, the
            cosine similarity of their mean-pooled embeddings towards 1 for the same class and
            0 for different ones (SetFit's first stage, :mod:`eeengine.training.contrastive`):
            ``contrastive_rounds`` rounds of two pairs per row, ``contrastive_batch_size``
            pairs a step, peak lr ``contrastive_lr``, on the last layer's embeddings or
            (``contrastive_exits="all"``) every layer's. None: on for classification with
            fewer than ``small_data`` training rows, off otherwise.
        max_train_examples: use only the first N examples of a seeded shuffle (None: all).
        lr, head_lr: AdamW learning rates of the backbone and of the exit heads (and LTE).
            ``lr=None``: :data:`eeengine.training.plan.LR`, or
            :data:`eeengine.training.plan.LR_AFTER_CONTRASTIVE` after the contrastive
            stage.
        max_seq_length, eval_max_seq_length: truncation length in training (tokens); inference
            uses ``eval_max_seq_length``. Both are capped at the model's position embeddings.
            ``max_seq_length=None``: :data:`eeengine.training.plan.TRAIN_LENGTH` (64), or
            ``eval_max_seq_length`` for sentence pairs with fewer than ``small_data`` training
            rows: 64 tokens cut RTE premises, and a few hundred rows cannot afford it (RTE, 600
            rows: 53.79 % on dev instead of 46.93).
        batch_size: training examples per optimizer step.
        weight_decay: AdamW's decoupled weight decay of the backbone and exit-head weights
            (not of biases and LayerNorm weights).
        warmup_ratio: share of the optimizer steps over which the learning rate warms up
            linearly from 0; it then decays linearly to 0.
        max_grad_norm: gradients are clipped to this L2 norm (over all trained parameters).
        label_smoothing: ε of every cross-entropy against the labels: the target is the
            one-hot label times 1 − ε plus ε / num_labels on every class (Szegedy et al. 2016,
            Sec. 7; 0: plain cross-entropy). Classification only. None:
            :data:`eeengine.training.plan.SMALL_DATA_LABEL_SMOOTHING` (0.1) for classification
            with fewer than ``small_data`` training rows, else 0 (SST-2, 600 rows: chosen on
            held-out training sentences; RESULTS.md, "Few-shot").
        max_train_seconds: a time budget (s) for the fine-tuning steps: after the first 12
            steps the trainer projects the cost of a step over the epoch's batches and, where
            the planned steps do not fit, ends the run at the last step that does (the
            learning-rate schedule and ``ema_decay`` rebuilt for the shorter run; the run says
            so, and ``eeengine.json`` records it under ``training.schedule.time_budget``).
            The cut depends on the measured speed, so two runs on one CPU may differ by a few
            steps; a run whose steps fit is unchanged. The contrastive stage, the evaluations
            and the sweeps are outside the budget. None: no budget. The first-run default
            checkpoint sets 720 (:func:`eeengine.defaults.default_config`): its 1,533 steps
            took 7 minutes in bf16 on 2 CPU cores with AMX and take about 35 in fp32 on 2
            AVX2 cores.
        ema_decay: keep an exponential moving average of the weights, updated after every
            optimizer step with this decay (e.g. 0.998: about the last 500 steps; a run cut
            by ``max_train_seconds`` raises it to the power planned / run steps), and
            evaluate, select and save the average instead of the raw weights (Polyak
            averaging; ``torch.optim.swa_utils``). None: the raw weights.
        seed: seeds the calibration hold-out, the batch order, dropout and new weights.
        device: "cpu" or "cuda[:N]".
        mixed_precision: bf16 autocast where it is faster (CUDA with bf16; CPUs with AMX);
            fp32 otherwise.
        eval_every: evaluate every exit on the calibration slice every N steps and keep the
            best weights (0: every epoch when training for more than one, else at the end).
        save_every: save the resumable training state every N steps (0: never).
        resume: continue from a saved training state of the same config, if there is one.
        max_drop: the default policy is the fastest within this many metric points of full
            depth on the calibration slice.
        max_drop_confidence: the default policy's drop must stay within ``max_drop`` at this
            confidence in (0, 1), allowing for the slice's sampling noise and for the number
            of points searched (:func:`eeengine.selection.choose_operating_point`); where no
            point qualifies (a slice of a few hundred rows rarely certifies one), the default
            policy runs every layer and the run says so. None: as measured on the slice; the
            fastest point there is often one that was lucky on it, and lost 1.0-4.5 points on
            dev where it promised 0.5 (600-row SST-2 subsets; RESULTS.md, "Calibration at a
            confidence", "Few-shot").
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
    epochs: float | None = None
    min_steps: int = 300
    max_auto_epochs: float = 10.0
    max_train_examples: int | None = None
    batch_size: int = 32
    lr: float | None = None
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    label_smoothing: float | None = None
    max_train_seconds: float | None = None
    ema_decay: float | None = None
    max_seq_length: int | None = None
    eval_max_seq_length: int = 128
    seed: int = 42
    device: str = "cpu"
    mixed_precision: bool = True
    eval_every: int = 0
    save_every: int = 200
    resume: bool = True
    max_drop: float = 0.5
    max_drop_confidence: float | None = 0.9
    token_pruning: dict | None = None
    calib_file: str | None = None
    early_stopping: int = 2
    probe_init: bool = False
    probe_l2: float = 0.1
    freeze_word_embeddings: bool = False
    small_data: int = 2000
    contrastive: bool | None = None
    contrastive_rounds: int = 5
    contrastive_lr: float = 2e-5
    contrastive_batch_size: int = 16
    contrastive_exits: str = "last"


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
                if config.early_stopping and loop.stale >= config.early_stopping:
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
