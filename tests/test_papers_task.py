"""examples/papers_task.py: the sentence filter by hand, and the CSVs it writes train a model
through the user-file path (labels inferred from the file)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

from eeengine.data import file_dataset

SPEC = importlib.util.spec_from_file_location(
    "papers_task", Path(__file__).parents[1] / "examples" / "papers_task.py"
)
papers_task = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(papers_task)

PROSE = "We propose a new exit rule for transformer encoders. It works well on GLUE tasks."
TABLE = "| 1.0 | 2.0 | 3.0 | 4.0 | 5.0 | 6.0 | 7.0 | 8.0 | 9.0 | 10.0 | 11.0 |"


def test_sentences_keeps_prose_and_drops_tables_and_fragments() -> None:
    text = f"{PROSE}\n\n{TABLE}\n\nShort one. Too short."
    assert (
        papers_task.sentences(text)
        == [
            "We propose a new exit rule for transformer encoders.",
            "It works well on GLUE tasks.",
        ][:1]
    )  # the second is under 40 characters


def test_make_task_splits_every_sentence_once(tmp_path: Path) -> None:
    papers = tmp_path / "papers"
    papers.mkdir()
    for name in ("A", "B"):
        lines = [
            f"Paper {name} sentence number {i} says something about early exits." for i in range(10)
        ]
        (papers / f"{name}.txt").write_text(" ".join(lines))
    counts = papers_task.make_task(papers, tmp_path / "out", dev_share=0.2)
    assert counts == {"train": 16, "dev": 4}
    rows = [
        row
        for name in ("train", "dev")
        for row in csv.DictReader(open(tmp_path / "out" / f"{name}.csv", encoding="utf-8"))
    ]
    assert len({row["sentence"] for row in rows}) == 20
    assert all(row["sentence"].startswith(f"Paper {row['paper']} ") for row in rows)
    data = file_dataset(
        tmp_path / "out" / "train.csv", tmp_path / "out" / "dev.csv", "sentence", "paper"
    )
    assert tuple(data.label_names) == ("A", "B")


def test_make_task_without_papers_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no paper text"):
        papers_task.make_task(tmp_path, tmp_path / "out")
