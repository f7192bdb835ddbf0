// Declarations of eeengine's C++ ops; every op is registered in torch_bindings.cpp under the
// same name (schema name = C++ name = Python wrapper name in eeengine/_custom_ops.py).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace eeengine {

// Exit policy codes of exit_head_step; eeengine._custom_ops.PolicyCode mirrors them.
// Per policy, the layout of `params` and `state` (B = live rows, tau = threshold of this layer):
//   kNone               params []              state []                never exits
//   kEntropy            params [tau]           state []                H < tau (nats)
//   kNormalizedEntropy  params [tau]           state []                H / log C < tau
//   kMaxProb            params [tau]           state []                max softmax >= tau
//   kPatience           params [patience]      state [counter, prev]   PABEE, see exit_head.cpp
//   kPcee               params [tau, patience] state [counter]         PCEE-BERT, see exit_head.cpp
//   kBudget             params [k]             state []                layer >= k
// State tensors are int64 of shape [B]; `prev` (previous argmax) starts at -1.
enum class PolicyCode : int64_t {
  kNone = 0,
  kEntropy = 1,
  kNormalizedEntropy = 2,
  kMaxProb = 3,
  kPatience = 4,
  kPcee = 5,
  kBudget = 6,
};

// Exit head (masked mean pooling, linear) + exit policy step + latch of exiting rows.
// Returns (logits [B, C] float32, exit_mask [B] bool); updates `state`, and the rows
// `rows[exit_mask]` of `out_logits` and `out_layer`, in place.
std::tuple<at::Tensor, at::Tensor> exit_head_step(
    const at::Tensor& hidden_states, const std::optional<at::Tensor>& attention_mask,
    const at::Tensor& weight, const at::Tensor& bias, int64_t policy, at::ArrayRef<double> params,
    int64_t layer, int64_t num_layers, at::TensorList state, const at::Tensor& rows,
    at::Tensor& out_logits, at::Tensor& out_layer);

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

}  // namespace eeengine
