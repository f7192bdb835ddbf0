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

}  // namespace eeengine
