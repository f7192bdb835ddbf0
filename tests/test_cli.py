"""The eeengine command: predict, eval, info, and the default checkpoint on first use."""

import json
import subprocess
import sys
from dataclasses import fields

import pytest

import eeengine.defaults
from eeengine import Engine
from eeengine.cli import build_parser, main
from eeengine.cli_args import config_help
from eeengine.training import TrainConfig


def test_predict_prints_label_and_exit_layer(tiny_ckpt, capsys):
    assert main(["predict", "--ckpt", str(tiny_ckpt), "great fun", "a dull mess"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert "exit " in lines[0] and lines[0].endswith("great fun")
    assert lines[0].split()[0] in ("negative", "positive")


def test_predict_json(tiny_ckpt, capsys):
    assert main(["predict", "--ckpt", str(tiny_ckpt), "--json", "great fun"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["text"] == "great fun"
    assert set(row) >= {"label", "score", "probs", "exit_layer", "num_layers"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policy", "nope"], "unknown policy 'nope'"),
        (["--threshold", "9"], "out of range"),
        (["--device", "cuda:3"], "not available"),
        (["--split-cost", "-5"], "split_cost (-5.0) must be a number of padded tokens >= 0"),
    ],
)
def test_errors_exit_2_with_a_message(tiny_ckpt, capsys, args, message):
    assert main(["predict", "--ckpt", str(tiny_ckpt), *args, "text"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", [["eval"], ["calibrate", "--split", "dev"], ["score"]])
def test_every_engine_command_takes_the_split_cost(
    tiny_ckpt, tmp_path, capsys, monkeypatch, command
):
    """``--split-cost`` reaches the Engine of every command that builds one."""
    seen = []
    monkeypatch.setattr(
        Engine, "split_cost", property(lambda self: 64.0, lambda self, value: seen.append(value))
    )
    (tmp_path / "in.csv").write_text("t\ngreat fun\n")
    extra = ["--input", str(tmp_path / "in.csv"), "--output", str(tmp_path / "out.csv")]
    extra += ["--text-column", "t"]
    args = [*command, "--ckpt", str(tiny_ckpt), "--split-cost", "7"]
    main(args + (extra if command == ["score"] else []))
    assert 7.0 in seen


@pytest.mark.parametrize(
    "command",
    [["predict", "x"], ["eval"], ["calibrate", "--split", "dev", "--max-drop", "1"], ["score"]],
)
def test_every_engine_command_takes_the_token_pruning(
    tiny_ckpt, tmp_path, capsys, monkeypatch, command
):
    """``--token-pruning`` reaches the Engine of every command that builds one."""
    import eeengine.engine

    seen = []
    resolve = eeengine.engine.resolve_token_pruning

    def spy(given, *args):
        seen.append(given)
        return resolve(given, *args)

    monkeypatch.setattr(eeengine.engine, "resolve_token_pruning", spy)
    (tmp_path / "in.csv").write_text("t\ngreat fun\n")
    extra = ["--input", str(tmp_path / "in.csv"), "--output", str(tmp_path / "out.csv")]
    extra += ["--text-column", "t"]
    args = [*command, "--ckpt", str(tiny_ckpt), "--token-pruning", "mpee"]
    assert main(args + (extra if command == ["score"] else [])) == 0
    assert {"layers": [2, 4], "keep_ratio": 0.7, "beta": [1.0, 0.5]} in seen


def test_predict_with_a_token_pruning_schedule(tiny_ckpt, capsys):
    """A schedule given on the command line prunes (the tiny checkpoint has none); ``none``
    turns it off."""
    text = "a long and winding sentence about a film that could have been much shorter"
    schedule = '{"layers": [1], "keep_ratio": 0.5, "beta": [1.0]}'
    base = ["predict", "--ckpt", str(tiny_ckpt), "--json", "--policy", "none"]
    assert main([*base, "--token-pruning", schedule, text]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert len(row["tokens_kept"]) == 4 and row["tokens_kept"][0] < row["tokens_kept"][-1] * 2
    assert row["tokens_kept"][0] < len(text.split()) + 2
    assert main([*base, "--token-pruning", "none", text]) == 0
    assert json.loads(capsys.readouterr().out)[0]["tokens_kept"] is None


def test_bad_token_pruning_is_named(tiny_ckpt, capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--ckpt", str(tiny_ckpt), "--token-pruning", "nope", "x"])
    assert "argument --token-pruning: 'nope' is not 'checkpoint', 'none', 'mpee'" in (
        capsys.readouterr().err
    )
    args = ["predict", "--ckpt", str(tiny_ckpt), "--token-pruning", '{"layers": [9]}', "x"]
    assert main(args) == 2
    assert "layers" in capsys.readouterr().err


def test_calibrate_write_keeps_the_checkpoints_schedule(tiny_ckpt, tmp_path, capsys):
    """Thresholds written to a checkpoint are for its own schedule: --write with another is
    refused before anything is measured or written."""
    import shutil

    ckpt = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}
    args = ["calibrate", "--ckpt", str(ckpt), "--split", "dev", "--max-drop", "1"]
    args += ["--token-pruning", "mpee"]
    assert main([*args, "--write"]) == 2
    assert "--write stores thresholds for the checkpoint as trained" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()} == before
    assert main(args) == 0  # without --write it measures the schedule


def test_empty_text_is_an_error(tiny_ckpt, capsys):
    assert main(["predict", "--ckpt", str(tiny_ckpt), " "]) == 2
    assert "empty" in capsys.readouterr().err


def test_missing_checkpoint(tmp_path, capsys):
    assert main(["predict", "--ckpt", str(tmp_path / "none"), "text"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_eval_prints_per_exit_table_and_policy(tiny_ckpt, capsys):
    assert main(["eval", "--ckpt", str(tiny_ckpt), "--task", "sst2"]) == 0
    out = capsys.readouterr().out
    assert "| exit layer | 1 | 2 | 3 | 4 |" in out
    assert "average exit layer" in out and "speed-up" in out


def test_eval_json(tiny_ckpt, capsys):
    assert main(["eval", "--ckpt", str(tiny_ckpt), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["examples"] == 872 and len(report["per_exit"]) == 4
    assert 1.0 <= report["avg_exit_layer"] <= 4.0
    assert report["layer_saving"] == pytest.approx(1 - report["avg_exit_layer"] / 4)
    assert report["flops_speedup"] == pytest.approx(1 / report["flops_ratio"])


def test_info(tiny_ckpt, capsys):
    assert main(["info", str(tiny_ckpt)]) == 0
    out = capsys.readouterr().out
    assert "backend     cpp" in out and "4 layers" in out
    assert "tokens      no token pruning" in out


def test_default_checkpoint_is_trained_once_then_cached(
    tiny_bert_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("EEENGINE_HOME", str(tmp_path))
    monkeypatch.setattr(
        eeengine.defaults,
        "default_config",
        lambda: TrainConfig(base_model=str(tiny_bert_dir), max_train_examples=32, epochs=1.0),
    )
    assert main(["predict", "good"]) == 0
    captured = capsys.readouterr()
    assert "no default checkpoint" in captured.err
    assert (tmp_path / eeengine.defaults.DEFAULT_CHECKPOINT / "eeengine.json").is_file()
    assert main(["predict", "good"]) == 0
    assert "no default checkpoint" not in capsys.readouterr().err


def test_extra_policy_parameters(tiny_ckpt, capsys):
    assert (
        main(
            [
                "predict",
                "--ckpt",
                str(tiny_ckpt),
                "--policy",
                "budget",
                "--param",
                "layer=3",
                "--json",
                "x",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)[0]["exit_layer"] == 3
    assert main(["predict", "--ckpt", str(tiny_ckpt), "--param", "nolayer", "x"]) == 2
    assert "expected NAME=VALUE" in capsys.readouterr().err


def test_cli_works_without_the_serve_extra() -> None:
    """The serve extra (FastAPI, uvicorn, prometheus-client) is optional: without it every
    other command still parses (``eeengine serve`` imports it only when run)."""
    code = (
        "import sys\n"
        "for name in ('fastapi', 'uvicorn', 'prometheus_client'):\n"
        "    sys.modules[name] = None  # import raises ImportError\n"
        "from eeengine.cli import build_parser\n"
        "args = build_parser().parse_args(['serve', '--schedule', 'oldest'])\n"
        "print(args.schedule, build_parser().parse_args(['info']).precision)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["oldest", "fp32"]


def test_every_train_option_is_documented_from_the_config_docstring(capsys):
    """``eeengine train --help`` explains each TrainConfig option with the field's docstring
    entry (markup stripped), and its default."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--warmup-ratio WARMUP_RATIO share of the optimizer steps over which the" in out
    assert "--contrastive-lr CONTRASTIVE_LR before fine-tuning, train the encoder" in out
    assert "(default: 0.06)" in out and "``" not in out and ":mod:" not in out
    helps = config_help()
    assert {f.name for f in fields(TrainConfig)} <= set(helps)
    assert all(helps.values())


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], 0.9),
        (["--max-drop-confidence", "0.8"], 0.8),
        (["--max-drop-confidence", "none"], None),
        (["--max-drop-confidence", "None"], None),
    ],
)
def test_an_optional_train_value_takes_none(args, expected):
    assert build_parser().parse_args(["train", "--out", "x", *args]).max_drop_confidence == expected


def test_a_bad_optional_train_value_is_named(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--out", "x", "--ema-decay", "nan-ish"])
    assert "argument --ema-decay: invalid float value: 'nan-ish'" in capsys.readouterr().err


def test_every_option_of_every_command_has_help():
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    undocumented = {
        name: [a.dest for a in sub._actions if not a.help]
        for name, sub in subparsers.choices.items()
    }
    assert undocumented == dict.fromkeys(subparsers.choices, [])
