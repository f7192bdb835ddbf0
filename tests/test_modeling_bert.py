"""The lean encoder against transformers.BertModel: every layer's hidden states, fp32."""

import pytest
import torch
from transformers import BertModel as HFBertModel

from eeengine.defaults import minilm_dir
from eeengine.modeling_bert import BertModel
from eeengine.modeling_multiexit import load_backbone_weights
from tests.conftest import tiny_config


def _inputs(vocab_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, vocab_size, (4, 23), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 17:] = 0
    attention_mask[2, 3:] = 0  # short row
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[0, 10:] = 1
    return input_ids, attention_mask, token_type_ids


def _compare(hf: HFBertModel, ours: BertModel) -> None:
    hf.eval()
    ours.eval()
    input_ids, attention_mask, token_type_ids = _inputs(hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            output_hidden_states=True,
        ).hidden_states[1:]
        actual = ours(input_ids, attention_mask, token_type_ids)
    assert len(actual) == hf.config.num_hidden_layers
    real = attention_mask.bool()
    for layer, (a, e) in enumerate(zip(actual, expected, strict=True), start=1):
        diff = (a - e)[real].abs().max().item()
        assert diff <= 1e-5, f"layer {layer}: max abs difference {diff}"


def test_random_config_matches_transformers(tmp_path):
    torch.manual_seed(0)
    HFBertModel(tiny_config(), add_pooling_layer=True).save_pretrained(tmp_path)
    hf = HFBertModel.from_pretrained(tmp_path, attn_implementation="sdpa")
    config, state = load_backbone_weights(tmp_path)
    ours = BertModel(config)
    ours.load_state_dict(state)
    _compare(hf, ours)


def test_minilm_matches_transformers():
    hf = HFBertModel.from_pretrained(minilm_dir(), attn_implementation="sdpa")
    config, state = load_backbone_weights(minilm_dir())
    ours = BertModel(config)
    ours.load_state_dict(state)
    _compare(hf, ours)


def test_load_rejects_non_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_backbone_weights(tmp_path)


def test_unsupported_activation():
    with pytest.raises(ValueError, match="hidden_act"):
        BertModel(tiny_config(hidden_act="relu"))
