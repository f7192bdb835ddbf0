"""benchmarks/results_io.py: a script's figures and table land beside each other, in a folder
made for them, and an unserializable report writes nothing; tables are GitHub Markdown."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from results_io import markdown_table, write_results  # noqa: E402


def test_json_and_markdown_beside_each_other(tmp_path):
    out = tmp_path / "new" / "compare_sst2"
    write_results(str(out), {"rows": [1, 2]}, "| a |\n")
    assert json.loads(out.with_suffix(".json").read_text()) == {"rows": [1, 2]}
    assert out.with_suffix(".md").read_text() == "| a |\n"


def test_unserializable_report_writes_nothing(tmp_path):
    out = tmp_path / "x"
    with pytest.raises(TypeError):
        write_results(out, {"bad": object()}, "table")
    assert list(tmp_path.iterdir()) == []


def test_markdown_table_by_hand():
    table = markdown_table(["task", "acc.", ""], [["sst2", f"{89.908:.2f}", ""], ["rte", 55, "x"]])
    assert table == "| task | acc. |  |\n|---|---|---|\n| sst2 | 89.91 |  |\n| rte | 55 | x |\n"
    assert markdown_table(["a"], []) == "| a |\n|---|\n"


def test_markdown_table_row_of_the_wrong_width():
    with pytest.raises(ValueError, match="row 1"):
        markdown_table(["a", "b"], [[1, 2], [3]])
