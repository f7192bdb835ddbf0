// The thin interface between the CUDA kernel of exit_head_step (exit_head_cuda.cu, plain CUDA
// headers only, so nvcc compiles it without torch's CUDA headers) and its ATen wrapper
// (exit_head_step_cuda in exit_head.cpp, which validates the tensors and passes raw pointers).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "exit_policy.h"

namespace eeengine {

enum class HiddenDtype { kFloat32, kFloat16, kBFloat16 };

// Device pointers and sizes of one exit_head_step call (B rows, N tokens, H hidden, C classes).
struct ExitHeadCudaArgs {
  const void* hidden;  // [B, N, H] (or [B, H] with N = 1), last dim contiguous, `dtype`
  HiddenDtype dtype;
  int64_t hidden_stride_b;
  int64_t hidden_stride_n;
  const float* mask;  // [B, N] contiguous, or nullptr for pooled input
  int64_t batch_size;
  int64_t seq_len;
  int64_t hidden_size;
  const float* weight;  // [C, H] contiguous
  const float* bias;    // [C]
  int64_t num_labels;
  PolicyState state;  // the policy's state and the LTE score
  const int64_t* rows;
  float* logits;  // [B, C]
  bool* exit_mask;
  float* out_logits;  // [B0, C]
  int64_t* out_layer;
};

// Launches one block per row on `stream`; returns the launch error, if any.
cudaError_t launch_exit_head_step(const PolicyConfig& cfg, const ExitHeadCudaArgs& args,
                                  cudaStream_t stream);

}  // namespace eeengine
