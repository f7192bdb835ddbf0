"""ALBERT (Lan et al. 2020), the ELBERT backbone: factorized embeddings, shared layers.

Two differences from BERT:

- the embeddings are ``embedding_size`` wide (E < H) and projected to ``hidden_size`` by
  ``encoder.embedding_hidden_mapping_in`` before layer 1;
- the ``num_hidden_layers`` layers share weights: layer i runs layer group
  ``i * num_hidden_groups // num_hidden_layers`` (one group in every released ALBERT), whose
  ``inner_group_num`` layers run in sequence.

Module names follow Hugging Face ``modeling_albert.py`` (``AlbertAttention`` holds query, key,
value, dense and LayerNorm; ``AlbertLayer`` holds ffn, ffn_output, full_layer_layer_norm), so an
``AlbertModel`` state dict loads without key remapping.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from transformers import AlbertConfig

from eeengine.dropout import Dropout
from eeengine.modeling_bert import (
    BertEmbeddings,
    BertSelfAttention,
    LayerwiseEncoder,
    PrunableLayer,
    activation,
)


class AlbertEmbeddings(BertEmbeddings):
    """BERT's embeddings, ``embedding_size`` wide."""

    def __init__(self, config: AlbertConfig) -> None:
        super().__init__(config, width=config.embedding_size)


class AlbertAttention(BertSelfAttention):
    """Self-attention, output projection and residual LayerNorm in one module."""

    def __init__(self, config: AlbertConfig) -> None:
        super().__init__(config)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.output_dropout = Dropout(config.hidden_dropout_prob)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, hidden_states: Tensor, attention_bias: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(batch_size, seq_len, hidden_size) -> the same; ``attention_bias`` as in BERT. Also
        returns the [CLS] query and the keys, as :class:`eeengine.modeling_bert.BertAttention`.
        """
        context, query, key = super().forward(hidden_states, attention_bias)
        output = self.LayerNorm(hidden_states + self.output_dropout(self.dense(context)))
        return output, query[:, :, 0], key


class AlbertLayer(PrunableLayer):
    """One post-LayerNorm transformer block."""

    def __init__(self, config: AlbertConfig) -> None:
        super().__init__()
        self.full_layer_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = AlbertAttention(config)
        self.ffn = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_output = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation = activation(config)

    def feed_forward(self, attention_output: Tensor) -> Tensor:
        ffn_output = self.ffn_output(self.activation(self.ffn(attention_output)))
        return self.full_layer_layer_norm(ffn_output + attention_output)


class AlbertLayerGroup(nn.Module):
    """``inner_group_num`` layers run in sequence: one step of the encoder."""

    def __init__(self, config: AlbertConfig) -> None:
        super().__init__()
        self.albert_layers = nn.ModuleList(
            AlbertLayer(config) for _ in range(config.inner_group_num)
        )

    def forward(self, hidden_states: Tensor, attention_bias: Tensor | None) -> Tensor:
        for layer in self.albert_layers:
            hidden_states = layer(hidden_states, attention_bias)
        return hidden_states

    def pruned_forward(self, *args: object, **kwargs: object) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`PrunableLayer.pruned_forward` of a group of one layer (a step of several
        inner layers has no single place to prune: see
        :attr:`AlbertModel.supports_token_pruning`)."""
        (layer,) = self.albert_layers
        return layer.pruned_forward(*args, **kwargs)


class AlbertTransformer(nn.Module):
    def __init__(self, config: AlbertConfig) -> None:
        super().__init__()
        self.embedding_hidden_mapping_in = nn.Linear(config.embedding_size, config.hidden_size)
        self.albert_layer_groups = nn.ModuleList(
            AlbertLayerGroup(config) for _ in range(config.num_hidden_groups)
        )


class AlbertModel(LayerwiseEncoder):
    """Factorized embeddings plus ``num_hidden_layers`` steps of shared layer groups."""

    def __init__(self, config: AlbertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = AlbertEmbeddings(config)
        self.encoder = AlbertTransformer(config)
        groups = self.encoder.albert_layer_groups
        num_layers, num_groups = config.num_hidden_layers, config.num_hidden_groups
        # A plain list (not registered again): layer i -> its shared group.
        self._layers = [groups[i * num_groups // num_layers] for i in range(num_layers)]

    def embed(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        """Embed (embedding_size wide), then project to hidden_size."""
        return self.encoder.embedding_hidden_mapping_in(self.embeddings(input_ids, token_type_ids))

    @property
    def layers(self) -> Sequence[nn.Module]:
        return self._layers

    @property
    def supports_token_pruning(self) -> bool:
        """Token pruning needs groups of one layer (``inner_group_num == 1``, the default)."""
        return self.config.inner_group_num == 1
