"""Time of one training step of the default recipe on SST-2 batches, by optimizer, frozen word
embeddings, batch size and dropout: what the first-run budget buys (RESULTS.md, "The first-run
checkpoint"; BENCHMARKS.md, "Training step").

Each configuration trains a fresh multi-exit all-MiniLM-L6-v2 (``weighted`` recipe, bf16
autocast where the trainer uses it) on length-bucketed batches of the first 4,000 rows of a
seeded shuffle of SST-2 train, skips the first 320 rows' steps (warm-up) and reports the mean
time per step and per example (ms), split into forward + backward and gradient clipping +
optimizer step. Dropout is torch's (``F.dropout`` and SDPA's, as without the compiled
extension) or eeengine's fused seeded dropout (:mod:`eeengine.dropout`, the default where the
extension is built). The configurations run one after the other in one process, ``--repeats``
times interleaved.

    python benchmarks/train_step.py --batch-sizes 32 128 --repeats 2
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from results_io import markdown_table
from transformers import AutoTokenizer

from eeengine import _custom_ops
from eeengine.batching import bucketed_batches, collate, encode
from eeengine.defaults import default_config
from eeengine.modeling_multiexit import MultiExitBert, load_backbone_weights
from eeengine.training import TrainConfig
from eeengine.training.loop import adamw, frozen_parameters, param_groups, uses_bf16
from eeengine.training.plan import load_dataset
from eeengine.training.recipes import make_recipe

ROWS, WARMUP_ROWS, MEASURED_ROWS = 4000, 320, 2560


def time_steps(config: TrainConfig, fused: bool) -> dict[str, float]:
    """Mean ms per step (forward + backward, clip + optimizer) and per example."""
    data = load_dataset(config)
    backbone_config, state = load_backbone_weights(config.base_model)
    tokenizer = AutoTokenizer.from_pretrained(config.base_model)
    recipe = make_recipe(
        config.recipe, backbone_config.num_hidden_layers, 2, config.layout, config.lte_base
    )
    model = MultiExitBert(backbone_config, 2, config.pooling, config.layout)
    model.backbone.load_state_dict(state)
    model.train()
    frozen = frozen_parameters(model, config)
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)
    groups = param_groups(model, recipe, config, config.lr)  # default_config sets lr
    optimizer = adamw(groups) if fused else torch.optim.AdamW(groups)
    rng = random.Random(config.seed)
    order = list(range(len(data.train.texts)))
    rng.shuffle(order)
    order = order[:ROWS]
    encoded = encode(tokenizer, [data.train.texts[i] for i in order], None, 64)
    labels = torch.tensor([data.train.labels[i] for i in order])
    batches = bucketed_batches(encoded.lengths, config.batch_size, rng)
    warmup = WARMUP_ROWS // config.batch_size
    batches = batches[: warmup + MEASURED_ROWS // config.batch_size]
    bf16 = uses_bf16(torch.device("cpu"), config.mixed_precision)
    forward_backward = update = 0.0
    for step, indices in enumerate(batches):
        batch = collate(encoded, indices, tokenizer.pad_token_id, torch.device("cpu"))
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, signals = model.exits(*batch, None)
        recipe.loss(step, 0, logits.float(), labels[indices], signals).backward()
        middle = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            forward_backward += middle - started
            update += time.perf_counter() - middle
    steps = len(batches) - warmup
    per_step = 1000 * (forward_backward + update) / steps
    return {
        "forward_backward_ms": 1000 * forward_backward / steps,
        "update_ms": 1000 * update / steps,
        "step_ms": per_step,
        "example_ms": per_step / config.batch_size,
    }


@contextmanager
def dropout_kind(kind: str) -> Iterator[None]:
    """Train with torch's dropout ("torch": the paths taken without the extension) or the fused
    seeded one ("fused")."""
    built = _custom_ops.HAS_C
    _custom_ops.HAS_C = built and kind == "fused"
    try:
        yield
    finally:
        _custom_ops.HAS_C = built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if not _custom_ops.HAS_C:
        parser.error(f"the fused dropout needs the extension: {_custom_ops.LOAD_ERROR}")
    base = default_config()
    header = [
        "AdamW", "word embeddings", "batch", "dropout", "fwd+bwd ms", "clip+AdamW ms", "step ms",
        "example ms",
    ]  # fmt: skip
    print(markdown_table(header, []), end="")  # the rows below, each printed once measured
    runs = [(False, False, 32, "torch"), (True, False, 32, "torch")]
    runs += [(True, True, size, kind) for size in args.batch_sizes for kind in ("torch", "fused")]
    for _ in range(args.repeats):
        for fused, freeze, size, kind in runs:
            config = replace(base, batch_size=size, freeze_word_embeddings=freeze)
            with dropout_kind(kind):
                t = time_steps(config, fused)
            print(
                f"| {'fused' if fused else 'per-parameter'} | {'frozen' if freeze else 'trained'} "
                f"| {size} | {kind} | {t['forward_backward_ms']:.1f} | {t['update_ms']:.1f} "
                f"| {t['step_ms']:.1f} | {t['example_ms']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
