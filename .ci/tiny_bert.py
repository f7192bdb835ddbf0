"""Write a tiny random-weight BERT directory (config, weights, the all-MiniLM-L6-v2 tokenizer)
for CI's installed-wheel check: `python .ci/tiny_bert.py DIR`."""

import sys

import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from eeengine.defaults import minilm_dir

out = sys.argv[1]
config = BertConfig(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
)
torch.manual_seed(0)  # the same weights, so the same prediction, in every CI run
BertModel(config).save_pretrained(out)
AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(out)
