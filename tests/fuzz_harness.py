"""The property every fuzz case must satisfy (issue 16), the checkpoints and the cases; the
damage is :mod:`tests.fuzz_damage`, the random inputs :mod:`tests.fuzz_inputs`.

Shared by the CI suite (``tests/test_fuzz.py``, hypothesis) and the long campaign
(``benchmarks/fuzz_campaign.py``). Every case ends in one *outcome*, a short string; those
holding ``FAIL`` anywhere (:func:`is_failure`; a checkpoint case's outcome starts with the
stage, ``"load: FAIL ..."``) break the property. It holds when the outcome is:

- a documented exception: ``FileNotFoundError`` / ``CheckpointError`` naming the checkpoint's
  path, ``ValueError`` (a bad policy or threshold stored in the checkpoint, a bad input),
  ``TypeError`` (a bad input), ``NonFiniteLogitsError`` (NaN logits, input and layer named);
- or a prediction whose label is one of the checkpoint's labels, with finite probabilities
  that sum to 1 and an exit layer within the model.

Around every case the harness also checks that a reference engine still answers a known input
exactly as before and that nothing on disk changed (see :class:`DiskGuard`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import random
import re
from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers import BertModel as HFBertModel

from eeengine import Engine, Prediction
from eeengine.checkpoint import CALIBRATION, CheckpointError, save_checkpoint, write_json_atomic
from eeengine.cli import build_parser
from eeengine.cli import main as cli_main
from eeengine.defaults import minilm_dir
from eeengine.modeling_multiexit import MultiExitBert
from eeengine.runtime import NonFiniteLogitsError
from tests.conftest import (
    SENTENCES,
    make_tiny_model,
    tiny_config,
    tiny_manifest,
    tiny_roberta_config,
)

KNOWN = "a gorgeous, witty, seductive movie."
ENGINE_ARGS = ({}, {"policy": "max_prob"}, {"max_drop": 50.0})


# --------------------------------------------------------------------------- checkpoints


def build_checkpoints(root: Path) -> dict[str, Path]:
    """The fuzzed checkpoint and two others to swap files with.

    ``main``: tiny BERT (4 layers, hidden 32), MiniLM tokenizer, 2 labels, entropy policy, a
    calibration.json. ``roberta``: tiny RoBERTa, 3 labels, shared pooler, [CLS] pooling.
    ``small_vocab``: tiny BERT of 2,000 embedding rows with the MiniLM vocabulary cut to match.
    """
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(0)
    bert_dir = root / "tiny-bert"
    HFBertModel(tiny_config()).save_pretrained(bert_dir)
    paths = {}
    main = save_checkpoint(root / "main", make_tiny_model(bert_dir), tokenizer, tiny_manifest())
    engine = Engine(main, executor="torch")
    engine.calibrate(SENTENCES, [i % 2 for i in range(len(SENTENCES))], max_drop=100.0)
    write_json_atomic(main / CALIBRATION, engine.calibration)
    paths["main"] = main

    torch.manual_seed(2)
    roberta = MultiExitBert(tiny_roberta_config(), 3, pooling="cls", layout="shared_pooler")
    manifest = tiny_manifest()
    manifest["backbone"] = "roberta"
    manifest["task"]["label_names"] = ["a", "b", "c"]
    manifest["exit_heads"] = {"layout": "shared_pooler", "pooling": "cls"}
    paths["roberta"] = save_checkpoint(root / "roberta", roberta.eval(), tokenizer, manifest)

    small = root / "small_vocab"
    torch.manual_seed(3)
    save_checkpoint(
        small, MultiExitBert(tiny_config(vocab_size=2000), 2).eval(), tokenizer, tiny_manifest()
    )
    data = json.loads((small / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    data["model"]["vocab"] = {token: i for token, i in vocab.items() if i < 2000}
    (small / "tokenizer.json").write_text(json.dumps(data))
    paths["small_vocab"] = small
    Engine(small, executor="torch")  # the cut tokenizer and the 2,000 rows agree
    return paths


# --------------------------------------------------------------------------- the property


def is_failure(outcome: str) -> bool:
    """Whether a case's outcome breaks the property: ``FAIL`` anywhere in it, since a
    checkpoint case prefixes its stage (``"load: FAIL undocumented KeyError: ..."``). Outcomes
    that hold never contain ``FAIL``: they name an exception's type, never its message."""
    return "FAIL" in outcome


def outcome_kind(outcome: str) -> str:
    """The outcome to tally: a failure cut to its stage and kind (``"load: FAIL undocumented
    KeyError"``, the message dropped), any other outcome as it is (they are short)."""
    if not is_failure(outcome):
        return outcome
    stage, _, rest = outcome.partition("FAIL")
    return stage + "FAIL" + rest.split(": ", 1)[0][:60]


def check_prediction(prediction: object, label_names: list[str], num_layers: int) -> str:
    """``"prediction"`` for a valid one, else ``"FAIL garbage: ..."``."""
    if not isinstance(prediction, Prediction):
        return f"FAIL garbage: not a Prediction: {type(prediction).__name__}"
    probs = prediction.probs or {}
    values = list(probs.values())
    problems = []
    if prediction.label not in label_names:
        problems.append(f"label {prediction.label!r} not in {label_names}")
    if list(probs) != list(label_names):
        problems.append(f"probs keys {list(probs)}")
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
        problems.append(f"probs {values}")
    elif abs(sum(values) - 1.0) > 1e-5:
        problems.append(f"probs sum to {sum(values)}")
    if not all(math.isfinite(v) for v in prediction.logits):
        problems.append(f"logits {prediction.logits}")
    if prediction.score is None or prediction.score != max(values, default=None):
        problems.append(f"score {prediction.score}")
    if not 1 <= prediction.exit_layer <= num_layers:
        problems.append(f"exit_layer {prediction.exit_layer}")
    return "FAIL garbage: " + "; ".join(problems) if problems else "prediction"


def _error(error: BaseException, path: Path | None = None) -> str:
    kind = type(error).__name__
    if isinstance(error, (FileNotFoundError, CheckpointError)):
        if path is not None and str(path) not in str(error):
            return f"FAIL unnamed {kind}: {error}"[:300]
        return f"named {kind}"
    if isinstance(error, NonFiniteLogitsError):
        return "named NonFiniteLogitsError"
    if isinstance(error, (ValueError, TypeError)):
        return f"{kind}"
    return f"FAIL undocumented {kind}: {error}"[:300]


def load_case(path: Path, rng: random.Random) -> str:
    """Load a (damaged) checkpoint and predict a known input; the outcome. Loading documents
    FileNotFoundError, CheckpointError and ValueError only: a TypeError there fails."""
    kwargs = rng.choice(ENGINE_ARGS)
    try:
        engine = Engine(path, executor="torch", **kwargs)
    except TypeError as error:
        return f"load: FAIL undocumented TypeError: {error}"[:300]
    except Exception as error:  # noqa: BLE001 (classified)
        return "load: " + _error(error, path)
    try:
        predictions = engine.predict([KNOWN, SENTENCES[1]])
    except Exception as error:  # noqa: BLE001
        return "predict: " + _error(error, path)
    outcomes = {
        check_prediction(p, engine.label_names or [], engine.num_layers) for p in predictions
    }
    return "loaded: " + " / ".join(sorted(outcomes))


def predict_case(engine: Engine, inputs: object, batch_size: object = 32) -> str:
    """``engine.predict(inputs, batch_size)``; the outcome (every prediction checked)."""
    try:
        result = engine.predict(inputs, batch_size=batch_size)
    except Exception as error:  # noqa: BLE001
        return _error(error)
    results = result if isinstance(result, list) else [result]
    expected = len(inputs) if isinstance(inputs, list) else 1
    if len(results) != expected:
        return f"FAIL garbage: {len(results)} predictions for {expected} inputs"
    outcomes = {check_prediction(p, engine.label_names, engine.num_layers) for p in results}
    bad = sorted(o for o in outcomes if is_failure(o))
    return bad[0] if bad else "prediction"


def cli_case(argv: list[str], label_names: list[str]) -> str:
    """``eeengine`` in process: exit 0 with one valid answer per text, a usage error (exit 2
    from argparse), or ``eeengine: error: ...`` on stderr with exit 2."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli_main(argv)
    except SystemExit as exit:
        return "usage error" if exit.code == 2 else f"FAIL exit {exit.code}: {err.getvalue()}"
    except Exception as error:  # noqa: BLE001
        return f"FAIL undocumented {type(error).__name__}: {error}"[:300]
    if code != 0:
        message = err.getvalue()
        if not message.startswith("eeengine: error: ") or "Traceback" in message:
            return f"FAIL exit {code} without a message: {message[:200]}"
        return "error message"
    texts = build_parser().parse_args(argv).texts
    if "--json" in argv:
        rows = json.loads(out.getvalue())
        bad = [
            r
            for r in rows
            if r["label"] not in label_names or abs(sum(r["probs"].values()) - 1) > 1e-5
        ]
        return f"FAIL garbage: {bad[:1]}" if bad or len(rows) != len(texts) else "answers"
    # One "label  score%  exit k/L  text" line per text; a text may hold newlines itself.
    answer = re.compile(rf"^({'|'.join(map(re.escape, label_names))}) +\d+\.\d%  exit \d+/\d+  ")
    answers = [line for line in out.getvalue().split("\n") if answer.match(line)]
    if len(answers) != len(texts):
        return (
            f"FAIL garbage: {len(answers)} answers for {len(texts)} texts: {out.getvalue()[:200]!r}"
        )
    return "answers"


class KnownAnswer:
    """A reference engine and its answer to :data:`KNOWN`, checked after every case."""

    def __init__(self, path: Path) -> None:
        self.engine = Engine(path, executor="torch")
        self.expected = self._answer()

    def _answer(self) -> tuple:
        p = self.engine.predict(KNOWN)
        return p.label, p.exit_layer, p.logits, p.probs

    def check(self) -> str | None:
        """None when the engine answers as before, else a FAIL outcome."""
        actual = self._answer()
        return None if actual == self.expected else f"FAIL known input: now {actual}"


class DiskGuard:
    """What is on disk under ``root``: :meth:`changes` lists the files added, removed or
    changed since construction (size and modification time; with ``content``, SHA-256 too)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.snapshot = self._take(content=True)

    def _take(self, content: bool) -> dict[str, tuple]:
        state = {}
        for file in sorted(self.root.rglob("*")):
            if file.is_file():
                stat = file.stat()
                digest = hashlib.sha256(file.read_bytes()).hexdigest() if content else None
                state[str(file.relative_to(self.root))] = (stat.st_size, stat.st_mtime_ns, digest)
        return state

    def changes(self, content: bool = False) -> list[str]:
        now = self._take(content)
        keep = 3 if content else 2
        return sorted(
            name
            for name in now.keys() | self.snapshot.keys()
            if (now.get(name) or ())[:keep] != (self.snapshot.get(name) or ())[:keep]
        )
