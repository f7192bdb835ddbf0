"""The hyperparameters of a training run (:class:`TrainConfig`), recorded in ``eeengine.json``.

:func:`eeengine.training.train` runs one; :mod:`eeengine.training.plan` turns the fields left
None (epochs, learning rate, label smoothing, sequence length, contrastive stage) into what the
data size calls for.
"""

from __future__ import annotations

from dataclasses import dataclass


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
            better mean metric over the exits (0: never stop early; the best step is kept
            either way). None: 0 with fewer than ``small_data`` training rows, else
            :data:`eeengine.training.plan.EARLY_STOPPING` (2): on 100-row slices, patience 2
            ended MRPC runs at step 48 of 160 with the slice at chance (held-out training
            pairs, seeds 0-3: 63.92 % against 70.12 % trained to the end; RESULTS.md,
            "Few-shot").
        probe_init, probe_l2: before fine-tuning, set every exit head's classifier to an
            L2-regularised linear probe (penalty ``probe_l2``) of its layer's frozen features on
            the first :data:`~eeengine.training.probe_init.PROBE_ROWS` training rows (LP-FT,
            :mod:`eeengine.training.probe_init`), after the contrastive stage if it runs. Off by
            default: on 600 rows, without the stage, it gave SST-2 80.05 % on dev instead of
            79.13 but MRPC 61.03 instead of 65.44; after a 10-round stage (then lr 1e-4), SST-2
            77.52. The default checkpoint turns it on
            (:func:`eeengine.defaults.default_config`; chosen on held-out training sentences).
        freeze_word_embeddings: keep the word-embedding table (MiniLM: 11.7M of 22.7M
            parameters) at its pre-trained values. Off by default; the default checkpoint
            turns it on (:func:`eeengine.defaults.default_config`): the table gets no gradient
            and no AdamW update, which made a step on SST-2 batches 1.15x faster.
        small_data: the training-row count (after the calibration hold-out) below which
            ``max_seq_length=None`` trains sentence pairs at ``eval_max_seq_length``,
            ``contrastive=None`` runs the contrastive stage, ``label_smoothing=None`` smooths
            classification labels and ``early_stopping=None`` never stops early.
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
            steps the trainer projects the cost of a step over the epoch's batches (the median
            seconds per padded token of steps 3-12, so one slow step does not cut a run whose
            steps fit) and, where
            the planned steps do not fit, ends the run at the last step that does (the
            learning-rate schedule and ``ema_decay`` rebuilt for the shorter run; the run says
            so, and ``eeengine.json`` records it under ``training.schedule.time_budget``).
            The cut depends on the measured speed, so two runs on one CPU may differ by a few
            steps; a run whose steps fit is unchanged. The contrastive stage, the linear probes
            (``probe_init``), the evaluations and the sweeps are outside the budget. None: no
            budget. The first-run default checkpoint sets 720
            (:func:`eeengine.defaults.default_config`): its 1,533 steps took 7 minutes in
            bf16 on 2 CPU cores with AMX and take about 35 in fp32 on 2 AVX2 cores.
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
    early_stopping: int | None = None
    probe_init: bool = False
    probe_l2: float = 0.1
    freeze_word_embeddings: bool = False
    small_data: int = 2000
    contrastive: bool | None = None
    contrastive_rounds: int = 5
    contrastive_lr: float = 2e-5
    contrastive_batch_size: int = 16
    contrastive_exits: str = "last"
