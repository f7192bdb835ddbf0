"""The user's own CSV / TSV / JSONL files: reading, label inference, every bad-data error
(file, line and column named), and ``eeengine train --train-file`` end to end."""

import json

import pytest

from eeengine import Engine
from eeengine.cli import main
from eeengine.data import file_dataset
from tests.conftest import SENTENCES, write_rows

HEADER = ["text", "other", "label"]


def _task(tmp_path, suffix, train_rows, dev_rows=None, header=HEADER):
    train, dev = tmp_path / f"train{suffix}", tmp_path / f"dev{suffix}"
    write_rows(train, header, train_rows)
    write_rows(dev, header, dev_rows if dev_rows is not None else train_rows)
    return train, dev


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_reads_texts_pairs_and_labels(tmp_path, suffix):
    rows = [['say "hi", ok', "b1", "pos"], ["two", "b2", "neg"], ["three", "b3", "pos"]]
    train, dev = _task(tmp_path, suffix, rows)
    data = file_dataset(train, dev, "text", "label", text_pair_column="other")
    assert data.label_names == ("neg", "pos")  # sorted, not in order of appearance
    assert data.train.texts == ['say "hi", ok', "two", "three"]
    assert data.train.text_pairs == ["b1", "b2", "b3"]
    assert data.train.labels == [1, 0, 1] and data.dev.labels == [1, 0, 1]
    assert data.metric == "accuracy" and data.name == "train"


def test_numeric_labels_are_classes_sorted_by_value(tmp_path):
    rows = [[f"t{i}", "x", label] for i, label in enumerate(["10", "2", "1", "2"])]
    train, dev = _task(tmp_path, ".csv", rows)
    data = file_dataset(train, dev, "text", "label")
    assert data.label_names == ("1", "2", "10")
    assert data.train.labels == [2, 1, 0, 1]


def test_jsonl_numbers_and_regression(tmp_path):
    rows = [["a", "x", 1.5], ["b", "x", 3], ["c", "x", "4.25"]]
    train, dev = _task(tmp_path, ".jsonl", rows)
    data = file_dataset(train, dev, "text", "label", regression=True)
    assert data.label_names is None and data.metric == "pearson"
    assert data.train.labels == [1.5, 3.0, 4.25]


@pytest.mark.parametrize(
    ("suffix", "train_rows", "dev_rows", "kwargs", "message"),
    [
        (
            ".csv",
            [["a", "x", "pos"], ["b", "x", "neg"]],
            None,
            {"label_column": "verdict"},
            r"train\.csv:2: column 'verdict' \(label\) is missing",
        ),
        (
            ".tsv",
            [["a", "x", "pos"], ["  ", "x", "neg"]],
            None,
            {},
            r"train\.tsv:3: column 'text': empty or non-text text",
        ),
        (
            ".jsonl",
            [["a", "x", "pos"], ["b", "x", "neg"]],
            [["a", "x", "pos"], ["b", "x", "neutral"]],
            {},
            r"dev\.jsonl:2: column 'label': label 'neutral' does not occur in the training file",
        ),
        (
            ".csv",
            [["a", "x", "1.5"], ["b", "x", "high"]],
            None,
            {"regression": True},
            r"train\.csv:3: column 'label': regression target 'high' is not a number",
        ),
        (
            ".csv",
            [["a", "x", "pos"], ["b", "x", "pos"]],
            None,
            {},
            r"train\.csv: column 'label' has 1 distinct label",
        ),
        (
            ".csv",
            [["a", "x", "pos"], ["b", "", "neg"]],
            None,
            {"text_pair_column": "other"},
            r"train\.csv:3: column 'other': empty or non-text pair",
        ),
    ],
)
def test_bad_data_names_file_line_and_column(
    tmp_path, suffix, train_rows, dev_rows, kwargs, message
):
    train, dev = _task(tmp_path, suffix, train_rows, dev_rows)
    args = {"text_column": "text", "label_column": "label", **kwargs}
    with pytest.raises(ValueError, match=message):
        file_dataset(train, dev, **args)


def test_malformed_files(tmp_path):
    bad_json = tmp_path / "train.jsonl"
    bad_json.write_text('{"text": "a", "label": "x"}\n{oops\n')
    with pytest.raises(ValueError, match=r"train\.jsonl:2: not valid JSON"):
        file_dataset(bad_json, bad_json, "text", "label")
    ragged = tmp_path / "train.csv"
    ragged.write_text("text,label\na,pos\nb,neg,extra\n")
    with pytest.raises(ValueError, match=r"train\.csv:3: 3 fields, the header has 2"):
        file_dataset(ragged, ragged, "text", "label")
    with pytest.raises(ValueError, match="unknown file type '.xlsx'"):
        file_dataset(tmp_path / "train.xlsx", ragged, "text", "label")
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        file_dataset(tmp_path / "missing.csv", ragged, "text", "label")


def test_cli_train_on_a_csv_end_to_end(tiny_bert_dir, tmp_path, capsys):
    rows = [[text, "x", "yes" if i % 3 else "no"] for i, text in enumerate(SENTENCES * 4)]
    train, dev = _task(tmp_path, ".csv", rows, rows[:10])
    out = tmp_path / "my-model"
    args = ["train", "--base-model", str(tiny_bert_dir), "--out", str(out)]
    args += ["--train-file", str(train), "--dev-file", str(dev)]
    args += ["--text-column", "text", "--label-column", "label", "--batch-size", "16"]
    args += ["--recipe", "alternating", "--layout", "shared_pooler", "--pooling", "cls"]
    assert main(args) == 0
    assert f"saved {out}" in capsys.readouterr().out
    manifest = json.loads((out / "eeengine.json").read_text())
    assert manifest["task"]["label_names"] == ["no", "yes"]
    assert manifest["training"]["config"]["train_file"] == str(train)
    assert Engine(out).predict("a masterpiece").label in ("no", "yes")
    assert main(["predict", "--ckpt", str(out), "a masterpiece"]) == 0
    capsys.readouterr()

    assert main(["eval", "--ckpt", str(out), "--json"]) == 0  # its own dev file
    report = json.loads(capsys.readouterr().out)
    assert (report["split"], report["examples"], len(report["per_exit"])) == ("dev.csv", 10, 4)
    other = tmp_path / "other.jsonl"
    write_rows(other, HEADER, [["fine", "x", "yes"], ["awful", "x", "maybe"]])
    assert main(["eval", "--ckpt", str(out), "--dev-file", str(other)]) == 2
    assert "other.jsonl:2: column 'label': label 'maybe' does not occur in the labels of" in (
        capsys.readouterr().err
    )


def test_cli_eval_dev_file_needs_a_user_file_checkpoint(tiny_ckpt, tmp_path, capsys):
    dev = tmp_path / "dev.csv"
    write_rows(dev, HEADER, [["fine", "x", "positive"]])
    assert main(["eval", "--ckpt", str(tiny_ckpt), "--dev-file", str(dev)]) == 2
    assert "--dev-file needs a checkpoint trained with --train-file" in capsys.readouterr().err


def test_cli_train_reports_bad_data(tiny_bert_dir, tmp_path, capsys):
    train, dev = _task(tmp_path, ".csv", [["a", "x", "pos"], ["b", "x", "neg"]])
    args = ["train", "--base-model", str(tiny_bert_dir), "--out", str(tmp_path / "m")]
    args += ["--train-file", str(train), "--dev-file", str(dev), "--text-column", "body"]
    args += ["--label-column", "label"]
    assert main(args) == 2
    assert "train.csv:2: column 'body' (text) is missing" in capsys.readouterr().err
    assert main([*args[:-2]]) == 2
    assert "--train-file needs --label-column" in capsys.readouterr().err
