"""Checkpoint damage that used to load and predict garbage now gives a named error (issue 16)."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from eeengine import Engine
from eeengine.checkpoint import (
    CALIBRATION,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    write_json_atomic,
)
from eeengine.precision import read_calibration
from tests.conftest import SENTENCES, make_tiny_model, tiny_manifest, tiny_roberta_config


@pytest.fixture
def broken(tiny_ckpt, tmp_path):
    target = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, target)
    return target


def _edit_weights(path, key, change):
    state = load_file(path / "model.safetensors")
    change(state[key])
    save_file(state, path / "model.safetensors")


def _edit_json(file, change):
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data))


def test_missing_tokenizer_files(broken):
    # transformers would build a BertTokenizer with a 5-token vocabulary: every word [UNK].
    (broken / "tokenizer.json").unlink()
    (broken / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"broken: no tokenizer files .*tokenizer\.json"):
        Engine(broken)


def test_vocabulary_cut_to_1000_tokens(broken):
    def cut(tokenizer):
        vocab = tokenizer["model"]["vocab"]
        tokenizer["model"]["vocab"] = dict(list(vocab.items())[:1000])

    _edit_json(broken / "tokenizer.json", cut)
    message = (
        r"tokenizer\.json: the vocabulary has 1000 tokens but the embeddings have 30522 rows "
        r"\(.*config\.json field 'vocab_size'\)"
    )
    with pytest.raises(CheckpointError, match=message):
        Engine(broken)


def test_token_id_outside_the_embeddings(broken):
    def shrink(config):
        config["vocab_size"] = 30000  # the tokenizer's ids go up to 30521

    _edit_json(broken / "config.json", shrink)
    state = load_file(broken / "model.safetensors")
    key = "bert.embeddings.word_embeddings.weight"
    state[key] = state[key][:30000].clone()
    save_file(state, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: token '.*' has id 30521, outside"):
        load_checkpoint(broken)


@pytest.mark.parametrize(
    "key", ["bert.encoder.layer.1.attention.self.query.weight", "exit_heads.2.classifier.weight"]
)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight(broken, key, value):
    # An encoder NaN used to give score=nan; a head NaN silently skipped that exit.
    _edit_weights(broken, key, lambda t: t.view(-1).__setitem__(5, value))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{key}' .* 1 NaN"):
        Engine(broken)


def test_integer_weight(broken):
    state = load_file(broken / "model.safetensors")
    state["exit_heads.0.classifier.bias"] = torch.tensor([1, 2], dtype=torch.int32)
    save_file(state, broken / "model.safetensors")
    with pytest.raises(
        CheckpointError, match="'exit_heads.0.classifier.bias' has dtype torch.int32"
    ):
        load_checkpoint(broken)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hidden_size", 32_000_000, "describes a model of .* parameters"),
        ("num_hidden_layers", 10**9, "describes a model of .* parameters"),
        ("hidden_size", "32", "cannot read the backbone config: .*hidden_size"),
        ("num_attention_heads", 5, "field 'hidden_size' = 32 is not a multiple of field"),
    ],
)
def test_config_sizes_are_checked_before_building(broken, field, value, message):
    _edit_json(broken / "config.json", lambda c: c.update({field: value}))
    with pytest.raises(CheckpointError, match=rf"config\.json: {message}"):
        load_checkpoint(broken)


def test_max_seq_length_beyond_the_position_embeddings(broken):
    _edit_json(broken / "eeengine.json", lambda m: m.update(max_seq_length=65))
    with pytest.raises(CheckpointError, match=r"'max_seq_length' = 65, expected \[3, 64\]"):
        load_checkpoint(broken)


def test_repeated_label_names(broken):
    _edit_json(broken / "eeengine.json", lambda m: m["task"].update(label_names=["a", "a"]))
    with pytest.raises(CheckpointError, match=r"'task.label_names' = \['a', 'a'\] repeats"):
        load_checkpoint(broken)


def test_tokenizer_without_cls_sep(broken):
    # A plain fast tokenizer without its post-processor adds no [CLS] / [SEP].
    _edit_json(broken / "tokenizer.json", lambda t: t.update(post_processor=None))
    _edit_json(
        broken / "tokenizer_config.json",
        lambda t: t.update(tokenizer_class="PreTrainedTokenizerFast"),
    )
    with pytest.raises(
        CheckpointError, match=r"encodes 'a' as \[1037\]; the bert backbone expects"
    ):
        load_checkpoint(broken)


def test_corrupt_tokenizer_json(broken):
    data = (broken / "tokenizer.json").read_bytes()
    (broken / "tokenizer.json").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot load the tokenizer files"):
        load_checkpoint(broken)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({}, None),
        ({"pad_token_id": 1}, "pads with id 0, but .*'pad_token_id' = 1"),
        # RobertaConfig's own defaults: <s> = 0 and </s> = 2 of the RoBERTa vocabulary.
        ({"bos_token_id": 0}, r"cls_token '\[CLS\]' has id 101, but .*'bos_token_id' = 0"),
        ({"eos_token_id": 2}, r"sep_token '\[SEP\]' has id 102, but .*'eos_token_id' = 2"),
    ],
)
def test_roberta_special_ids_must_match_the_config(tmp_path, tokenizer, overrides, message):
    from eeengine.modeling_multiexit import MultiExitBert

    model = MultiExitBert(tiny_roberta_config(**overrides), 2)
    manifest = {**tiny_manifest(), "backbone": "roberta"}
    path = save_checkpoint(tmp_path / "roberta", model, tokenizer, manifest)
    if message is None:
        assert load_checkpoint(path).model.backbone_type == "roberta"
        return
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_good_checkpoint_still_loads(tiny_ckpt, tiny_bert_dir):
    loaded = load_checkpoint(tiny_ckpt)
    expected = make_tiny_model(tiny_bert_dir).state_dict()
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


def test_tokenizer_that_cannot_encode(broken):
    # Found by the fuzz campaign: a dict as model_max_length made encoding raise TypeError.
    _edit_json(broken / "tokenizer_config.json", lambda t: t.update(model_max_length={"a": 1}))
    with pytest.raises(CheckpointError, match="tokenizer files load but cannot encode 'a'"):
        load_checkpoint(broken)


@pytest.fixture(scope="module")
def measured_sweep(tiny_ckpt):
    """The tiny checkpoint's sweep, as ``eeengine calibrate --write`` stores it."""
    engine = Engine(tiny_ckpt)
    engine.calibrate(SENTENCES, [i % 2 for i in range(len(SENTENCES))], max_drop=100.0)
    return engine.calibration


MISSING = object()


def _damage(calibration, keys, value):
    """Set ``calibration[k0][k1]...`` to ``value`` (delete it for MISSING); its field path as
    the errors name it (``policies.entropy[3].speedup``)."""
    *parents, last = keys
    for key in parents:
        calibration = calibration[key]
    if value is MISSING:
        del calibration[last]
    else:
        calibration[last] = value
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys).lstrip(".")


POINT = ("policies", "entropy", 3)
# The first nine were found by the fuzz campaign: they loaded, then Engine(target_speedup= /
# max_drop=) raised AttributeError ('NoneType' object has no attribute 'items') or KeyError.
DAMAGED_CALIBRATIONS = [
    (("policies",), None, "= None, expected an object"),
    (("policies",), 1.5, "= 1.5, expected an object"),
    (("policies",), 3, "= 3, expected an object"),
    (("policies",), [], "= [], expected an object"),
    *(
        ((*POINT, key), MISSING, "is missing, expected a finite number")
        for key in ("avg_exit_layer", "layer_saving", "speedup", "metric")
    ),
    (("full_depth",), MISSING, "is missing, expected a finite number"),
    ((*POINT, "speedup"), "2", "= '2', expected a finite number"),
    ((*POINT, "metric"), float("nan"), "= nan, expected a finite number"),
    (("full_depth",), 10**400, f"= {str(10**400)[:80]}, expected a finite number"),
    ((*POINT, "avg_exit_layer"), 0, "= 0, expected a number > 0"),
    ((*POINT, "flops_ratio"), "x", "= 'x', expected a finite number or null"),
    (POINT, None, "= None, expected an object"),
    (POINT[:2], {}, "= {}, expected a list"),
    (("num_layers",), True, "= True, expected a positive integer"),
    (("metric",), MISSING, "is missing, expected a metric name"),
    (("reference_full_depth",), "94", "= '94', expected a finite number"),
]


def _write_damaged(file, sweep, keys, value, expected):
    """Write ``sweep`` with one field damaged to ``file``; the error message expected."""
    calibration = json.loads(json.dumps(sweep))
    field = _damage(calibration, keys, value)
    file.write_text(json.dumps(calibration))
    return re.escape(f"{file}: field {field!r} {expected}")


@pytest.mark.parametrize(("keys", "value", "expected"), DAMAGED_CALIBRATIONS)
@pytest.mark.parametrize("target", [{"target_speedup": 1.5}, {"max_drop": 50.0}])
def test_damaged_calibration_is_named(broken, measured_sweep, keys, value, expected, target):
    message = _write_damaged(broken / CALIBRATION, measured_sweep, keys, value, expected)
    with pytest.raises(CheckpointError, match=message):
        Engine(broken, **target)


@pytest.mark.parametrize(("keys", "value", "expected"), DAMAGED_CALIBRATIONS)
def test_damaged_precision_calibration_is_named(broken, measured_sweep, keys, value, expected):
    file = broken / "calibration-int8.json"
    message = _write_damaged(file, measured_sweep, keys, value, expected)
    with pytest.raises(CheckpointError, match=message):
        read_calibration(broken, "int8")


def test_intact_calibration_still_picks_points(broken, measured_sweep):
    write_json_atomic(broken / CALIBRATION, measured_sweep)
    assert load_checkpoint(broken).calibration == measured_sweep
    engine = Engine(broken, target_speedup=1.5)
    assert engine.operating_point.speedup >= 1.5
    assert engine.predict("a fine film").label in ("negative", "positive")
    assert Engine(broken, max_drop=50.0).operating_point is not None


def test_empty_calibration_is_no_calibration(broken):
    (broken / CALIBRATION).write_text("{}")
    assert load_checkpoint(broken).calibration == {}
    with pytest.raises(ValueError, match=r"no calibration \(calibration.json missing or empty"):
        Engine(broken, target_speedup=1.5)
