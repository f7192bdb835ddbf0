"""Make a non-GLUE classification task from the four papers eeengine implements: which paper
(ELBERT, BERxiT, MPEE, PCEE-BERT) does a sentence come from? Four classes, so it exercises
C > 2 and label names inferred from a user file.

Writes ``OUT/train.csv`` and ``OUT/dev.csv`` (columns ``sentence``, ``paper``; 80 / 20 split,
shuffled with a fixed seed). Sentences are the prose of each ``PAPER.txt``: split at sentence
ends, 40-400 characters, with at least 60 % letters (drops tables, equations and reference
lists). Then train and evaluate as with any user file:

    python examples/papers_task.py --papers ../shared/papers --out /tmp/papers
    eeengine train --train-file /tmp/papers/train.csv --dev-file /tmp/papers/dev.csv \\
        --text-column sentence --label-column paper --epochs 3 --max-seq-length 128 \\
        --out /tmp/papers-ckpt
    eeengine eval --ckpt /tmp/papers-ckpt
    eeengine predict --ckpt /tmp/papers-ckpt "we propose a learning-to-exit module"
"""

from __future__ import annotations

import argparse
import csv
import random
import re
from pathlib import Path

MIN_CHARS, MAX_CHARS, MIN_LETTERS = 40, 400, 0.6
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def sentences(text: str) -> list[str]:
    """The prose sentences of a paper's text, whitespace collapsed."""
    result = []
    for paragraph in text.split("\n\n"):
        for sentence in SENTENCE_END.split(" ".join(paragraph.split())):
            letters = sum(ch.isalpha() for ch in sentence)
            if MIN_CHARS <= len(sentence) <= MAX_CHARS and letters >= MIN_LETTERS * len(sentence):
                result.append(sentence)
    return result


def make_task(papers: Path, out: Path, dev_share: float = 0.2, seed: int = 0) -> dict[str, int]:
    """Write ``out/train.csv`` and ``out/dev.csv``.

    Returns:
        Rows per file, ``{"train": n, "dev": m}``.

    Raises:
        FileNotFoundError: no ``*.txt`` under ``papers``.
    """
    rows = [
        (sentence, path.stem)
        for path in sorted(papers.glob("*.txt"))
        for sentence in sentences(path.read_text(encoding="utf-8"))
    ]
    if not rows:
        raise FileNotFoundError(f"no paper text (*.txt) under {papers}")
    random.Random(seed).shuffle(rows)
    cut = round(len(rows) * (1 - dev_share))
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:cut]), ("dev", rows[cut:])):
        with open(out / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["sentence", "paper"])
            writer.writerows(part)
    return {"train": cut, "dev": len(rows) - cut}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--papers", type=Path, default=Path("../shared/papers"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(make_task(args.papers, args.out))


if __name__ == "__main__":
    main()
