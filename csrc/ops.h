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
// `rows[exit_mask]` of `out_logits` and `out_layer`, in place.
std::tuple<at::Tensor, at::Tensor> exit_head_step(
    const at::Tensor& hidden_states, const std::optional<at::Tensor>& attention_mask,
    const at::Tensor& weight, const at::Tensor& bias, int64_t policy, at::ArrayRef<double> params,
    int64_t layer, int64_t num_layers, at::TensorList state, const at::Tensor& rows,
    at::Tensor& out_logits, at::Tensor& out_layer);

#ifdef EEENGINE_CUDA
// exit_head_step on CUDA tensors (kernel in exit_head_cuda.cu); same contract, except that
// `rows` is not range-checked (that would read device memory on the host).
std::tuple<at::Tensor, at::Tensor> exit_head_step_cuda(
    const at::Tensor& hidden_states, const std::optional<at::Tensor>& attention_mask,
    const at::Tensor& weight, const at::Tensor& bias, int64_t policy, at::ArrayRef<double> params,
    int64_t layer, int64_t num_layers, at::TensorList state, const at::Tensor& rows,
    at::Tensor& out_logits, at::Tensor& out_layer);
#endif

}  // namespace eeengine
