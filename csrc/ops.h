// Declarations of eeengine's C++ ops; every op is registered in torch_bindings.cpp under the
// same name (schema name = C++ name = Python wrapper name in eeengine/_custom_ops.py).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "exit_policy.h"  // PolicyCode

namespace eeengine {

// Exit head (masked mean pooling, linear) + exit policy step + latch of exiting rows.
// Returns (logits [B, C] float32, exit_mask [B] bool); updates `state`, and the rows
// `rows[exit_mask]` of `out_logits` and `out_layer` (the logits, or MPEE's memory), in place.
// `lte_score` [B] (the LTE module's score) is given for the policy kLte and only for it.
std::tuple<at::Tensor, at::Tensor> exit_head_step(
    const at::Tensor& hidden_states, const std::optional<at::Tensor>& attention_mask,
    const at::Tensor& weight, const at::Tensor& bias, int64_t policy, at::ArrayRef<double> params,
    int64_t layer, int64_t num_layers, at::TensorList state, const at::Tensor& rows,
    at::Tensor& out_logits, at::Tensor& out_layer,
    const std::optional<at::Tensor>& lte_score = std::nullopt);

// MPEE token pruning at one layer: [CLS] attention row from cls_query [B, heads, d] and key
// [B, heads, N, d] -> memory update with beta -> keep the top ceil(keep_ratio * c) of the c real
// non-[CLS] tokens of each row (ties: lower position first) -> gather them in order after [CLS],
// append the fusion token of the dropped ones. Returns (hidden_states [B, N', H],
// attention_mask [B, N'] in the input mask's dtype, memory [B, N' - 1] float32,
// kept_indices [B, N'] int64: input position, -1 for the fusion token and padding), N' = 1 + k +
// (k < N - 1) with k = ceil(keep_ratio * (N - 1)). See csrc/token_prune.cpp.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_prune(
    const at::Tensor& hidden_states, const at::Tensor& attention_mask, const at::Tensor& cls_query,
    const at::Tensor& key, const at::Tensor& memory, double keep_ratio, double beta);

// Inverted dropout of `input` (CPU, float32 / float16 / bfloat16) with a mask that is a pure
// function of (seed, flat index): the same seed gives the same mask, so backward is the same op
// on the gradient. Rule in csrc/seeded_dropout.cpp. Returns a contiguous tensor of input's
// shape and dtype.
at::Tensor seeded_dropout(const at::Tensor& input, double p, int64_t seed);

#ifdef EEENGINE_CUDA
// exit_head_step on CUDA tensors (kernel in exit_head_cuda.cu); same contract, except that
// `rows` is not range-checked (that would read device memory on the host).
std::tuple<at::Tensor, at::Tensor> exit_head_step_cuda(
    const at::Tensor& hidden_states, const std::optional<at::Tensor>& attention_mask,
    const at::Tensor& weight, const at::Tensor& bias, int64_t policy, at::ArrayRef<double> params,
    int64_t layer, int64_t num_layers, at::TensorList state, const at::Tensor& rows,
    at::Tensor& out_logits, at::Tensor& out_layer, const std::optional<at::Tensor>& lte_score);
#endif

}  // namespace eeengine
