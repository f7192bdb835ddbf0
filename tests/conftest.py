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
from hypothesis import settings  # noqa: E402
from transformers import (  # noqa: E402
    AlbertConfig,
    AlbertModel,
    AutoTokenizer,
    BertConfig,
    RobertaConfig,
    RobertaModel,
)
from transformers import BertModel as HFBertModel  # noqa: E402

from eeengine.checkpoint import save_checkpoint  # noqa: E402
from eeengine.defaults import minilm_dir  # noqa: E402
from eeengine.modeling_multiexit import MultiExitBert, load_backbone_weights  # noqa: E402

# The gate (.ci/run sets HYPOTHESIS_PROFILE=ci) draws the same examples on every run, so a red
# CI names a change, not a draw; everywhere else each run draws new ones (and a failure prints
# the seed to replay it).
settings.register_profile("ci", derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

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


# The MiniLM vocabulary's [CLS] and [SEP], as bos/eos of the RoBERTa and ALBERT configs (whose
# defaults name their own vocabularies' ids), so checkpoints with the MiniLM tokenizer load.
MINILM_SPECIAL = {"bos_token_id": 101, "eos_token_id": 102}


def tiny_roberta_config(**overrides) -> RobertaConfig:
    """RoBERTa-shaped: padding id 0 (the MiniLM vocabulary's [PAD]), so positions start at 1;
    one token type."""
    settings = {
        "max_position_embeddings": 66,
        "pad_token_id": 0,
        "type_vocab_size": 1,
        **MINILM_SPECIAL,
    }
    return RobertaConfig(**{**TINY, **settings, **overrides})


def tiny_albert_config(**overrides) -> AlbertConfig:
    """Factorized embeddings (16 -> 32), one shared layer group, tanh-GELU, dropout 0.1."""
    return AlbertConfig(
        **{
            **TINY,
            "embedding_size": 16,
            "pad_token_id": 0,
            **MINILM_SPECIAL,
            "hidden_dropout_prob": 0.1,
            **overrides,
        }
    )


HF_MODELS = {
    "bert": (HFBertModel, tiny_config),
    "roberta": (RobertaModel, tiny_roberta_config),
    "albert": (AlbertModel, tiny_albert_config),
}
BACKBONE_TYPES = tuple(HF_MODELS)


@pytest.fixture(scope="session")
def tiny_backbone_dirs(tmp_path_factory, tokenizer, tiny_bert_dir):
    """backbone type -> a Hugging Face directory with random weights and the MiniLM tokenizer."""
    dirs = {"bert": tiny_bert_dir}
    for name in ("roberta", "albert"):
        model_class, config = HF_MODELS[name]
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(f"tiny-{name}")
        model_class(config()).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[name] = path
    return dirs


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
    config, state = load_backbone_weights(tiny_bert_dir)
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


def write_rows(path, header: list[str], rows: list[list]) -> None:
    """A CSV (quoted as needed), TSV (never quoted) or JSONL file, by suffix."""
    import csv
    import json

    with open(path, "w", newline="", encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            for row in rows:
                f.write(json.dumps(dict(zip(header, row, strict=True))) + "\n")
            return
        if path.suffix == ".tsv":  # plain TSV: no quoting, as the reader expects
            f.writelines("\t".join(map(str, row)) + "\n" for row in [header, *rows])
            return
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture(scope="session")
def tiny_csv_task(tmp_path_factory):
    """A small non-GLUE classification task: train.csv (40 rows) and dev.csv (12 rows),
    columns review, verdict (labels "good" / "bad")."""
    path = tmp_path_factory.mktemp("csv-task")
    rows = [[text, "good" if i % 2 == 0 else "bad"] for i, text in enumerate(SENTENCES * 5)]
    write_rows(path / "train.csv", ["review", "verdict"], rows)
    write_rows(path / "dev.csv", ["review", "verdict"], rows[:12])
    return path


def csv_config(base_model, task_dir, **overrides):
    """A TrainConfig on :func:`tiny_csv_task`: one epoch of batch 16 (no resume state)."""
    from eeengine.training import TrainConfig

    return TrainConfig(
        **{
            "base_model": str(base_model),
            "train_file": str(task_dir / "train.csv"),
            "dev_file": str(task_dir / "dev.csv"),
            "text_column": "review",
            "label_column": "verdict",
            "batch_size": 16,
            "epochs": 1.0,
            "save_every": 0,
            **overrides,
        }
    )


@pytest.fixture(scope="session")
def trained_csv_ckpt(tmp_path_factory, tiny_bert_dir, tiny_csv_task):
    """A checkpoint trained on :func:`tiny_csv_task` with :func:`csv_config` (read-only: copy
    it to change it), its default policy picked as measured: its 10 calibration rows certify
    no point at the default 90 % confidence, and the tests of the policy need one."""
    from eeengine.training import train

    out = tmp_path_factory.mktemp("trained") / "ckpt"
    config = csv_config(tiny_bert_dir, tiny_csv_task, max_drop_confidence=None)
    return train(config, out, progress=False)


def assert_matches_transformers(hf, ours, pad_token_id: int, label: str = "") -> None:
    """Every layer's hidden states of ``ours`` equal those of the transformers model ``hf``
    (max abs difference <= 1e-5 in fp32 over real tokens), on padded inputs with two segments.
    """
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 30000, (4, 23), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 17:] = 0
    attention_mask[2, 3:] = 0  # short row
    input_ids[attention_mask == 0] = pad_token_id
    token_type_ids = torch.zeros_like(input_ids)
    if hf.config.type_vocab_size > 1:
        token_type_ids[0, 10:] = 1
    hf.eval()
    ours.eval()
    with torch.no_grad():
        expected = hf(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            output_hidden_states=True,
        ).hidden_states[1:]
        actual = ours(input_ids, attention_mask, token_type_ids)
    assert len(actual) == len(expected) == hf.config.num_hidden_layers
    real = attention_mask.bool()
    for layer, (a, e) in enumerate(zip(actual, expected, strict=True), start=1):
        diff = (a - e)[real].abs().max().item()
        assert diff <= 1e-5, f"{label} layer {layer}: max abs difference {diff}"
