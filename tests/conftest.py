"""Shared fixtures: a tiny random BERT directory and a tiny multi-exit checkpoint.

Tests never train a real model; they use random-initialised configs and the real
all-MiniLM-L6-v2 tokenizer (vocabulary only).
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. Triton reads the
# switch when it is imported, and transformers imports it (through torch._dynamo) before any
# test module, so it is set here, first. Only Triton reads it; torch.compile on CPU is unchanged.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers import AutoTokenizer, BertConfig  # noqa: E402
from transformers import BertModel as HFBertModel  # noqa: E402

from eeengine.checkpoint import save_checkpoint  # noqa: E402
from eeengine.defaults import minilm_dir  # noqa: E402
from eeengine.modeling_multiexit import MultiExitBert, load_bert_weights  # noqa: E402

TINY = dict(
    vocab_size=30522,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)


def tiny_config(**overrides) -> BertConfig:
    return BertConfig(**{**TINY, **overrides})


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_dir())


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, tokenizer):
    """A Hugging Face BERT directory with random weights (4 layers, hidden 32)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bert")
    HFBertModel(tiny_config()).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_manifest(policy: dict | None = None, max_seq_length: int = 64) -> dict:
    return {
        "backbone": "bert",
        "task": {
            "name": "sst2",
            "type": "classification",
            "label_names": ["negative", "positive"],
            "metric": "accuracy",
        },
        "exit_heads": {"layout": "per_layer", "pooling": "mean"},
        "policy": policy or {"name": "entropy", "threshold": 0.4},
        "token_pruning": None,
        "max_seq_length": max_seq_length,
    }


def make_tiny_model(tiny_bert_dir, num_labels: int = 2, head_scale: float = 2.0) -> MultiExitBert:
    """Random multi-exit model whose heads are scaled up so that confidence varies across
    rows and layers (some rows exit early, some run to full depth)."""
    config, state = load_bert_weights(tiny_bert_dir)
    torch.manual_seed(1)
    model = MultiExitBert(config, num_labels)
    model.bert.load_state_dict(state)
    with torch.no_grad():
        for head in model.exit_heads:
            head.classifier.weight.mul_(head_scale)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_bert_dir, tokenizer):
    """A saved tiny checkpoint with the entropy policy at τ = 0.4 nats."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    return save_checkpoint(path, make_tiny_model(tiny_bert_dir), tokenizer, tiny_manifest())


SENTENCES = [
    "a gorgeous, witty, seductive movie.",
    "the plot is tedious and the acting is wooden.",
    "it 's a charming and often affecting journey .",
    "unflinchingly bleak and desperate",
    "ok",
    "the film is strictly routine , with a few good moments but mostly tired ideas and a cast "
    "that seems to know it .",
    "a masterpiece",
    "not bad at all, actually quite good",
]
