// exit_head_step on CUDA: one block per row, masked mean pooling -> linear head (one warp per
// class, shuffle reduction) -> exit policy and its state (decide() of exit_policy.h, shared
// with the CPU op: every policy, ELBERT's window and MPEE's memory included)
// -> latch of the row's logits and exit layer when it exits. fp32 accumulation whatever the
// input dtype. Nothing is read back on the host, so the op can be captured in a CUDA graph.
//
// Plain CUDA headers only: nvcc compiles this file without torch's CUDA headers (a compile check
// on machines whose torch is a CPU build); the ATen wrapper is exit_head_step_cuda in
// exit_head.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "exit_head_cuda.h"

namespace eeengine {
namespace {

constexpr int kThreads = 128;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;

__device__ inline float to_float(float x) { return x; }
__device__ inline float to_float(__half x) { return __half2float(x); }
__device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ inline float warp_sum(float value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

// Dynamic shared memory: pooled hidden state [H] then the row's logits [C].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    exit_head_step_kernel(const PolicyConfig cfg, const ExitHeadCudaArgs a) {
  extern __shared__ float shared[];
  const int64_t H = a.hidden_size;
  const int64_t C = a.num_labels;
  float* pooled = shared;
  float* z = shared + H;
  const int64_t b = blockIdx.x;
  const scalar_t* h = static_cast<const scalar_t*>(a.hidden) + b * a.hidden_stride_b;

  // Masked mean pooling, as eeengine.heads.mean_pool: thread t owns the hidden indices
  // t, t + kThreads, ... (coalesced loads, no races); padding tokens are never loaded.
  if (a.mask == nullptr) {
    for (int64_t i = threadIdx.x; i < H; i += kThreads) pooled[i] = to_float(h[i]);
  } else {
    const float* m = a.mask + b * a.seq_len;
    for (int64_t i = threadIdx.x; i < H; i += kThreads) pooled[i] = 0.0f;
    float count = 0.0f;
    for (int64_t n = 0; n < a.seq_len; ++n) {
      const float weight = m[n];  // the same for the whole block: no divergence
      count += weight;
      if (weight == 0.0f) continue;
      const scalar_t* token = h + n * a.hidden_stride_n;
      for (int64_t i = threadIdx.x; i < H; i += kThreads) pooled[i] += weight * to_float(token[i]);
    }
    const float divisor = fmaxf(count, 1.0f);
    for (int64_t i = threadIdx.x; i < H; i += kThreads) pooled[i] /= divisor;
  }
  __syncthreads();

  // Linear head: warp w computes classes w, w + kWarps, ...; its lanes split H.
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t c = warp; c < C; c += kWarps) {
    const float* w = a.weight + c * H;
    float acc = 0.0f;
    for (int64_t i = lane; i < H; i += kWarpSize) acc += w[i] * pooled[i];
    acc = warp_sum(acc);
    if (lane == 0) {
      z[c] = acc + a.bias[c];
      a.logits[b * C + c] = z[c];
    }
  }
  __syncthreads();

  // Policy step and latch: C and the window are small, one thread.
  if (threadIdx.x == 0) {
    const RowState row_s = row_state(a.state, cfg, b, C);
    const bool exits = decide(cfg, z, C, row_s);
    a.exit_mask[b] = exits;
    if (exits) {
      const int64_t row = a.rows[b];
      const float* latched = exit_logits(cfg, z, row_s);
      for (int64_t c = 0; c < C; ++c) a.out_logits[row * C + c] = latched[c];
      a.out_layer[row] = cfg.layer;
    }
  }
}

template <typename scalar_t>
void launch(const PolicyConfig& cfg, const ExitHeadCudaArgs& args, cudaStream_t stream) {
  const size_t shared_bytes = static_cast<size_t>(args.hidden_size + args.num_labels) * 4;
  exit_head_step_kernel<scalar_t>
      <<<static_cast<unsigned int>(args.batch_size), kThreads, shared_bytes, stream>>>(cfg, args);
}

}  // namespace

cudaError_t launch_exit_head_step(const PolicyConfig& cfg, const ExitHeadCudaArgs& args,
                                  cudaStream_t stream) {
  if (args.batch_size == 0) return cudaSuccess;
  switch (args.dtype) {
    case HiddenDtype::kFloat32:
      launch<float>(cfg, args, stream);
      break;
    case HiddenDtype::kFloat16:
      launch<__half>(cfg, args, stream);
      break;
    case HiddenDtype::kBFloat16:
      launch<__nv_bfloat16>(cfg, args, stream);
      break;
  }
  return cudaGetLastError();
}

}  // namespace eeengine
