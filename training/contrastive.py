"""Contrastive tuning of the encoder on labelled pairs before multi-exit fine-tuning (the
first stage of SetFit, Tunstall et al. 2022, "Efficient Few-Shot Learning Without Prompts").

With a few hundred labelled rows, plain fine-tuning sees each row only a few times. Pairs of
rows see far more combinations: every round pairs each row once with a random row of its
class (target cosine similarity 1) and once with a random row of another class (target 0),
and the encoder is trained for one pass over these pairs to make the cosine similarity of
the two mean-pooled embeddings (real tokens only) match the target, by mean squared error.
The exit heads are not involved; the multi-exit fine-tuning that follows trains them on the
tuned encoder.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from eeengine.batching import Encoded, bucketed_batches, collate
from eeengine.heads import mean_pool
from eeengine.modeling_multiexit import MultiExitBert
from eeengine.training.loop import adamw

# Which layers' embeddings are paired: the last one (SetFit), or every exit's.
EXITS = ("last", "all")
# Share of the stage's steps spent warming the learning rate up (then linear decay to 0).
WARMUP_RATIO = 0.1


def make_pairs(labels: Sequence[int], rounds: int, seed: int) -> list[tuple[int, int, float]]:
    """Labelled pairs of row indices, in a seeded random order.

    Every round pairs each row once with a random other row of its class (target 1.0) and
    once with a random row of another class (target 0.0); a row alone in its class gets no
    positive pair, and with a single class there are no negative pairs.

    Args:
        labels: class index per row.
        rounds: R; up to 2 R pairs per row.
        seed: the pairs and their order are a function of (labels, rounds, seed).

    Returns:
        ``(first, second, target)`` triples.
    """
    rng = random.Random(seed)
    members: dict[int, list[int]] = {}
    for row, label in enumerate(labels):
        members.setdefault(label, []).append(row)
    pairs = []
    for _ in range(rounds):
        for row, label in enumerate(labels):
            same = members[label]
            if len(same) > 1:
                other = same[rng.randrange(len(same) - 1)]
                pairs.append((row, other if other != row else same[-1], 1.0))
            negatives = len(labels) - len(same)
            if negatives:
                pick = rng.randrange(negatives)
                pairs.append((row, _nth_outside(members, label, pick), 0.0))
    rng.shuffle(pairs)
    return pairs


def _nth_outside(members: dict[int, list[int]], label: int, n: int) -> int:
    """The ``n``-th row of the classes other than ``label`` (in class order)."""
    for other, rows in members.items():
        if other == label:
            continue
        if n < len(rows):
            return rows[n]
        n -= len(rows)
    raise IndexError(n)


def cosine_pair_loss(first: Tensor, second: Tensor, target: Tensor) -> Tensor:
    """Mean squared error between the cosine similarity of paired embeddings and the target.

    Args:
        first, second: (num_pairs, hidden_size) embeddings.
        target: (num_pairs,) float, 1.0 for a pair of one class, 0.0 otherwise.

    Returns:
        A scalar float32 tensor.
    """
    similarity = F.cosine_similarity(first.float(), second.float(), dim=-1)
    return F.mse_loss(similarity, target.float())


def contrastive_steps(num_rows: int, rounds: int, batch_size: int) -> int:
    """Optimizer steps of the stage on ``num_rows`` rows of at least two classes with two or
    more rows each (at most this many otherwise)."""
    return math.ceil(2 * rounds * num_rows / batch_size)


def contrastive_tune(
    model: MultiExitBert,
    encoded: Encoded,
    labels: Sequence[int],
    pad_token_id: int,
    *,
    rounds: int,
    lr: float,
    batch_size: int,
    exits: str,
    seed: int,
    frozen: Collection[str] = (),
    bf16: bool = False,
    max_grad_norm: float = 1.0,
    progress: bool = False,
) -> dict:
    """Train the encoder of ``model`` for one pass over :func:`make_pairs` of the rows, in
    batches of pairs of similar length (:func:`eeengine.batching.bucketed_batches`), by
    :func:`cosine_pair_loss` on mean-pooled embeddings (fused AdamW, no weight decay, linear
    warm-up over :data:`WARMUP_RATIO` of the steps, then linear decay; gradient clipping;
    dropout on). The exit heads are untouched. Deterministic given the seed and torch's RNG
    state (dropout draws from it).

    Args:
        model: the multi-exit model; its encoder is trained in place, left in training mode.
        encoded, labels: the training rows (``labels``: class index per row).
        pad_token_id: the tokenizer's padding id.
        rounds: R of :func:`make_pairs`.
        lr: peak learning rate.
        batch_size: pairs per step.
        exits: "last" pairs the last layer's embeddings; "all" averages the loss over every
            layer's.
        seed: of the pairs.
        frozen: names (as in ``model.named_parameters()``) of encoder parameters that stay as
            they are; they are left with ``requires_grad`` False.
        bf16: run the forward pass under bf16 autocast (the loss in float32).
        progress: show a progress bar.

    Returns:
        ``{"pairs", "steps", "first_loss", "last_loss"}``, the losses averaged over the first
        and last tenth of the steps.

    Raises:
        ValueError: ``exits`` not in :data:`EXITS`.
    """
    if exits not in EXITS:
        raise ValueError(f"contrastive exits {exits!r}: one of {', '.join(EXITS)}")
    layers = [model.num_layers - 1] if exits == "last" else list(range(model.num_layers))
    pairs = make_pairs(labels, rounds, seed)
    lengths = encoded.lengths
    pair_lengths = [max(lengths[first], lengths[second]) for first, second, _ in pairs]
    batches = [
        [pairs[i] for i in batch]
        for batch in bucketed_batches(pair_lengths, batch_size, random.Random(seed))
    ]
    prefix = model.backbone_type + "."
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)
        if name.startswith(prefix) and name not in frozen:
            params.append(param)
    optimizer = adamw([{"params": params, "lr": lr, "weight_decay": 0.0}])
    scheduler = get_linear_schedule_with_warmup(
        optimizer, round(WARMUP_RATIO * len(batches)), len(batches)
    )
    device = next(model.parameters()).device
    model.train()
    losses = []
    for batch in tqdm(batches, desc="contrastive pairs", disable=not progress, unit="step"):
        first, second, target = zip(*batch, strict=True)
        inputs = collate(encoded, [*first, *second], pad_token_id, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            outputs = model.backbone.layer_outputs(*inputs)
        target = torch.tensor(target, device=device)
        loss = torch.stack(
            [
                cosine_pair_loss(*mean_pool(*outputs[layer]).float().chunk(2), target)
                for layer in layers
            ]
        ).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    tenth = max(1, len(losses) // 10)
    return {
        "pairs": len(pairs),
        "steps": len(batches),
        "first_loss": sum(losses[:tenth]) / tenth if losses else None,
        "last_loss": sum(losses[-tenth:]) / tenth if losses else None,
    }
