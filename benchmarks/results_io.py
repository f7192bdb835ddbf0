"""Where a benchmark script's results go: ``OUT.json`` (every figure, for later analysis) beside
``OUT.md`` (the table BENCHMARKS.md quotes), ``OUT`` being the script's ``--out``; and the
Markdown table the scripts write there (:func:`markdown_table`)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path


def write_results(out: Path | str, data: object, markdown: str) -> None:
    """Write ``data`` as indented JSON to ``OUT.json`` and ``markdown`` as is to ``OUT.md``
    (``OUT`` with its suffix replaced), creating the folder.

    Raises:
        TypeError: ``data`` is not JSON-serializable (nothing is written then).
    """
    out = Path(out)
    text = json.dumps(data, indent=2) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(text)
    out.with_suffix(".md").write_text(markdown)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table: ``header``'s column titles, the ``|---|`` line, then a line per row,
    each cell as ``str(cell)`` (format the figures before); every line ends with a newline.

    >>> markdown_table(["a", "b"], [[1, "x"]])
    '| a | b |\\n|---|---|\\n| 1 | x |\\n'

    Raises:
        ValueError: a row has more or fewer cells than ``header`` has titles.
    """
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    for index, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(
                f"row {index} has {len(row)} cells, the header {len(header)} columns: {row!r}"
            )
        lines.append("| " + " | ".join(map(str, row)) + " |")
    return "\n".join(lines) + "\n"
