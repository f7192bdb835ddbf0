"""A lean BERT encoder that runs one layer at a time.

Module and attribute names follow Hugging Face ``modeling_bert.py`` (``BertEmbeddings``,
``BertSelfAttention``, ``self.LayerNorm`` ...) so a ``BertModel`` state dict loads without key
remapping. Attention uses ``torch.nn.functional.scaled_dot_product_attention`` (SDPA), except
in CPU training with attention dropout (:func:`attention`). Dropout is
:class:`eeengine.dropout.Dropout` (``nn.Dropout``, fused on CPU).

Unlike ``transformers.BertModel``, the encoder does not run all layers in one call: the caller
drives the loop (:meth:`LayerwiseEncoder.embed`, then ``layers[l]``), so an early-exit loop can
stop after any layer and drop rows between layers. RoBERTa and ALBERT
(``modeling_roberta.py``, ``modeling_albert.py``) reuse these modules.

Mask polarity everywhere in eeengine: ``attention_mask`` is 1 (or True) for real tokens and 0 for
padding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import BertConfig, PretrainedConfig

from eeengine import _custom_ops
from eeengine.dropout import Dropout, dropout
from eeengine.token_pruning import TokenPruneOutput, TokenPruning, token_prune_reference


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm (Devlin et al. 2019).

    Args:
        config: the backbone config.
        width: embedding width; ``config.hidden_size`` unless given (ALBERT's embedding_size).
    """

    def __init__(self, config: PretrainedConfig, width: int | None = None) -> None:
        super().__init__()
        width = width or config.hidden_size
        self.word_embeddings = nn.Embedding(
            config.vocab_size, width, padding_idx=config.pad_token_id
        )
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, width)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, width)
        self.LayerNorm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

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


def attention(
    query: Tensor, key: Tensor, value: Tensor, attention_bias: Tensor | None, dropout_p: float
) -> Tensor:
    """Scaled dot-product attention with dropout ``dropout_p`` on the probabilities.

    SDPA, except on CPU with ``dropout_p > 0`` and the extension built: there SDPA falls back to
    its math path, which draws a Bernoulli mask per probability and runs in fp32; this path runs
    the matmuls in the input dtype (bf16 under autocast), the softmax in fp32 and the fused
    seeded dropout (:func:`eeengine.dropout.dropout`). With the fused hidden-state dropout,
    training steps on the default checkpoint's batches are 1.12-1.19x faster (BENCHMARKS.md,
    "Training step").

    Args:
        query, key, value: (batch_size, num_heads, seq_len, head_size).
        attention_bias: (batch_size, 1, 1, seq_len) bool, True where a key may be attended, or
            None.
        dropout_p: 0 in eval mode.

    Returns:
        (batch_size, num_heads, seq_len, head_size), ``value``'s dtype.
    """
    if dropout_p == 0.0 or query.device.type != "cpu" or not _custom_ops.HAS_C:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_bias, dropout_p=dropout_p
        )
    scores = query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5
    if attention_bias is not None:
        scores = scores.masked_fill(~attention_bias, float("-inf"))
    probs = dropout(scores.softmax(dim=-1, dtype=torch.float32), dropout_p, True)
    return probs.to(value.dtype) @ value


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

        The fused copy is used in eval mode with autograd off only (it is a detached copy), and
        dropped by ``train()``; call this again after changing the weights in place outside
        training.
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
        if self.qkv_weight is not None and not self.training and not torch.is_grad_enabled():
            fused = F.linear(hidden_states, self.qkv_weight, self.qkv_bias)
            return fused.chunk(3, dim=-1)
        return self.query(hidden_states), self.key(hidden_states), self.value(hidden_states)

    def forward(
        self, hidden_states: Tensor, attention_bias: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Args:
            hidden_states: (batch_size, seq_len, hidden_size).
            attention_bias: (batch_size, 1, 1, seq_len) bool, True where a key may be attended
                (a real token), or None when no row is padded.

        Returns:
            context: (batch_size, seq_len, hidden_size).
            query, key: (batch_size, num_heads, seq_len, head_size), the projections SDPA
                attended with (token pruning recomputes the [CLS] attention row from them).
        """
        query, key, value = (self._heads(x) for x in self._project(hidden_states))
        context = attention(
            query, key, value, attention_bias, self.dropout_prob if self.training else 0.0
        )
        batch_size, _, seq_len, _ = context.shape
        return context.transpose(1, 2).reshape(batch_size, seq_len, -1), query, key


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, context: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(context)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(
        self, hidden_states: Tensor, attention_bias: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Returns:
        attention_output: (batch_size, seq_len, hidden_size).
        cls_query: (batch_size, num_heads, head_size), the query of [CLS] (position 0).
        key: (batch_size, num_heads, seq_len, head_size).
        """
        context, query, key = self.self(hidden_states, attention_bias)
        return self.output(context, hidden_states), query[:, :, 0], key


# config.hidden_act -> function: exact (erf) GELU, or its tanh approximation (ALBERT's default).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
}


def activation(config: PretrainedConfig) -> Callable[[Tensor], Tensor]:
    """The feed-forward activation named by ``config.hidden_act``.

    Raises:
        ValueError: an activation eeengine does not implement.
    """
    if config.hidden_act not in ACTIVATIONS:
        raise ValueError(
            f"config.hidden_act={config.hidden_act!r} is not supported; eeengine's encoders "
            f"implement {', '.join(ACTIVATIONS)}"
        )
    return ACTIVATIONS[config.hidden_act]


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = activation(config)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, intermediate: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(intermediate)) + residual)


class PrunableLayer(nn.Module):
    """A post-LayerNorm transformer block split as MPEE's token pruning needs (Kong et al.
    2022, section 3.1): ``self.attention`` (returning the attention sublayer's output, the [CLS]
    query and the keys), then :meth:`feed_forward`; :meth:`pruned_forward` prunes between them.
    """

    attention: nn.Module

    def feed_forward(self, attention_output: Tensor) -> Tensor:
        """The feed-forward sublayer: (batch_size, seq_len, hidden_size) -> the same shape."""
        raise NotImplementedError

    def forward(self, hidden_states: Tensor, attention_bias: Tensor | None) -> Tensor:
        """Args:
            hidden_states: (batch_size, seq_len, hidden_size).
            attention_bias: from :func:`attention_bias`.

        Returns:
            hidden_states: (batch_size, seq_len, hidden_size), this layer's output.
        """
        attention_output, _, _ = self.attention(hidden_states, attention_bias)
        return self.feed_forward(attention_output)

    def pruned_forward(
        self,
        hidden_states: Tensor,
        attention_bias: Tensor | None,
        attention_mask: Tensor,
        memory: Tensor,
        keep_ratio: float,
        beta: float,
        prune: Callable[..., TokenPruneOutput] = token_prune_reference,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Attention, then MPEE token pruning, then the feed-forward on the kept tokens and the
        fusion token (see :mod:`eeengine.token_pruning`).

        Args:
            hidden_states: (batch_size, seq_len, hidden_size).
            attention_bias: from :func:`attention_bias` of ``attention_mask``.
            attention_mask: (batch_size, seq_len), 1 for real tokens.
            memory: (batch_size, seq_len - 1) float32, the class-attention memory.
            keep_ratio, beta: r and β_l of this layer.
            prune: ``token_prune_reference`` (differentiable, for training) or the fused op
                :func:`eeengine._custom_ops.token_prune`.

        Returns:
            hidden_states: (batch_size, out_len, hidden_size), this layer's output.
            attention_mask: (batch_size, out_len), the mask after pruning.
            memory: (batch_size, out_len - 1), the memory gathered with the kept tokens.
        """
        attention_output, cls_query, key = self.attention(hidden_states, attention_bias)
        pruned = prune(attention_output, attention_mask, cls_query, key, memory, keep_ratio, beta)
        return self.feed_forward(pruned.hidden_states), pruned.attention_mask, pruned.memory


class BertLayer(PrunableLayer):
    """One post-LayerNorm transformer block: attention, then feed-forward."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def feed_forward(self, attention_output: Tensor) -> Tensor:
        return self.output(self.intermediate(attention_output), attention_output)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class LayerwiseEncoder(nn.Module):
    """What the early-exit loop needs from any backbone (BERT, RoBERTa, ALBERT).

    Subclasses implement :meth:`embed` (token ids to the input of layer 1, hidden_size wide) and
    :attr:`layers` (one callable ``(hidden_states, attention_bias) -> hidden_states`` per
    layer; ALBERT repeats its shared layer), and set ``config``.
    """

    config: PretrainedConfig

    def embed(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        """(batch_size, seq_len) int64 ids -> (batch_size, seq_len, hidden_size)."""
        raise NotImplementedError

    @property
    def layers(self) -> Sequence[nn.Module]:
        """The encoder layers in order, ``num_hidden_layers`` of them."""
        raise NotImplementedError

    @property
    def max_positions(self) -> int:
        """The longest input (tokens, special tokens included) the position embeddings cover."""
        return self.config.max_position_embeddings

    @property
    def supports_token_pruning(self) -> bool:
        """Whether every layer can prune tokens (has ``pruned_forward``, see
        :class:`PrunableLayer`)."""
        return all(hasattr(layer, "pruned_forward") for layer in self.layers)

    @property
    def qkv_fused(self) -> bool:
        """Whether every layer's fused query/key/value projection exists (:meth:`fuse_qkv`)."""
        return all(
            module.qkv_weight is not None
            for module in self.modules()
            if isinstance(module, BertSelfAttention)
        )

    def fuse_qkv(self) -> None:
        """Fuse every layer's query/key/value projections (:meth:`BertSelfAttention.fuse_qkv`)
        into new tensors (call it once: a CUDA graph captured before keeps reading the old ones)."""
        for module in self.modules():
            if isinstance(module, BertSelfAttention):
                module.fuse_qkv()

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
        outputs = self.layer_outputs(input_ids, attention_mask, token_type_ids)
        return [hidden_states for hidden_states, _ in outputs]

    def layer_outputs(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor,
        token_pruning: TokenPruning | None = None,
    ) -> list[tuple[Tensor, Tensor]]:
        """Run every layer, pruning tokens (differentiably) at the schedule's layers.

        Args:
            input_ids, attention_mask, token_type_ids: as in :meth:`forward`.
            token_pruning: the MPEE token-pruning schedule, or None.

        Returns:
            Per layer, layer 1 first: hidden_states (batch_size, seq_len_l, hidden_size) and
            attention_mask (batch_size, seq_len_l), seq_len_l shrinking at pruning layers.

        Raises:
            ValueError: a schedule on a backbone whose layers cannot prune
                (:attr:`supports_token_pruning`).
        """
        if token_pruning is not None and not self.supports_token_pruning:
            raise ValueError(f"token pruning is not supported by {type(self).__name__}")
        hidden_states = self.embed(input_ids, token_type_ids)
        bias = attention_bias(attention_mask)
        memory = hidden_states.new_zeros(*input_ids.shape, dtype=torch.float32)[:, 1:]
        outputs = []
        for index, layer in enumerate(self.layers, start=1):
            beta = token_pruning.beta_at(index) if token_pruning is not None else None
            if beta is None:
                hidden_states = layer(hidden_states, bias)
            else:
                hidden_states, attention_mask, memory = layer.pruned_forward(
                    hidden_states, bias, attention_mask, memory, token_pruning.keep_ratio, beta
                )
                bias = attention_bias(attention_mask)
            outputs.append((hidden_states, attention_mask))
        return outputs


class BertModel(LayerwiseEncoder):
    """Embeddings plus a stack of layers, driven one layer at a time by the caller.

    ``forward`` runs all layers and returns every layer's hidden states (for tests);
    :meth:`layer_outputs` also returns every layer's mask, which token pruning changes (for
    training). The early-exit runtime calls :meth:`embed` and :attr:`layers` itself.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def embed(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        return self.embeddings(input_ids, token_type_ids)

    @property
    def layers(self) -> Sequence[nn.Module]:
        return self.encoder.layer


def attention_bias(attention_mask: Tensor) -> Tensor | None:
    """Turn a (batch_size, seq_len) 1/0 mask into the bool SDPA mask of shape
    (batch_size, 1, 1, seq_len), or, on CPU, None when nothing is padded (SDPA's fastest path;
    finding out reads the mask on the host, a sync elsewhere, so other devices always get the
    mask)."""
    mask = attention_mask.bool()
    if mask.device.type == "cpu" and bool(mask.all()):
        return None
    return mask[:, None, None, :]
