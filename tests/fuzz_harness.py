"""Damage, random inputs and the property every fuzz case must satisfy (issue 16).

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
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
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

FILES = (
    "eeengine.json",
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    CALIBRATION,
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


# --------------------------------------------------------------------------- damage


KINDS = ("missing", "truncated", "bit-flipped", "swapped", "json-edit", "non-finite")
JSON_EDITED = ("eeengine.json", "config.json", CALIBRATION, "tokenizer_config.json")


def damage(path: Path, others: list[Path], rng: random.Random) -> str:
    """Damage the checkpoint at ``path`` in one of :data:`KINDS` (one file); returns what was
    done, as ``"file: kind: detail"``. ``others``: checkpoints to take a file from for a swap."""
    kind = rng.choice(KINDS)
    if kind == "json-edit":
        name = rng.choice(JSON_EDITED[:2] * 3 + JSON_EDITED)
        return f"{name}: json edit: " + edit_json(path / name, rng)
    if kind == "non-finite":
        state = load_file(path / "model.safetensors")
        key = rng.choice(sorted(state))
        value = rng.choice((float("nan"), float("inf"), float("-inf")))
        state[key].view(-1)[rng.randrange(state[key].numel())] = value
        save_file(state, path / "model.safetensors")
        return f"model.safetensors: non-finite: {value} in {key}"
    name = rng.choice(FILES)
    file = path / name
    if kind == "missing":
        file.unlink()
        return f"{name}: missing:"
    if kind == "swapped":
        other = rng.choice(others)
        if (other / name).exists():
            shutil.copyfile(other / name, file)
        else:
            file.unlink()
        return f"{name}: swapped: with {other.name}'s"
    data = file.read_bytes()
    if kind == "truncated":
        offset = rng.randrange(len(data))
        file.write_bytes(data[:offset])
        return f"{name}: truncated: at {offset} of {len(data)}"
    flipped = bytearray(data)
    flips = []
    for _ in range(rng.randint(1, 8)):
        # Half the flips in the first 16 KiB: the safetensors header, the JSON structure.
        end = min(len(data), 16384) if rng.random() < 0.5 else len(data)
        offset = rng.randrange(end)
        bit = rng.randrange(8)
        flipped[offset] ^= 1 << bit
        flips.append(f"{offset}:{bit}")
    file.write_bytes(bytes(flipped))
    return f"{name}: bit-flipped: at {' '.join(flips)}"


def random_json_value(rng: random.Random, depth: int = 0) -> object:
    """A JSON-representable value of a random kind (NaN and infinities included: Python's json
    writes them)."""
    kinds = ["null", "bool", "int", "big", "float", "special", "str"]
    if depth < 2:
        kinds += ["list", "dict"]
    kind = rng.choice(kinds)
    if kind == "null":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.randint(-3, 70)
    if kind == "big":
        return rng.choice((-1, 1)) * 10 ** rng.randint(3, 30)
    if kind == "float":
        return rng.uniform(-2, 2) * 10 ** rng.randint(-8, 8)
    if kind == "special":
        return rng.choice((float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-300))
    if kind == "str":
        return random_text(rng, max_size=12)
    if kind == "list":
        return [random_json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {
        random_text(rng, 6): random_json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))
    }


def edit_json(file: Path, rng: random.Random) -> str:
    """1 to 3 random edits of a JSON file (set a value, delete a key, add a key, replace the
    whole document); a missing or non-JSON file gets random JSON."""
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        data = random_json_value(rng)
        file.write_text(json.dumps(data))
        return "replaced by random JSON"
    done = []
    for _ in range(rng.randint(1, 3)):
        containers = _containers(data)
        parent, key = rng.choice(containers) if containers else (None, None)
        action = rng.choice(("set", "set", "set", "delete", "add", "document"))
        if parent is None or action == "document":
            data = random_json_value(rng)
            done.append("document replaced")
            continue
        if action == "delete" and isinstance(parent, dict):
            del parent[key]
            done.append(f"deleted {key!r}")
        elif action == "add" and isinstance(parent, dict):
            new = random_text(rng, 8)
            parent[new] = random_json_value(rng)
            done.append(f"added {new!r}")
        else:
            parent[key] = random_json_value(rng)
            done.append(f"set {key!r} = {parent[key]!r}"[:80])
    file.write_text(json.dumps(data))
    return ", ".join(done)


def _containers(data: object) -> list[tuple[object, object]]:
    """(container, key) of every value in a JSON tree; big lists (tokenizer vocabularies)
    contribute a sample of their entries."""
    found = []
    stack = [data]
    while stack:
        node = stack.pop()
        items = (
            list(node.items())
            if isinstance(node, dict)
            else list(enumerate(node))
            if isinstance(node, list)
            else []
        )
        for key, value in items[:50]:
            found.append((node, key))
            stack.append(value)
    return found


# --------------------------------------------------------------------------- inputs


_RANGES = (
    (0x20, 0x7E),  # ASCII
    (0x00, 0x1F),  # control
    (0x80, 0x24F),  # Latin
    (0x300, 0x36F),  # combining marks
    (0x590, 0x6FF),  # Hebrew, Arabic
    (0x2000, 0x206F),  # punctuation, zero-width, bidi controls
    (0x3000, 0x30FF),  # CJK punctuation, kana
    (0x4E00, 0x9FFF),  # CJK
    (0xE000, 0xF8FF),  # private use
    (0xFFF0, 0xFFFF),  # specials, non-characters
    (0x1F300, 0x1FAFF),  # emoji
    (0x10000, 0x10FFFF),  # anything astral
)


def random_text(rng: random.Random, max_size: int = 40) -> str:
    """A random string: words, whitespace runs, code points from every corner of Unicode
    (a lone surrogate in one string of ten), or empty."""
    kind = rng.random()
    if kind < 0.05:
        return ""
    if kind < 0.1:
        return rng.choice((" ", "\t", "\n", "\u3000", "\u200b", "\x00")) * rng.randint(1, 5)
    if kind < 0.4:
        return " ".join(rng.choice(SENTENCES).split()[: rng.randint(1, 12)])
    chars = []
    for _ in range(rng.randint(1, max_size)):
        low, high = rng.choice(_RANGES)
        chars.append(chr(rng.randint(low, high)))
    if rng.random() < 0.1:  # a lone surrogate, invalid in UTF-8
        chars.insert(rng.randrange(len(chars) + 1), chr(rng.randint(0xD800, 0xDFFF)))
    return "".join(chars)


def random_input(rng: random.Random, depth: int = 0) -> object:
    """Anything a caller might pass to ``Engine.predict``: texts, pairs, lists of them, and
    values of every other Python type, nested."""
    kind = rng.random()
    if kind < 0.35:
        return random_text(rng)
    if kind < 0.45:
        return (random_text(rng), random_text(rng))
    if kind < 0.6 and depth == 0:
        return [random_input(rng, depth + 1) for _ in range(rng.randint(0, 12))]
    if kind < 0.63:
        return rng.choice(("word " * 20_000, "x" * 200_000, "\u00e9" * 50_000))
    return rng.choice(
        (
            None,
            True,
            0,
            -1,
            3.5,
            float("nan"),
            b"bytes",
            bytearray(b"x"),
            ("one",),
            ("a", "b", "c"),
            ("a", 1),
            {"text": "a"},
            {"a", "b"},
            object(),
            torch.tensor([1, 2]),
            range(3),
            iter(["a"]),
            [["nested"]],
            random_json_value(rng),
        )
    )


def random_argv(rng: random.Random, ckpt: Path) -> list[str]:
    """``eeengine predict`` arguments: random texts and options, some of them invalid."""
    argv = ["predict", "--ckpt", str(ckpt), "--executor", "torch"]
    if rng.random() < 0.5:
        argv.append("--json")
    for option, values in (
        ("--batch-size", ("1", "0", "-3", "2.5", "x", "100")),
        ("--threshold", ("0.3", "-1", "nan", "inf", "1e9", "abc", "0")),
        ("--policy", ("entropy", "pcee", "max_prob", "nope", "", "budget")),
        ("--patience", ("1", "0", "-2", "x")),
        ("--param", ("layer=2", "layer=99", "window=x", "=", "junk")),
    ):
        if rng.random() < 0.2:
            argv += [option, rng.choice(values)]
    texts = [random_text(rng).replace("\x00", "") for _ in range(rng.randint(0, 4))]
    # argv never holds NUL (the OS cannot pass it); a leading '-' is an option to argparse.
    return argv + ["--", *texts] if rng.random() < 0.5 else argv + texts


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


def damaged_copy(source: Path, target: Path, others: list[Path], rng: random.Random) -> str:
    """Copy ``source`` to ``target`` and damage the copy (see :func:`damage`)."""
    shutil.copytree(source, target)
    return damage(target, others, rng)
