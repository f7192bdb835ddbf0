"""A multi-exit encoder (BERT, RoBERTa or ALBERT) with an exit head after every layer.

State-dict keys: the backbone under its Hugging Face prefix (``bert.*``, ``roberta.*`` or
``albert.*``, as in ``*ForSequenceClassification``, without the pooler); the exit heads as in
:mod:`eeengine.heads` (``exit_heads.*``, ``exit_pooler.*``); the optional learning-to-exit
module at ``lte.*``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import AutoConfig, PretrainedConfig

from eeengine.heads import ExitHead, LteHead, make_exit_heads
from eeengine.modeling_albert import AlbertModel
from eeengine.modeling_bert import BertModel, LayerwiseEncoder
from eeengine.modeling_roberta import RobertaModel
from eeengine.token_pruning import TokenPruning

# config.model_type -> encoder class; the key is also the state-dict prefix and the
# ``backbone`` field of eeengine.json.
BACKBONES: dict[str, type[LayerwiseEncoder]] = {
    "bert": BertModel,
    "roberta": RobertaModel,
    "albert": AlbertModel,
}


class MultiExitBert(nn.Module):
    """A BERT-family encoder with a classifier after every layer (Xin et al. 2020, DeeBERT;
    Xin et al. 2021, BERxiT).

    Args:
        config: the Hugging Face backbone config; ``config.model_type`` picks the backbone.
        num_labels: number of classes C (1 for regression).
        pooling: "mean" or "cls", see :mod:`eeengine.heads`.
        layout: "per_layer", "shared_pooler" or "shared", see :mod:`eeengine.heads`.
        lte: add BERxiT's learning-to-exit module (:class:`eeengine.heads.LteHead`).

    Raises:
        ValueError: an unsupported backbone, layout or pooling.
    """

    def __init__(
        self,
        config: PretrainedConfig,
        num_labels: int,
        pooling: str = "mean",
        layout: str = "per_layer",
        lte: bool = False,
    ) -> None:
        super().__init__()
        if config.model_type not in BACKBONES:
            raise ValueError(
                f"backbone {config.model_type!r} is not supported; one of {', '.join(BACKBONES)}"
            )
        self.config = config
        self.num_labels = num_labels
        self.layout = layout
        self.backbone_type = config.model_type
        self.add_module(self.backbone_type, BACKBONES[self.backbone_type](config))
        self.exit_heads, self.exit_pooler = make_exit_heads(
            layout,
            config.hidden_size,
            num_labels,
            config.num_hidden_layers,
            pooling,
            config.hidden_dropout_prob,
        )
        self.lte = LteHead(config.hidden_size) if lte else None

    @property
    def backbone(self) -> LayerwiseEncoder:
        """The encoder, whatever its type (registered as ``bert``, ``roberta`` or ``albert``)."""
        return getattr(self, self.backbone_type)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def signals(self) -> tuple[str, ...]:
        """Per-layer signals besides the logits (see :attr:`eeengine.policies.ExitPolicy.needs`)."""
        return ("lte_score",) if self.lte is not None else ()

    def exit_head(self, index: int) -> ExitHead:
        """The exit head after 0-based layer ``index`` (the one shared head for ``shared``)."""
        return self.exit_heads[0 if self.layout == "shared" else index]

    def exits(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor,
        token_pruning: TokenPruning | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits and signals of every exit (training and full-depth evaluation).

        Args:
            input_ids, attention_mask, token_type_ids: (batch_size, seq_len); the mask is 1
                for real tokens.
            token_pruning: an MPEE token-pruning schedule to train or evaluate with (gradients
                flow through the kept tokens and the fusion token), or None.

        Returns:
            logits: (num_layers, batch_size, num_labels), layer 1 first.
            signals: ``{"lte_score": (num_layers, batch_size) float32}`` with the LTE module,
                else empty.
        """
        all_logits, all_scores = [], []
        outputs = self.backbone.layer_outputs(
            input_ids, attention_mask, token_type_ids, token_pruning
        )
        for index, (hidden_states, mask) in enumerate(outputs):
            head = self.exit_head(index)
            pooled = head.pool(hidden_states, mask)
            all_logits.append(head.classify(pooled))
            if self.lte is not None:
                all_scores.append(self.lte(pooled))
        signals = {"lte_score": torch.stack(all_scores)} if self.lte is not None else {}
        return torch.stack(all_logits), signals

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor,
        token_pruning: TokenPruning | None = None,
    ) -> Tensor:
        """Logits of every exit: (num_layers, batch_size, num_labels), see :meth:`exits`."""
        return self.exits(input_ids, attention_mask, token_type_ids, token_pruning)[0]


def load_backbone_weights(model_dir: str | Path) -> tuple[PretrainedConfig, dict[str, Tensor]]:
    """Read a Hugging Face BERT, RoBERTa or ALBERT directory (config.json + model.safetensors).

    Returns:
        The config and the encoder's state dict with keys as in the backbone class of
        :data:`BACKBONES` (the ``bert.`` / ``roberta.`` / ``albert.`` prefix is stripped; the
        pooler, task heads and the ``position_ids`` / ``token_type_ids`` buffers are dropped).

    Raises:
        FileNotFoundError: the directory has no config.json or model.safetensors.
        ValueError: the config is not one of the supported backbones.
    """
    model_dir = Path(model_dir)
    for name in ("config.json", "model.safetensors"):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir / name} not found: not a Hugging Face model dir")
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type not in BACKBONES:
        raise ValueError(
            f"{model_dir / 'config.json'}: model_type={config.model_type!r}, not one of "
            f"{', '.join(BACKBONES)}"
        )
    expected = BACKBONES[config.model_type](config).state_dict().keys()
    prefix = f"{config.model_type}."
    state = {}
    for key, value in load_file(model_dir / "model.safetensors").items():
        key = key.removeprefix(prefix)
        if key in expected:
            state[key] = value
    return config, state
