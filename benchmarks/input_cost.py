"""What one huge input costs ``Engine.predict`` next to a maximal (512-token) one (issue 16).

A MiniLM-L6-sized checkpoint (the installed all-MiniLM-L6-v2 backbone, untrained exit heads:
cost does not depend on them) at ``max_seq_length`` 512, full depth (policy ``none``, so every
input runs all 6 layers). Inputs: a long IMDB review (truncated to 512 tokens), a 10 MB string
that is one word, and a 10 MB string of five million short words. Timed side by side in one
process, interleaved, batch 1, median of ``--repeats``; ``--before`` also times the 10 MB
inputs once each without the character cut (the behaviour before issue 16).

    python benchmarks/input_cost.py --repeats 15 --before \\
        --out benchmarks/results/input_cost.json
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import eeengine.engine as engine_module
from eeengine import Engine
from eeengine.checkpoint import save_checkpoint
from eeengine.data import DATA_DIR
from eeengine.defaults import minilm_dir
from eeengine.modeling_multiexit import MultiExitBert, load_backbone_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import tiny_manifest  # noqa: E402 (the tests' SST-2 manifest)


def minilm_checkpoint(path: Path) -> Path:
    """all-MiniLM-L6-v2 with random exit heads, max_seq_length 512, policy none."""
    from transformers import AutoTokenizer

    config, state = load_backbone_weights(minilm_dir())
    torch.manual_seed(0)
    model = MultiExitBert(config, 2)
    model.bert.load_state_dict(state)
    manifest = tiny_manifest(policy={"name": "none"}, max_seq_length=512)
    return save_checkpoint(
        path, model.eval(), AutoTokenizer.from_pretrained(minilm_dir()), manifest
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--before", action="store_true")
    parser.add_argument("--executor", default="torch", help="torch or onnxruntime")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    with open(DATA_DIR / "IMDB-long" / "reviews.tsv", newline="", encoding="utf-8") as f:
        reviews = [row[0] for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)][1:]
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(minilm_checkpoint(Path(tmp) / "minilm"), executor=args.executor)
        review = next(r for r in reviews if len(engine.tokenizer(r)["input_ids"]) > 600)
        inputs = {
            "512-token review": review,
            "10 MB, one word": "x" * 10_000_000,
            "10 MB, 5M short words": "a " * 5_000_000,
        }
        times: dict[str, list[float]] = {name: [] for name in inputs}
        for text in inputs.values():  # warm-up
            engine.predict(text)
        for _ in range(args.repeats):
            for name, text in inputs.items():
                started = time.perf_counter()
                engine.predict(text)
                times[name].append((time.perf_counter() - started) * 1e3)
        median = {name: statistics.median(t) for name, t in times.items()}
        base = median["512-token review"]
        result = {
            "command": "python benchmarks/input_cost.py " + " ".join(sys.argv[1:]),
            "executor": engine.executor,
            "median_ms": {k: round(v, 2) for k, v in median.items()},
            "ratio_to_512_tokens": {k: round(v / base, 2) for k, v in median.items()},
        }
        if args.before:  # no character cut: the tokenizer reads all 10 MB
            engine_module.char_limit = lambda max_length: None
            before = {}
            for name, text in list(inputs.items())[1:]:
                started = time.perf_counter()
                engine.predict(text)
                before[name] = round((time.perf_counter() - started) * 1e3, 1)
            result["before_cut_ms"] = before
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
