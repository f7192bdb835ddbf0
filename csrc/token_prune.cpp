// token_prune on CPU (MPEE token-wise exit, Kong et al. 2022, section 3.1). Per row:
// [CLS] attention row from the layer's query and keys -> class-attention memory update ->
// top-k of the memory -> kept tokens gathered in order + one fusion token of the dropped ones.
// fp32 math whatever the input dtype; rows in parallel (at::parallel_for).
//
// Reference semantics (plain torch, the ground truth of the tests):
// eeengine.token_pruning.token_prune_reference, whose module docstring states the rule, the
// fusion weights (memory renormalised over the dropped tokens) and the tie-breaking (lower
// position first).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "ops.h"

namespace eeengine {
namespace {

// Minimum number of hidden-state elements per parallel chunk.
constexpr int64_t kGrainElements = 1 << 15;

// Everything a row needs, as raw pointers (sizes validated by the caller). Strided inputs
// need only a contiguous last dimension.
template <typename scalar_t>
struct PruneArgs {
  const scalar_t* hidden;  // [B, N, H]
  int64_t hidden_stride_b, hidden_stride_n;
  const float* mask;  // [B, N] contiguous
  const scalar_t* query;  // [B, heads, d]
  int64_t query_stride_b, query_stride_h;
  const scalar_t* key;  // [B, heads, N, d]
  int64_t key_stride_b, key_stride_h, key_stride_n;
  const float* memory;  // [B, N - 1] contiguous
  int64_t seq_len, hidden_size, num_heads, head_size, out_len;
  double keep_ratio;
  float one_minus_beta, beta, scale;
  scalar_t* out_hidden;   // [B, out_len, H] contiguous, zero-filled
  float* out_mask;        // [B, out_len] contiguous, zero-filled
  float* out_memory;      // [B, out_len - 1] contiguous, zero-filled
  int64_t* kept_indices;  // [B, out_len] contiguous, filled with -1
};

template <typename scalar_t>
float dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<float>(a[i]) * static_cast<float>(b[i]);
  return sum;
}

template <typename scalar_t>
void prune_rows(const PruneArgs<scalar_t>& a, int64_t begin, int64_t end) {
  const int64_t N = a.seq_len;
  const int64_t H = a.hidden_size;
  std::vector<float> scores(N), attention(N), memory(N > 0 ? N - 1 : 0), fusion(H);
  std::vector<int64_t> candidates;
  candidates.reserve(N);
  for (int64_t b = begin; b < end; ++b) {
    const float* mask = a.mask + b * N;
    const scalar_t* hidden = a.hidden + b * a.hidden_stride_b;

    // 1. a_n = mean_h softmax over real keys of q_cls,h . K_h,n * scale (0 on padding).
    std::fill(attention.begin(), attention.end(), 0.0f);
    for (int64_t h = 0; h < a.num_heads; ++h) {
      const scalar_t* q = a.query + b * a.query_stride_b + h * a.query_stride_h;
      const scalar_t* k = a.key + b * a.key_stride_b + h * a.key_stride_h;
      float max_score = -std::numeric_limits<float>::infinity();
      for (int64_t n = 0; n < N; ++n) {
        if (mask[n] == 0.0f) continue;
        scores[n] = dot(q, k + n * a.key_stride_n, a.head_size) * a.scale;
        max_score = std::max(max_score, scores[n]);
      }
      float sum = 0.0f;
      for (int64_t n = 0; n < N; ++n) {
        if (mask[n] == 0.0f) continue;
        scores[n] = std::exp(scores[n] - max_score);
        sum += scores[n];
      }
      for (int64_t n = 0; n < N; ++n) {
        if (mask[n] != 0.0f) attention[n] += scores[n] / sum;
      }
    }

    // 2. m_l = (1 - beta) m_{l-1} + beta a_l over the real non-[CLS] tokens (0 on padding).
    candidates.clear();
    for (int64_t n = 1; n < N; ++n) {
      if (mask[n] == 0.0f) {
        memory[n - 1] = 0.0f;
        continue;
      }
      memory[n - 1] = a.one_minus_beta * a.memory[b * (N - 1) + n - 1] +
                      a.beta * (attention[n] / static_cast<float>(a.num_heads));
      candidates.push_back(n);
    }

    // 3. The k highest memories, ties to the lower position; then kept in position order,
    // dropped after them.
    const int64_t count = static_cast<int64_t>(candidates.size());
    const int64_t kept = static_cast<int64_t>(std::ceil(a.keep_ratio * static_cast<double>(count)));
    auto score_of = [&](int64_t n) {
      const float m = memory[n - 1];
      return std::isnan(m) ? -std::numeric_limits<float>::infinity() : m;
    };
    auto higher = [&](int64_t i, int64_t j) {
      const float mi = score_of(i), mj = score_of(j);
      return mi > mj || (mi == mj && i < j);
    };
    if (kept < count) {
      std::nth_element(candidates.begin(), candidates.begin() + kept, candidates.end(), higher);
    }
    std::sort(candidates.begin(), candidates.begin() + kept);
    std::sort(candidates.begin() + kept, candidates.end());

    // 4.-5. Output row: [CLS], kept tokens, fusion token, padding (already zero / -1).
    scalar_t* out_h = a.out_hidden + b * a.out_len * H;
    float* out_m = a.out_mask + b * a.out_len;
    float* out_mem = a.out_memory + b * (a.out_len - 1);
    int64_t* out_idx = a.kept_indices + b * a.out_len;
    std::copy(hidden, hidden + H, out_h);
    out_m[0] = mask[0] != 0.0f ? 1.0f : 0.0f;
    out_idx[0] = 0;
    for (int64_t j = 0; j < kept; ++j) {
      const int64_t n = candidates[j];
      const scalar_t* src = hidden + n * a.hidden_stride_n;
      std::copy(src, src + H, out_h + (1 + j) * H);
      out_m[1 + j] = 1.0f;
      out_mem[j] = memory[n - 1];
      out_idx[1 + j] = n;
    }
    if (kept == count) continue;
    // h_fuse = sum_j w_j h_j, w_j = m_j / sum of the dropped memories (uniform if it is 0).
    float total = 0.0f;
    for (int64_t j = kept; j < count; ++j) total += memory[candidates[j] - 1];
    std::fill(fusion.begin(), fusion.end(), 0.0f);
    for (int64_t j = kept; j < count; ++j) {
      const int64_t n = candidates[j];
      const float w =
          total > 0.0f ? memory[n - 1] / total : 1.0f / static_cast<float>(count - kept);
      const scalar_t* src = hidden + n * a.hidden_stride_n;
      for (int64_t i = 0; i < H; ++i) fusion[i] += w * static_cast<float>(src[i]);
    }
    scalar_t* out_fusion = out_h + (1 + kept) * H;
    for (int64_t i = 0; i < H; ++i) out_fusion[i] = static_cast<scalar_t>(fusion[i]);
    out_m[1 + kept] = 1.0f;
    out_mem[kept] = total;
  }
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "token_prune: ", name, " must be a CPU tensor, got ",
              t.device());
}

// t with a contiguous last dimension (a copy only when it is strided).
at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

// Output width: 1 + k + (1 if k < N - 1, the fusion token), k = ceil(r (N - 1)); the length of
// a row whose tokens are all real (eeengine.token_pruning.pruned_length).
int64_t pruned_length(int64_t seq_len, double keep_ratio) {
  if (seq_len <= 1) return seq_len;
  const int64_t kept =
      static_cast<int64_t>(std::ceil(keep_ratio * static_cast<double>(seq_len - 1)));
  return 1 + kept + (kept < seq_len - 1 ? 1 : 0);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_prune(
    const at::Tensor& hidden_states, const at::Tensor& attention_mask, const at::Tensor& cls_query,
    const at::Tensor& key, const at::Tensor& memory, double keep_ratio, double beta) {
  for (auto [t, name] : {std::pair{&hidden_states, "hidden_states"},
                         {&attention_mask, "attention_mask"}, {&cls_query, "cls_query"},
                         {&key, "key"}, {&memory, "memory"}}) {
    check_cpu(*t, name);
  }
  TORCH_CHECK(hidden_states.dim() == 3, "token_prune: hidden_states must have shape [B, N, H], ",
              "got ", hidden_states.sizes());
  const auto dtype = hidden_states.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "token_prune: hidden_states must be float32, float16 or bfloat16, got ", dtype);
  const int64_t B = hidden_states.size(0);
  const int64_t N = hidden_states.size(1);
  const int64_t H = hidden_states.size(2);
  TORCH_CHECK(N >= 1, "token_prune: hidden_states must hold at least the [CLS] token, got N = 0");
  TORCH_CHECK(attention_mask.dim() == 2 && attention_mask.size(0) == B &&
                  attention_mask.size(1) == N,
              "token_prune: attention_mask must have shape [", B, ", ", N, "], got ",
              attention_mask.sizes());
  TORCH_CHECK(cls_query.dim() == 3 && cls_query.size(0) == B,
              "token_prune: cls_query must have shape [", B, ", heads, head_size], got ",
              cls_query.sizes());
  const int64_t heads = cls_query.size(1);
  const int64_t head_size = cls_query.size(2);
  TORCH_CHECK(heads >= 1 && head_size >= 1, "token_prune: cls_query must have heads >= 1 and ",
              "head_size >= 1, got ", cls_query.sizes());
  TORCH_CHECK(key.dim() == 4 && key.size(0) == B && key.size(1) == heads && key.size(2) == N &&
                  key.size(3) == head_size,
              "token_prune: key must have shape [", B, ", ", heads, ", ", N, ", ", head_size,
              "], got ", key.sizes());
  TORCH_CHECK(cls_query.scalar_type() == dtype && key.scalar_type() == dtype,
              "token_prune: cls_query and key must have the dtype of hidden_states (", dtype,
              "), got ", cls_query.scalar_type(), " and ", key.scalar_type());
  TORCH_CHECK(memory.dim() == 2 && memory.size(0) == B && memory.size(1) == N - 1,
              "token_prune: memory must have shape [", B, ", ", N - 1, "], got ", memory.sizes());
  TORCH_CHECK(memory.scalar_type() == at::kFloat, "token_prune: memory must be float32, got ",
              memory.scalar_type());
  TORCH_CHECK(keep_ratio >= 0.0 && keep_ratio <= 1.0,
              "token_prune: keep_ratio must be in [0, 1], got ", keep_ratio);
  TORCH_CHECK(beta >= 0.0 && beta <= 1.0, "token_prune: beta must be in [0, 1], got ", beta);

  const int64_t out_len = pruned_length(N, keep_ratio);
  const at::Tensor hidden = last_dim_contiguous(hidden_states);
  const at::Tensor query = last_dim_contiguous(cls_query);
  const at::Tensor keys = last_dim_contiguous(key);
  const at::Tensor mask = attention_mask.to(at::kFloat).contiguous();
  const at::Tensor memory_in = memory.contiguous();
  at::Tensor out_hidden = at::zeros({B, out_len, H}, hidden_states.options());
  at::Tensor out_mask = at::zeros({B, out_len}, hidden_states.options().dtype(at::kFloat));
  at::Tensor out_memory = at::zeros({B, out_len - 1}, memory.options());
  at::Tensor kept_indices = at::full({B, out_len}, -1, hidden_states.options().dtype(at::kLong));

  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, N * H));
  auto run = [&](auto dtype_tag) {
    using scalar_t = decltype(dtype_tag);
    const PruneArgs<scalar_t> args{
        hidden.data_ptr<scalar_t>(),
        hidden.stride(0),
        hidden.stride(1),
        mask.data_ptr<float>(),
        query.data_ptr<scalar_t>(),
        query.stride(0),
        query.stride(1),
        keys.data_ptr<scalar_t>(),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        memory_in.data_ptr<float>(),
        N,
        H,
        heads,
        head_size,
        out_len,
        keep_ratio,
        static_cast<float>(1.0 - beta),
        static_cast<float>(beta),
        static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_size))),
        out_hidden.data_ptr<scalar_t>(),
        out_mask.data_ptr<float>(),
        out_memory.data_ptr<float>(),
        kept_indices.data_ptr<int64_t>(),
    };
    at::parallel_for(0, B, grain,
                     [&](int64_t begin, int64_t end) { prune_rows(args, begin, end); });
  };
  if (dtype == at::kFloat) {
    run(float{});
  } else if (dtype == at::kHalf) {
    run(c10::Half{});
  } else {
    run(c10::BFloat16{});
  }
  return {out_hidden, out_mask.to(attention_mask.scalar_type()), out_memory, kept_indices};
}

}  // namespace eeengine
