"""Bulk scoring (eeengine score): every format in and out, input order, resumption after an
interruption, and bad input, against Engine.predict on the same rows."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from eeengine.checkpoint import save_checkpoint
from eeengine.cli import main
from eeengine.engine import Engine
from eeengine.score_parts import parts_dir
from eeengine.scoring import ScoreJob, read_chunks, rechunk, score_file
from tests.conftest import SENTENCES, make_tiny_model, tiny_manifest, write_rows

# Texts that stress the readers: commas, quotes (plain characters in TSV), non-ASCII, a number.
TEXTS = [*SENTENCES, 'he said "wow", then left', "naïve café, déjà vu", "12345", "a, b, c"] * 3


def _texts(kind: str) -> list[str]:
    """36 rows (several chunks of 5 and a short last one); CSV also has a quoted newline."""
    texts = list(TEXTS)
    if kind == "csv":
        texts[1] = "line one\nline two"
    return texts


def _write_input(path, kind: str, texts: list[str], pairs: list[str] | None = None) -> None:
    """An input with columns id (numbers), text [, pair] and an unused column."""
    header = ["id", "text", *(["pair"] if pairs else []), "unused"]
    rows = [
        [100 + i, text, *([pairs[i]] if pairs else []), "x" * (i % 3)]
        for i, text in enumerate(texts)
    ]
    if kind == "parquet":
        pq.write_table(
            pa.table({name: [row[j] for row in rows] for j, name in enumerate(header)}),
            path,
            row_group_size=7,  # resuming skips whole row groups
        )
    else:
        write_rows(path, header, rows)


def _read_output(path) -> list[dict]:
    kind = path.suffix[1:]
    if kind == "parquet":
        return pq.read_table(path).to_pylist()
    if kind == "jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    options = pacsv.ParseOptions(delimiter="," if kind == "csv" else "\t")
    convert = pacsv.ConvertOptions(column_types={"id": pa.string()})
    return pacsv.read_csv(path, parse_options=options, convert_options=convert).to_pylist()


def _settings(ckpt, **kwargs) -> dict:
    return {"checkpoint": str(ckpt), **kwargs}


@pytest.mark.parametrize(
    ("source", "target"),
    [("csv", "jsonl"), ("tsv", "csv"), ("jsonl", "parquet"), ("parquet", "tsv")],
)
def test_rows_match_engine_predict_in_input_order(tiny_ckpt, tmp_path, source, target):
    texts = _texts(source)
    _write_input(tmp_path / f"in.{source}", source, texts)
    job = ScoreJob(tmp_path / f"in.{source}", tmp_path / f"out.{target}", "text", None, "id", 5)
    # τ = 0.5 nats: the tiny model's rows exit at layer 1 or 2
    summary = score_file(job, _settings(tiny_ckpt, threshold=0.5), batch_size=4, progress=False)

    expected = Engine(tiny_ckpt, threshold=0.5).predict(texts, batch_size=4)
    rows = _read_output(job.output)
    assert [r["row"] for r in rows] == list(range(len(texts)))
    ids = [r["id"] for r in rows]
    assert ids == (
        [100 + i for i in range(len(texts))]
        if source == "parquet" and target != "tsv"
        else [str(100 + i) for i in range(len(texts))]
    )
    assert [r["label"] for r in rows] == [p.label for p in expected]
    assert [r["exit_layer"] for r in rows] == [p.exit_layer for p in expected]
    assert [r["score"] for r in rows] == pytest.approx([p.score for p in expected], abs=1e-6)
    assert len({p.exit_layer for p in expected}) > 1  # rows exit at different layers
    assert summary.rows == len(texts) and summary.resumed_rows == 0
    assert summary.avg_exit_layer == pytest.approx(
        sum(p.exit_layer for p in expected) / len(expected)
    )
    assert not parts_dir(job.output).exists()


def test_sentence_pairs(tiny_ckpt, tmp_path):
    texts = _texts("csv")[:12]
    pairs = list(reversed(texts))
    _write_input(tmp_path / "in.csv", "csv", texts, pairs)
    job = ScoreJob(tmp_path / "in.csv", tmp_path / "out.jsonl", "text", "pair", chunk_rows=5)
    score_file(job, _settings(tiny_ckpt), progress=False)
    expected = Engine(tiny_ckpt).predict(list(zip(texts, pairs, strict=True)))
    rows = _read_output(job.output)
    assert [(r["label"], r["exit_layer"]) for r in rows] == [
        (p.label, p.exit_layer) for p in expected
    ]
    assert set(rows[0]) == {"row", "label", "score", "exit_layer"}


def test_regression_writes_values(tiny_bert_dir, tokenizer, tmp_path):
    manifest = tiny_manifest({"name": "patience", "patience": 1, "threshold": 0.05})
    manifest["task"] = {
        "name": "stsb",
        "type": "regression",
        "label_names": None,
        "metric": "pearson",
    }
    ckpt = save_checkpoint(
        tmp_path / "reg", make_tiny_model(tiny_bert_dir, num_labels=1), tokenizer, manifest
    )
    texts = _texts("csv")[:9]
    _write_input(tmp_path / "in.csv", "csv", texts)
    job = ScoreJob(tmp_path / "in.csv", tmp_path / "out.parquet", "text", chunk_rows=4)
    score_file(job, _settings(ckpt), progress=False)
    rows = _read_output(job.output)
    expected = Engine(ckpt).predict(texts)
    assert set(rows[0]) == {"row", "value", "exit_layer"}
    assert [r["value"] for r in rows] == pytest.approx([p.value for p in expected], abs=1e-6)


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_interrupted_run_resumes_without_losing_or_repeating_a_row(
    tiny_ckpt, tmp_path, monkeypatch, kind
):
    texts = _texts(kind)
    _write_input(tmp_path / f"in.{kind}", kind, texts)
    whole = ScoreJob(tmp_path / f"in.{kind}", tmp_path / f"whole.{kind}", "text", None, "id", 5)
    score_file(whole, _settings(tiny_ckpt), progress=False)

    job = ScoreJob(tmp_path / f"in.{kind}", tmp_path / f"out.{kind}", "text", None, "id", 5)
    calls = []
    predict = Engine.predict

    def interrupted(self, inputs, batch_size=32):
        calls.append(len(inputs))
        if len(calls) == 4:  # dies while scoring the 4th chunk
            raise _Interrupt
        return predict(self, inputs, batch_size)

    monkeypatch.setattr(Engine, "predict", interrupted)
    with pytest.raises(_Interrupt):
        score_file(job, _settings(tiny_ckpt), progress=False)
    assert not job.output.exists()
    parts = parts_dir(job.output)
    assert len(list(parts.glob("part-*"))) == 3
    (parts / f".part-00000003.{kind}.tmp-torn").write_bytes(b"half a part")  # a torn write

    calls.clear()
    monkeypatch.setattr(Engine, "predict", predict)
    summary = score_file(job, _settings(tiny_ckpt), progress=False)
    assert summary.resumed_rows == 15 and summary.rows == len(texts)
    assert job.output.read_bytes() == whole.output.read_bytes()
    assert not parts.exists()


def test_resuming_with_other_settings_is_refused(tiny_ckpt, tmp_path, monkeypatch):
    _write_input(tmp_path / "in.csv", "csv", _texts("csv"))
    job = ScoreJob(tmp_path / "in.csv", tmp_path / "out.csv", "text", chunk_rows=5)
    monkeypatch.setattr(Engine, "predict", lambda *a, **k: (_ for _ in ()).throw(_Interrupt()))
    with pytest.raises(_Interrupt):
        score_file(job, _settings(tiny_ckpt), progress=False)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="engine differ"):
        score_file(job, _settings(tiny_ckpt, policy="none"), progress=False)
    other = ScoreJob(tmp_path / "in.csv", tmp_path / "out.csv", "text", chunk_rows=6)
    with pytest.raises(ValueError, match="chunk_rows differ"):
        score_file(other, _settings(tiny_ckpt), progress=False)
    score_file(job, _settings(tiny_ckpt), progress=False)  # the same job still resumes
    assert len(_read_output(job.output)) == len(TEXTS)


def test_existing_output_needs_overwrite(tiny_ckpt, tmp_path):
    _write_input(tmp_path / "in.csv", "csv", _texts("csv"))
    (tmp_path / "out.csv").write_text("keep me")
    job = ScoreJob(tmp_path / "in.csv", tmp_path / "out.csv", "text")
    with pytest.raises(ValueError, match="--overwrite"):
        score_file(job, _settings(tiny_ckpt), progress=False)
    assert (tmp_path / "out.csv").read_text() == "keep me"
    score_file(job, _settings(tiny_ckpt), overwrite=True, progress=False)
    assert len(_read_output(job.output)) == len(TEXTS)


@pytest.mark.parametrize(
    ("kind", "content", "message"),
    [
        ("csv", "id,txt\n1,a\n", "column 'text' is missing; the columns are 'id', 'txt'"),
        ("csv", "id,text\n1,fine\n2,\n", "row 1: column 'text' is empty"),
        ("csv", "id,text\n1,a,b\n", "Expected 2 columns, got 3"),
        ("jsonl", '{"id": 1, "text": "ok"}\n\n{"id": 2}\n', "in.jsonl:3: column 'text' is missing"),
        ("jsonl", '{"id": 1, "text": 5}\n', "column 'text' is not a string"),
        ("jsonl", "{nope\n", "not valid JSON"),
        ("csv", "id,text\n", "no rows to score"),
    ],
)
def test_bad_input_is_named(tiny_ckpt, tmp_path, kind, content, message):
    (tmp_path / f"in.{kind}").write_text(content)
    job = ScoreJob(tmp_path / f"in.{kind}", tmp_path / "out.csv", "text", chunk_rows=1)
    with pytest.raises(ValueError, match=message):
        score_file(job, _settings(tiny_ckpt), progress=False)
    assert not (tmp_path / "out.csv").exists()


def test_job_validation(tmp_path):
    (tmp_path / "in.csv").write_text("text\na\n")
    with pytest.raises(ValueError, match="unknown file type '.xlsx'"):
        ScoreJob(tmp_path / "in.csv", tmp_path / "out.xlsx", "text")
    with pytest.raises(FileNotFoundError):
        ScoreJob(tmp_path / "none.csv", tmp_path / "out.csv", "text")
    with pytest.raises(ValueError, match="clashes"):
        ScoreJob(tmp_path / "in.csv", tmp_path / "out.csv", "text", id_column="label")
    with pytest.raises(ValueError, match="chunk_rows"):
        ScoreJob(tmp_path / "in.csv", tmp_path / "out.csv", "text", chunk_rows=0)


def test_rechunk_and_skip():
    tables = [pa.table({"x": list(range(a, b))}) for a, b in [(0, 3), (3, 4), (4, 11), (11, 12)]]
    chunks = list(rechunk(tables, 5, skip=2))
    assert [c.column("x").to_pylist() for c in chunks] == [[2, 3, 4, 5, 6], [7, 8, 9, 10, 11]]
    assert list(rechunk(tables, 5, skip=12)) == []


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_read_chunks_skips_to_a_row(tmp_path, kind):
    texts = _texts(kind)
    _write_input(tmp_path / f"in.{kind}", kind, texts)
    job = ScoreJob(tmp_path / f"in.{kind}", tmp_path / "out.csv", "text", chunk_rows=5)
    chunks = list(read_chunks(job, skip=10))
    assert [c.num_rows for c in chunks] == [5] * 5 + [1]
    assert sum((c.column("text").to_pylist() for c in chunks), []) == texts[10:]
    assert list(read_chunks(job, skip=len(texts) + 3)) == []


def test_cli_score(tiny_ckpt, tmp_path, capsys):
    _write_input(tmp_path / "in.csv", "csv", _texts("csv"))
    argv = ["score", "--ckpt", str(tiny_ckpt), "--input", str(tmp_path / "in.csv")]
    argv += ["--output", str(tmp_path / "out.csv"), "--text-column", "text", "--id-column", "id"]
    assert main([*argv, "--chunk-rows", "8", "--batch-size", "3", "--policy", "none"]) == 0
    assert f"wrote {len(TEXTS)} rows to" in capsys.readouterr().out
    rows = _read_output(tmp_path / "out.csv")
    assert {r["exit_layer"] for r in rows} == {4}  # --policy none: full depth
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
