"""Where a benchmark script's results go: ``OUT.json`` (every figure, for later analysis) beside
``OUT.md`` (the table BENCHMARKS.md quotes), ``OUT`` being the script's ``--out``."""

from __future__ import annotations

import json
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
