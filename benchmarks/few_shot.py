"""Few-shot: what fine-tuning a multi-exit model with default flags buys over a linear probe.

For each task: a balanced, seeded subset of N training rows (N / C per class) is written as a
user CSV; ``eeengine train`` runs on it with default flags (which hold out a calibration slice
and pick epochs for the data size); the baseline is logistic regression on frozen mean-pooled
all-MiniLM-L6-v2 embeddings of the same N rows (:mod:`eeengine.training.baseline`). Both are
scored by accuracy on the task's full dev set, which neither saw.

    python benchmarks/few_shot.py --tasks sst2 mrpc rte --rows 600 --out results/few_shot

``--score-on heldout`` scores on 1,000 whole training sentences instead (:func:`heldout_sentences`),
so that a change to the defaults can be chosen without looking at dev.

``--config '{"lr": 3e-5, "early_stopping": 0}'`` changes TrainConfig fields from their
defaults (to try a rule before making it the default); the JSON records them.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import tempfile
import time
from pathlib import Path

from results_io import markdown_table, write_results

from eeengine.data import Split, get_task, load_split
from eeengine.defaults import minilm_dir
from eeengine.training import TrainConfig, train
from eeengine.training.baseline import linear_probe

HELDOUT_ROWS = 1000


def balanced_subset(split: Split, rows: int, num_classes: int, seed: int) -> Split:
    """``rows // num_classes`` rows of every class, drawn with ``seed``, in file order."""
    rng = random.Random(seed)
    chosen = []
    for label in range(num_classes):
        members = [i for i, y in enumerate(split.labels) if y == label]
        chosen += rng.sample(members, rows // num_classes)
    chosen.sort()
    pairs = None if split.text_pairs is None else [split.text_pairs[i] for i in chosen]
    return Split([split.texts[i] for i in chosen], pairs, [split.labels[i] for i in chosen])


def heldout_sentences(split: Split, subset: Split, rows: int, seed: int) -> Split:
    """``rows`` whole training sentences that share no text with ``subset``, drawn with ``seed``.

    SST-2's training rows are every phrase of the parse trees of its sentences, while dev holds
    whole sentences; a sentence here is a row that is no other row's word n-gram (SST-2: 6,885
    of 67,349 rows, 19.4 words on average, dev's 19.5), and it qualifies when none of its word
    n-grams, itself included, is a text of ``subset``. Sentence pairs: rows whose first text is
    not in ``subset``.

    Raises:
        ValueError: fewer than ``rows`` sentences qualify.
    """
    seen = {text.strip() for text in subset.texts}
    if split.text_pairs is None:
        inside = set()  # every row's n-grams but the row itself
        for text in {text.strip() for text in split.texts}:
            inside |= word_ngrams(text) - {" ".join(text.split())}

        def qualifies(text: str) -> bool:
            return text not in inside and seen.isdisjoint(word_ngrams(text))
    else:

        def qualifies(text: str) -> bool:
            return text not in seen

    first = {text.strip(): i for i, text in reversed(list(enumerate(split.texts)))}
    candidates = sorted(i for text, i in first.items() if qualifies(text))
    if len(candidates) < rows:
        raise ValueError(f"only {len(candidates)} held-out sentences qualify, {rows} asked")
    chosen = sorted(random.Random(seed).sample(candidates, rows))
    pairs = None if split.text_pairs is None else [split.text_pairs[i] for i in chosen]
    return Split([split.texts[i] for i in chosen], pairs, [split.labels[i] for i in chosen])


def word_ngrams(text: str) -> set[str]:
    """Every run of consecutive words of ``text`` (itself included), joined by single spaces."""
    words = text.split()
    return {" ".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, len(words) + 1)}


def write_csv(path: Path, split: Split, label_names: tuple[str, ...]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "pair", "label"] if split.text_pairs else ["text", "label"])
        for i, text in enumerate(split.texts):
            pair = [split.text_pairs[i]] if split.text_pairs else []
            writer.writerow([text, *pair, label_names[split.labels[i]]])


def run_task(
    name: str, rows: int, seed: int, workdir: Path, overrides: dict, score_on: str = "dev"
) -> dict:
    """Train on a ``rows``-row subset of ``name`` (TrainConfig defaults but ``overrides``)
    and fit the linear probe on it; both scored (points) on the full dev set, or with
    ``score_on="heldout"`` on :func:`heldout_sentences` (1,000 of them)."""
    task = get_task(name)
    train_split = load_split(task, "train")
    subset = balanced_subset(train_split, rows, len(task.label_names), seed)
    if score_on == "heldout":
        dev = heldout_sentences(train_split, subset, HELDOUT_ROWS, seed)
    else:
        dev = load_split(task, "dev")
    write_csv(workdir / f"{name}-train.csv", subset, task.label_names)
    write_csv(workdir / f"{name}-dev.csv", dev, task.label_names)
    config = TrainConfig(
        base_model=str(minilm_dir()),
        train_file=str(workdir / f"{name}-train.csv"),
        dev_file=str(workdir / f"{name}-dev.csv"),
        text_column="text",
        text_pair_column="pair" if subset.text_pairs else None,
        label_column="label",
        seed=seed,
        **overrides,
    )
    started = time.perf_counter()
    manifest = json.loads(
        (train(config, workdir / name, progress=True) / "eeengine.json").read_text()
    )
    seconds = time.perf_counter() - started
    training = manifest["training"]
    baseline = linear_probe(minilm_dir(), subset, dev, "accuracy")
    return {
        "task": name,
        "rows": rows,
        "seed": seed,
        "scored_on": score_on,
        "fine_tuned_full_depth": training["dev_exit_metrics"][-1],
        "fine_tuned_exits": training["dev_exit_metrics"],
        "calibration_exits": training["calibration_exit_metrics"],
        "best_step": training["best_step"],
        "contrastive": training["contrastive"],
        "default_policy_dev": training["default_policy"]["dev"],
        "schedule": training["schedule"],
        "config_overrides": overrides,
        "train_seconds": round(seconds, 1),
        "linear_probe": baseline,
    }


def markdown(results: list[dict]) -> str:
    header = [
        "task", "rows", "linear probe (frozen MiniLM)", "eeengine train, default flags: full depth",
        "default policy (avg exit layer)", "epochs, steps chosen",
    ]  # fmt: skip
    rows = []
    for r in results:
        policy, plan = r["default_policy_dev"], r["schedule"]
        rows.append([
            r["task"], r["rows"], f"{r['linear_probe']:.2f}", f"{r['fine_tuned_full_depth']:.2f}",
            f"{policy['metric']:.2f} ({policy['avg_exit_layer']:.2f})",
            f"{plan['epochs']:g}, {plan['total_steps']}"
            f"{' (stopped early)' if plan['stopped_early'] else ''}",
        ])  # fmt: skip
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["sst2"])
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/few_shot")
    parser.add_argument(
        "--score-on",
        choices=("dev", "heldout"),
        default="dev",
        help="dev: the task's dev set; heldout: 1,000 whole training sentences the subset "
        "does not contain (to choose a change without looking at dev)",
    )
    parser.add_argument(
        "--config",
        type=json.loads,
        default={},
        help="TrainConfig fields to change from the defaults, as JSON: '{\"lr\": 3e-5}'",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [
            run_task(name, args.rows, args.seed, Path(tmp), args.config, args.score_on)
            for name in args.tasks
        ]
    write_results(args.out, results, markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
