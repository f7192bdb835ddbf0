"""A lean BERT encoder that runs one layer at a time.

Module and attribute names follow Hugging Face ``modeling_bert.py`` (``BertEmbeddings``,
``BertSelfAttention``, ``self.LayerNorm`` ...) so a ``BertModel`` state dict loads without key
remapping. Attention uses ``torch.nn.functional.scaled_dot_product_attention`` (SDPA).

Unlike ``transformers.BertModel``, the encoder does not run all layers in one call: the caller
drives the loop (``embeddings`` then ``encoder.layer[l]``), so an early-exit loop can stop after
any layer and drop rows between layers.

Mask polarity everywhere in eeengine: ``attention_mask`` is 1 (or True) for real tokens and 0 for
padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import BertConfig


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm (Devlin et al. 2019)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        """Embed token ids.

        Args:
            input_ids: (batch_size, seq_len) int64 token ids.
            token_type_ids: (batch_size, seq_len) int64 segment ids (0 or 1).

        Returns:
            hidden_states: (batch_size, seq_len, hidden_size), the embedding dtype.
        """
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        embeddings = (
            self.word_embeddings(input_ids)
            + self.token_type_embeddings(token_type_ids)
            + self.position_embeddings(positions)
        )
        return self.dropout(self.LayerNorm(embeddings))


class BertSelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention through SDPA."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_prob = config.attention_probs_dropout_prob
        # One (3 * hidden_size, hidden_size) projection for inference, built by fuse_qkv();
        # not saved (persistent=False), so state dicts keep Hugging Face's query/key/value keys.
        self.qkv_weight: Tensor | None
        self.qkv_bias: Tensor | None
        self.register_buffer("qkv_weight", None, persistent=False)
        self.register_buffer("qkv_bias", None, persistent=False)

    def fuse_qkv(self) -> None:
        """Concatenate the query, key and value projections into one matmul for inference.

        The fused copy is used in eval mode only and dropped by ``train()``; call this again
        after changing the weights in place outside training.
        """
        projections = (self.query, self.key, self.value)
        self.qkv_weight = torch.cat([p.weight.detach() for p in projections])
        self.qkv_bias = torch.cat([p.bias.detach() for p in projections])

    def train(self, mode: bool = True) -> BertSelfAttention:
        if mode:
            self.qkv_weight = self.qkv_bias = None
        return super().train(mode)

    def _heads(self, x: Tensor) -> Tensor:
        batch_size, seq_len, _ = x.shape
        return x.view(
            batch_size, seq_len, self.num_attention_heads, self.attention_head_size
        ).transpose(1, 2)

    def _project(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.qkv_weight is not None and not self.training:
            fused = F.linear(hidden_states, self.qkv_weight, self.qkv_bias)
            return fused.chunk(3, dim=-1)
        return self.query(hidden_states), self.key(hidden_states), self.value(hidden_states)

    def forward(self, hidden_states: Tensor, attention_bias: Tensor | None) -> Tensor:
        """Args:
            hidden_states: (batch_size, seq_len, hidden_size).
            attention_bias: (batch_size, 1, 1, seq_len) bool, True where a key may be attended
                (a real token), or None when no row is padded.

        Returns:
            context: (batch_size, seq_len, hidden_size).
        """
        query, key, value = (self._heads(x) for x in self._project(hidden_states))
        context = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_bias,
            dropout_p=self.dropout_prob if self.training else 0.0,
        )
        batch_size, _, seq_len, _ = context.shape
        return context.transpose(1, 2).reshape(batch_size, seq_len, -1)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, context: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(context)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states: Tensor, attention_bias: Tensor | None) -> Tensor:
        return self.output(self.self(hidden_states, attention_bias), hidden_states)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        if config.hidden_act != "gelu":
            raise ValueError(
                f"config.hidden_act={config.hidden_act!r} is not supported; eeengine's BERT "
                "encoder implements 'gelu' (exact, erf-based) only"
            )
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return F.gelu(self.dense(hidden_states))


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, intermediate: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(intermediate)) + residual)


class BertLayer(nn.Module):
    """One post-LayerNorm transformer block: attention, then feed-forward."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states: Tensor, attention_bias: Tensor | None) -> Tensor:
        """Args:
            hidden_states: (batch_size, seq_len, hidden_size).
            attention_bias: from :func:`attention_bias`.

        Returns:
            hidden_states: (batch_size, seq_len, hidden_size), this layer's output.
        """
        attention_output = self.attention(hidden_states, attention_bias)
        return self.output(self.intermediate(attention_output), attention_output)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertModel(nn.Module):
    """Embeddings plus a stack of layers, driven one layer at a time by the caller.

    ``forward`` runs all layers and returns every layer's hidden states (for training and
    tests); the early-exit runtime calls ``embeddings`` and ``encoder.layer[l]`` itself.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def fuse_qkv(self) -> None:
        """Fuse every layer's query/key/value projections (:meth:`BertSelfAttention.fuse_qkv`)."""
        for layer in self.encoder.layer:
            layer.attention.self.fuse_qkv()

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor
    ) -> list[Tensor]:
        """Run every layer.

        Args:
            input_ids: (batch_size, seq_len) int64.
            attention_mask: (batch_size, seq_len), 1 for real tokens, 0 for padding.
            token_type_ids: (batch_size, seq_len) int64.

        Returns:
            One (batch_size, seq_len, hidden_size) tensor per layer, layer 1 first (the
            embedding output is not included).
        """
        hidden_states = self.embeddings(input_ids, token_type_ids)
        bias = attention_bias(attention_mask)
        all_hidden_states = []
        for layer in self.encoder.layer:
            hidden_states = layer(hidden_states, bias)
            all_hidden_states.append(hidden_states)
        return all_hidden_states


def attention_bias(attention_mask: Tensor) -> Tensor | None:
    """Turn a (batch_size, seq_len) 1/0 mask into the bool SDPA mask of shape
    (batch_size, 1, 1, seq_len), or None when nothing is padded (SDPA's fastest path)."""
    mask = attention_mask.bool()
    if bool(mask.all()):
        return None
    return mask[:, None, None, :]
