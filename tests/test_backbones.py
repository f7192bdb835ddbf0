"""RoBERTa and ALBERT against transformers (every layer's hidden states, fp32), loading by
model type, and the early-exit loop on each backbone."""

import pytest
import torch

from eeengine.modeling_albert import AlbertModel
from eeengine.modeling_multiexit import BACKBONES, MultiExitBert, load_backbone_weights
from eeengine.modeling_roberta import RobertaModel
from eeengine.policies import make_policy, run_policy
from eeengine.runtime import early_exit_forward
from tests.conftest import BACKBONE_TYPES, HF_MODELS, assert_matches_transformers


def _inputs(pad_token_id: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, 30000, (4, 23), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 17:] = 0
    attention_mask[2, 3:] = 0  # short row
    input_ids[attention_mask == 0] = pad_token_id
    token_type_ids = torch.zeros_like(input_ids)
    return input_ids, attention_mask, token_type_ids


@pytest.mark.parametrize(
    ("backbone", "overrides"),
    [*((b, {}) for b in BACKBONE_TYPES), ("albert", {"num_hidden_groups": 2})],
)
def test_hidden_states_match_transformers(backbone, overrides, tmp_path):
    model_class, make_config = HF_MODELS[backbone]
    torch.manual_seed(0)
    model_class(make_config(**overrides)).save_pretrained(tmp_path)
    hf = model_class.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    config, state = load_backbone_weights(tmp_path)
    ours = BACKBONES[backbone](config)
    ours.load_state_dict(state)  # strict: Hugging Face names, no remapping
    ours.eval()
    assert_matches_transformers(hf, ours, config.pad_token_id, backbone)


def test_roberta_positions_skip_padding():
    config = HF_MODELS["roberta"][1]()
    model = RobertaModel(config).eval()
    input_ids, attention_mask, token_type_ids = _inputs(config.pad_token_id)
    # Left-padded row 2: the real tokens must get the same positions as when right-padded.
    left = input_ids.clone()
    left[2] = torch.cat([input_ids[2, 3:], input_ids[2, :3]])
    right_embed = model.embed(input_ids, token_type_ids)[2, :3]
    left_embed = model.embed(left, token_type_ids)[2, -3:]
    torch.testing.assert_close(left_embed, right_embed)
    assert model.max_positions == config.max_position_embeddings - config.pad_token_id - 1


def test_albert_layers_share_weights():
    config = HF_MODELS["albert"][1](num_hidden_layers=4)
    model = AlbertModel(config)
    assert len(model.layers) == 4
    assert all(layer is model.layers[0] for layer in model.layers)
    assert model.embeddings.word_embeddings.weight.shape[1] == config.embedding_size
    two_groups = AlbertModel(HF_MODELS["albert"][1](num_hidden_groups=2))
    groups = two_groups.encoder.albert_layer_groups
    assert list(two_groups.layers) == [groups[0], groups[0], groups[1], groups[1]]


@pytest.mark.parametrize("backbone", BACKBONE_TYPES)
def test_state_dict_prefix_is_the_hugging_face_one(backbone):
    model = MultiExitBert(HF_MODELS[backbone][1](), 2)
    assert any(key.startswith(f"{backbone}.embeddings.") for key in model.state_dict())


@pytest.mark.parametrize("backbone", BACKBONE_TYPES)
@pytest.mark.parametrize("layout", ["per_layer", "shared_pooler", "shared"])
def test_early_exit_loop_matches_run_policy(backbone, layout):
    torch.manual_seed(0)
    model = MultiExitBert(HF_MODELS[backbone][1](), 3, pooling="cls", layout=layout).eval()
    inputs = _inputs(model.config.pad_token_id)
    policy = make_policy("entropy", threshold=1.05)
    with torch.no_grad():
        expected_layer, expected_logits = run_policy(policy, model(*inputs))
    out = early_exit_forward(model, policy, *inputs)
    torch.testing.assert_close(out.exit_layer, expected_layer, rtol=0, atol=0)
    torch.testing.assert_close(out.logits, expected_logits)


def test_unsupported_backbone(tmp_path):
    from transformers import GPT2Config

    GPT2Config().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="model_type='gpt2', not one of bert, roberta, albert"):
        load_backbone_weights(tmp_path)
