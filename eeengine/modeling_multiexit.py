"""A multi-exit BERT: the lean encoder plus one exit head per layer.

State-dict keys: ``bert.*`` as in Hugging Face ``BertForSequenceClassification`` (without its
pooler), and ``exit_heads.{l}.*`` for the head after layer l + 1.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import BertConfig

from eeengine.heads import ExitHead
from eeengine.modeling_bert import BertModel
from eeengine.token_pruning import TokenPruning


class MultiExitBert(nn.Module):
    """BERT with a classifier after every layer (Xin et al. 2020, DeeBERT; Xin et al. 2021,
    BERxiT).

    Args:
        config: the Hugging Face backbone config.
        num_labels: number of classes C (1 for regression).
        pooling: "mean" or "cls", see :mod:`eeengine.heads`.
    """

    def __init__(self, config: BertConfig, num_labels: int, pooling: str = "mean") -> None:
        super().__init__()
        self.config = config
        self.num_labels = num_labels
        self.bert = BertModel(config)
        self.exit_heads = nn.ModuleList(
            ExitHead(config.hidden_size, num_labels, pooling, config.hidden_dropout_prob)
            for _ in range(config.num_hidden_layers)
        )

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor,
        token_pruning: TokenPruning | None = None,
    ) -> Tensor:
        """Logits of every exit (training and full-depth evaluation).

        Args:
            input_ids, attention_mask, token_type_ids: (batch_size, seq_len); the mask is 1
                for real tokens.
            token_pruning: an MPEE token-pruning schedule to train or evaluate with (gradients
                flow through the kept tokens and the fusion token), or None.

        Returns:
            logits: (num_layers, batch_size, num_labels), layer 1 first.
        """
        outputs = self.bert.layer_outputs(input_ids, attention_mask, token_type_ids, token_pruning)
        return torch.stack(
            [
                head(hidden_states, mask)
                for head, (hidden_states, mask) in zip(self.exit_heads, outputs, strict=True)
            ]
        )


def load_bert_weights(model_dir: str | Path) -> tuple[BertConfig, dict[str, Tensor]]:
    """Read a Hugging Face BERT directory (``config.json`` + ``model.safetensors``).

    Returns:
        The config and the encoder's state dict with keys as in :class:`BertModel`
        (a ``bert.`` prefix is stripped; the [CLS] pooler and ``position_ids`` are dropped).

    Raises:
        FileNotFoundError: the directory has no config.json or model.safetensors.
        ValueError: the config is not a BERT config.
    """
    model_dir = Path(model_dir)
    for name in ("config.json", "model.safetensors"):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir / name} not found: not a Hugging Face model dir")
    config = BertConfig.from_pretrained(model_dir)
    if config.model_type != "bert":
        raise ValueError(
            f"{model_dir / 'config.json'}: model_type={config.model_type!r}, not 'bert'"
        )
    state = {}
    for key, value in load_file(model_dir / "model.safetensors").items():
        key = key.removeprefix("bert.")
        if key.startswith("pooler.") or key.endswith("position_ids"):
            continue
        state[key] = value
    return config, state
