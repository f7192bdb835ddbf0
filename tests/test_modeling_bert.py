"""The lean BERT encoder against transformers.BertModel on all-MiniLM-L6-v2 (random configs of
every backbone are in test_backbones.py), and its errors."""

import pytest
from transformers import BertModel as HFBertModel

from eeengine.defaults import minilm_dir
from eeengine.modeling_bert import BertModel
from eeengine.modeling_multiexit import load_backbone_weights
from tests.conftest import assert_matches_transformers, tiny_config


def test_minilm_matches_transformers():
    hf = HFBertModel.from_pretrained(minilm_dir(), attn_implementation="sdpa")
    config, state = load_backbone_weights(minilm_dir())
    ours = BertModel(config)
    ours.load_state_dict(state)
    assert_matches_transformers(hf, ours, config.pad_token_id, "all-MiniLM-L6-v2")


def test_load_rejects_non_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_backbone_weights(tmp_path)


def test_unsupported_activation():
    with pytest.raises(ValueError, match="hidden_act"):
        BertModel(tiny_config(hidden_act="relu"))
