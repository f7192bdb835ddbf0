// exit_head_step on CPU: per row, masked mean pooling -> linear head -> softmax statistics ->
// exit policy state update -> latch of the row's logits and exit layer when it exits.
// One pass over each row's hidden states, fp32 accumulation whatever the input dtype,
// rows in parallel (at::parallel_for) when the batch carries enough work.
//
// Reference semantics (plain torch, the ground truth of the tests): eeengine.heads.ExitHead
// (eval mode, so dropout is the identity) followed by the policy's step in eeengine.policies.
// With EEENGINE_CUDA, also the ATen wrapper of the CUDA kernel (exit_head_cuda.cu), which shares
// the argument checks and the policy decision (exit_policy.h).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "ops.h"

#ifdef EEENGINE_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "exit_head_cuda.h"
#endif

// The inner loops are compiled for AVX-512, AVX2+FMA and baseline x86-64, chosen at load time
// (GCC/Clang function multi-versioning), so one wheel runs everywhere at full width.
#if defined(__linux__) && defined(__x86_64__) && defined(__GNUC__)
#define EE_SIMD __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define EE_SIMD
#endif

namespace eeengine {
namespace {

constexpr int64_t kLanes = 16;
// Minimum number of hidden-state elements per parallel chunk; below it threads cost more
// than they save.
constexpr int64_t kGrainElements = 1 << 15;

// sum_i a[i] * b[i] with kLanes independent partial sums, so the loop vectorizes without
// reassociating floating-point additions (no -ffast-math).
EE_SIMD float dot(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float sum = 0.0f;
  for (int64_t j = 0; j < kLanes; ++j) sum += acc[j];
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// y[i] += alpha * x[i], one overload per hidden-state dtype (x converted to fp32).
EE_SIMD void axpy(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}
EE_SIMD void axpy(float alpha, const c10::Half* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * static_cast<float>(x[i]);
}
EE_SIMD void axpy(float alpha, const c10::BFloat16* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * static_cast<float>(x[i]);
}

EE_SIMD void divide(float* y, float d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] /= d;
}

// Everything a row needs, as raw pointers (sizes validated by the caller).
template <typename scalar_t>
struct StepArgs {
  const scalar_t* hidden;  // [B, N, H] or [B, H], last dim contiguous
  int64_t hidden_stride_b;
  int64_t hidden_stride_n;
  const float* mask;  // [B, N] contiguous, or nullptr for pooled input
  int64_t seq_len;    // N (1 for pooled input)
  int64_t hidden_size;
  const float* weight;  // [C, H] contiguous
  const float* bias;    // [C]
  int64_t num_labels;
  PolicyState state;
  const int64_t* rows;
  float* logits;  // [B, C]
  bool* exit_mask;
  float* out_logits;  // [B0, C]
  int64_t* out_layer;
};

template <typename scalar_t>
void step_rows(const PolicyConfig& cfg, const StepArgs<scalar_t>& a, int64_t begin,
               int64_t end) {
  const int64_t H = a.hidden_size;
  const int64_t C = a.num_labels;
  std::vector<float> pooled(H);
  for (int64_t b = begin; b < end; ++b) {
    const scalar_t* h = a.hidden + b * a.hidden_stride_b;
    std::fill(pooled.begin(), pooled.end(), 0.0f);
    if (a.mask == nullptr) {
      axpy(1.0f, h, pooled.data(), H);
    } else {
      // sum_n mask[n] * h[n] / max(sum_n mask[n], 1), as eeengine.heads.mean_pool.
      const float* m = a.mask + b * a.seq_len;
      float count = 0.0f;
      for (int64_t n = 0; n < a.seq_len; ++n) {
        if (m[n] != 0.0f) axpy(m[n], h + n * a.hidden_stride_n, pooled.data(), H);
        count += m[n];
      }
      divide(pooled.data(), std::max(count, 1.0f), H);
    }
    float* z = a.logits + b * C;
    for (int64_t c = 0; c < C; ++c) z[c] = dot(a.weight + c * H, pooled.data(), H) + a.bias[c];
    const RowState row_s = row_state(a.state, cfg, b, C);
    const bool exits = decide(cfg, z, C, row_s);
    a.exit_mask[b] = exits;
    if (exits) {
      const int64_t row = a.rows[b];
      const float* latched = exit_logits(cfg, z, row_s);
      std::copy(latched, latched + C, a.out_logits + row * C);
      a.out_layer[row] = cfg.layer;
    }
  }
}

int64_t positive_int_param(double value, const char* what) {
  TORCH_CHECK(value >= 1.0 && value == std::floor(value) && value < 9.0e15,
              "exit_head_step: params: ", what, " must be an integer >= 1, got ", value);
  return static_cast<int64_t>(value);
}

void check_vector(const at::Tensor& t, const char* name, int64_t size, at::ScalarType dtype,
                  c10::DeviceType device) {
  TORCH_CHECK(t.device().type() == device, "exit_head_step: ", name, " must be a ", device,
              " tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, "exit_head_step: ", name,
              " must have shape [", size, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "exit_head_step: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
}

// dtype and shape of each state tensor of a policy (the table of exit_policy.h).
struct StateSpec {
  const char* name;
  at::ScalarType dtype;
  std::vector<int64_t> shape;
};
std::vector<StateSpec> state_specs(const PolicyConfig& cfg, int64_t B, int64_t C) {
  switch (cfg.code) {
    case PolicyCode::kPatience:
      return {{"counter", at::kLong, {B}},
              {"previous prediction", C == 1 ? at::kFloat : at::kLong, {B}}};
    case PolicyCode::kPcee:
      return {{"counter", at::kLong, {B}}};
    case PolicyCode::kElbert:
      if (cfg.window_test == WindowTest::kStable) {
        return {{"window of labels", at::kLong, {B, cfg.window}}};
      }
      return {{"window of probabilities", at::kFloat, {B, cfg.window, C}}};
    case PolicyCode::kMpee:
      return {{"classifier memory", at::kFloat, {B, C}}};
    default:
      return {};
  }
}

// Raw pointers of the validated state tensors and LTE score (`lte_score` already fp32).
PolicyState policy_state(const PolicyConfig& cfg, at::TensorList state, int64_t C,
                         const at::Tensor& lte_score) {
  PolicyState s{};
  switch (cfg.code) {
    case PolicyCode::kPatience:
      s.counter = state[0].data_ptr<int64_t>();
      if (C == 1) {
        s.previous_value = state[1].data_ptr<float>();
      } else {
        s.previous = state[1].data_ptr<int64_t>();
      }
      break;
    case PolicyCode::kPcee:
      s.counter = state[0].data_ptr<int64_t>();
      break;
    case PolicyCode::kElbert:
      if (cfg.window_test == WindowTest::kStable) {
        s.window_labels = state[0].data_ptr<int64_t>();
      } else {
        s.window_probs = state[0].data_ptr<float>();
      }
      break;
    case PolicyCode::kMpee:
      s.memory = state[0].data_ptr<float>();
      break;
    case PolicyCode::kLte:
      s.lte_score = lte_score.data_ptr<float>();
      break;
    default:
      break;
  }
  return s;
}

// Sizes and decoded policy of a validated call.
struct CheckedArgs {
  PolicyConfig cfg;
  bool pool;  // hidden_states is [B, N, H] with a mask (else pooled [B, H])
  int64_t B, N, H, C, B0;
};

// Every check of the op's contract that reads no tensor data (so it never syncs a GPU); all
// tensors must be on `device`. The caller checks the range of `rows` where it can.
CheckedArgs check_args(const at::Tensor& hidden_states,
                       const std::optional<at::Tensor>& attention_mask, const at::Tensor& weight,
                       const at::Tensor& bias, int64_t policy, at::ArrayRef<double> params,
                       int64_t layer, int64_t num_layers, at::TensorList state,
                       const at::Tensor& rows, const at::Tensor& out_logits,
                       const at::Tensor& out_layer, const std::optional<at::Tensor>& lte_score,
                       c10::DeviceType device) {
  // hidden_states and attention_mask.
  TORCH_CHECK(hidden_states.device().type() == device, "exit_head_step: hidden_states must be a ",
              device, " tensor, got ", hidden_states.device());
  TORCH_CHECK(hidden_states.dim() == 2 || hidden_states.dim() == 3,
              "exit_head_step: hidden_states must be pooled [B, H] or [B, N, H], got shape ",
              hidden_states.sizes());
  const auto dtype = hidden_states.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "exit_head_step: hidden_states must be float32, float16 or bfloat16, got ", dtype);
  const bool pool = hidden_states.dim() == 3;
  TORCH_CHECK(pool == attention_mask.has_value(),
              "exit_head_step: attention_mask must be given with hidden_states [B, N, H] "
              "(mean pooling) and omitted with pooled hidden_states [B, H]");
  const int64_t B = hidden_states.size(0);
  const int64_t N = pool ? hidden_states.size(1) : 1;
  const int64_t H = hidden_states.size(-1);
  if (pool) {
    const at::Tensor& mask = *attention_mask;
    TORCH_CHECK(mask.device() == hidden_states.device(),
                "exit_head_step: attention_mask must be on the device of hidden_states");
    TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == N,
                "exit_head_step: attention_mask must have shape [", B, ", ", N,
                "] like hidden_states [B, N, H], got ", mask.sizes());
  }

  // Head.
  TORCH_CHECK(weight.device() == hidden_states.device() && bias.device() == hidden_states.device(),
              "exit_head_step: weight and bias must be on the device of hidden_states");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == H,
              "exit_head_step: weight must have shape [C, ", H, "], got ", weight.sizes());
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()) && at::isFloatingType(bias.scalar_type()),
              "exit_head_step: weight and bias must be floating point, got ",
              weight.scalar_type(), " and ", bias.scalar_type());
  const int64_t C = weight.size(0);
  TORCH_CHECK(C >= 1, "exit_head_step: weight must have at least one row (class)");
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == C, "exit_head_step: bias must have shape [", C,
              "], got ", bias.sizes());

  // Policy.
  TORCH_CHECK(policy >= 0 && policy < kNumPolicies,
              "exit_head_step: policy: unknown policy code ", policy);
  PolicyConfig cfg{static_cast<PolicyCode>(policy)};
  const PolicyLayout layout = policy_layout(cfg.code);
  TORCH_CHECK(static_cast<int64_t>(params.size()) == layout.num_params,
              "exit_head_step: params: policy code ", policy, " takes ", layout.num_params,
              " parameter(s), got ", params.size());
  TORCH_CHECK(static_cast<int64_t>(state.size()) == layout.num_state,
              "exit_head_step: state: policy code ", policy, " takes ", layout.num_state,
              " state tensor(s), got ", state.size());
  TORCH_CHECK(num_layers >= 1 && layer >= 1 && layer <= num_layers,
              "exit_head_step: layer must be in [1, num_layers], got layer=", layer,
              ", num_layers=", num_layers);
  const bool regression_ok = cfg.code == PolicyCode::kNone || cfg.code == PolicyCode::kBudget ||
                             cfg.code == PolicyCode::kPatience || cfg.code == PolicyCode::kLte;
  TORCH_CHECK(regression_ok || C >= 2, "exit_head_step: policy code ", policy,
              " needs at least 2 classes, weight has ", C);
  cfg.layer = layer;
  cfg.num_layers = num_layers;
  cfg.log_num_labels = static_cast<float>(std::log(static_cast<double>(C)));
  if (layout.num_params > 0) cfg.threshold = static_cast<float>(params[0]);
  switch (cfg.code) {
    case PolicyCode::kPatience:
      cfg.threshold = 0.0f;
      cfg.patience = positive_int_param(params[0], "patience");
      cfg.delta = static_cast<float>(params[1]);
      break;
    case PolicyCode::kPcee:
      cfg.patience = positive_int_param(params[1], "patience");
      break;
    case PolicyCode::kBudget:
      cfg.threshold = 0.0f;
      cfg.budget = positive_int_param(params[0], "budget layer");
      break;
    case PolicyCode::kElbert:
      cfg.window = positive_int_param(params[1], "window");
      TORCH_CHECK(cfg.window >= 2, "exit_head_step: params: window must be >= 2, got ",
                  cfg.window);
      TORCH_CHECK(params[2] >= 0 && params[2] < kNumWindowTests && params[2] == std::floor(params[2]),
                  "exit_head_step: params: unknown window test code ", params[2]);
      cfg.window_test = static_cast<WindowTest>(static_cast<int64_t>(params[2]));
      cfg.window_range = static_cast<float>(params[3]);
      break;
    case PolicyCode::kMpee:
      TORCH_CHECK(params[1] > 0.0 && params[1] <= 1.0,
                  "exit_head_step: params: memory_weight must be in (0, 1], got ", params[1]);
      cfg.memory_keep = static_cast<float>(1.0 - params[1]);
      cfg.memory_weight = static_cast<float>(params[1]);
      break;
    default:
      break;
  }
  const std::vector<StateSpec> specs = state_specs(cfg, B, C);
  for (size_t i = 0; i < state.size(); ++i) {
    const at::Tensor& t = state[i];
    TORCH_CHECK(t.device().type() == device && t.scalar_type() == specs[i].dtype &&
                    t.sizes() == at::IntArrayRef(specs[i].shape) && t.is_contiguous(),
                "exit_head_step: state[", i, "] must be ", specs[i].dtype, " of shape ",
                at::IntArrayRef(specs[i].shape), ", contiguous, on ", device, " (",
                specs[i].name, "), got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
  }
  TORCH_CHECK(lte_score.has_value() == (cfg.code == PolicyCode::kLte),
              "exit_head_step: lte_score must be given for policy code ",
              static_cast<int64_t>(PolicyCode::kLte), " (lte) and only for it");
  if (lte_score.has_value()) {
    check_vector(*lte_score, "lte_score", B, lte_score->scalar_type(), device);
    TORCH_CHECK(at::isFloatingType(lte_score->scalar_type()),
                "exit_head_step: lte_score must be floating point, got ",
                lte_score->scalar_type());
  }

  // Latch outputs.
  check_vector(rows, "rows", B, at::kLong, device);
  TORCH_CHECK(out_logits.device() == hidden_states.device() &&
                  out_logits.scalar_type() == at::kFloat && out_logits.dim() == 2 &&
                  out_logits.size(1) == C && out_logits.is_contiguous(),
              "exit_head_step: out_logits must be a contiguous float32 tensor [B0, ", C,
              "] on the device of hidden_states, got ", out_logits.scalar_type(), " ",
              out_logits.sizes());
  const int64_t B0 = out_logits.size(0);
  check_vector(out_layer, "out_layer", B0, at::kLong, device);
  TORCH_CHECK(out_layer.is_contiguous(), "exit_head_step: out_layer must be contiguous");
  return {cfg, pool, B, N, H, C, B0};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> exit_head_step(
    const at::Tensor& hidden_states, const std::optional<at::Tensor>& attention_mask,
    const at::Tensor& weight, const at::Tensor& bias, int64_t policy, at::ArrayRef<double> params,
    int64_t layer, int64_t num_layers, at::TensorList state, const at::Tensor& rows,
    at::Tensor& out_logits, at::Tensor& out_layer, const std::optional<at::Tensor>& lte_score) {
  const CheckedArgs checked =
      check_args(hidden_states, attention_mask, weight, bias, policy, params, layer, num_layers,
                 state, rows, out_logits, out_layer, lte_score, c10::DeviceType::CPU);
  const PolicyConfig& cfg = checked.cfg;
  const bool pool = checked.pool;
  const int64_t B = checked.B, N = checked.N, H = checked.H, C = checked.C, B0 = checked.B0;
  const at::Tensor rows_c = rows.contiguous();
  const int64_t* rows_ptr = rows_c.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(rows_ptr[b] >= 0 && rows_ptr[b] < B0, "exit_head_step: rows[", b, "] = ",
                rows_ptr[b], " is out of range for out_logits with ", B0, " rows");
  }

  const at::Tensor hidden = hidden_states.stride(-1) == 1 ? hidden_states
                                                          : hidden_states.contiguous();
  const at::Tensor mask = pool ? attention_mask->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const at::Tensor bvec = bias.to(at::kFloat).contiguous();
  const at::Tensor score = lte_score ? lte_score->to(at::kFloat).contiguous() : at::Tensor();
  const PolicyState policy_ptrs = policy_state(cfg, state, C, score);
  at::Tensor logits = at::empty({B, C}, hidden_states.options().dtype(at::kFloat));
  at::Tensor exit_mask = at::empty({B}, hidden_states.options().dtype(at::kBool));

  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, N * H));
  auto run = [&](auto dtype_tag) {
    using scalar_t = decltype(dtype_tag);
    const StepArgs<scalar_t> args{
        hidden.data_ptr<scalar_t>(),
        hidden.stride(0),
        pool ? hidden.stride(1) : 0,
        pool ? mask.data_ptr<float>() : nullptr,
        N,
        H,
        w.data_ptr<float>(),
        bvec.data_ptr<float>(),
        C,
        policy_ptrs,
        rows_ptr,
        logits.data_ptr<float>(),
        exit_mask.data_ptr<bool>(),
        out_logits.data_ptr<float>(),
        out_layer.data_ptr<int64_t>(),
    };
    at::parallel_for(0, B, grain,
                     [&](int64_t begin, int64_t end) { step_rows(cfg, args, begin, end); });
  };
  const auto dtype = hidden_states.scalar_type();
  if (dtype == at::kFloat) {
    run(float{});
  } else if (dtype == at::kHalf) {
    run(c10::Half{});
  } else {
    run(c10::BFloat16{});
  }
  return {logits, exit_mask};
}

#ifdef EEENGINE_CUDA
std::tuple<at::Tensor, at::Tensor> exit_head_step_cuda(
    const at::Tensor& hidden_states, const std::optional<at::Tensor>& attention_mask,
    const at::Tensor& weight, const at::Tensor& bias, int64_t policy, at::ArrayRef<double> params,
    int64_t layer, int64_t num_layers, at::TensorList state, const at::Tensor& rows,
    at::Tensor& out_logits, at::Tensor& out_layer, const std::optional<at::Tensor>& lte_score) {
  const CheckedArgs checked =
      check_args(hidden_states, attention_mask, weight, bias, policy, params, layer, num_layers,
                 state, rows, out_logits, out_layer, lte_score, c10::DeviceType::CUDA);
  constexpr int64_t kMaxSharedFloats = 48 * 1024 / 4;  // pooled [H] + logits [C] per block
  TORCH_CHECK(checked.H + checked.C <= kMaxSharedFloats, "exit_head_step: hidden size ",
              checked.H, " + classes ", checked.C, " exceed the CUDA kernel's limit of ",
              kMaxSharedFloats);
  const c10::cuda::CUDAGuard guard(hidden_states.device());
  const at::Tensor hidden = hidden_states.stride(-1) == 1 ? hidden_states
                                                          : hidden_states.contiguous();
  const at::Tensor mask =
      checked.pool ? attention_mask->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const at::Tensor bvec = bias.to(at::kFloat).contiguous();
  const at::Tensor rows_c = rows.contiguous();
  const at::Tensor score = lte_score ? lte_score->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor logits = at::empty({checked.B, checked.C}, hidden.options().dtype(at::kFloat));
  at::Tensor exit_mask = at::empty({checked.B}, hidden.options().dtype(at::kBool));
  const auto dtype = hidden.scalar_type();
  const ExitHeadCudaArgs args{
      hidden.data_ptr(),
      dtype == at::kFloat  ? HiddenDtype::kFloat32
      : dtype == at::kHalf ? HiddenDtype::kFloat16
                           : HiddenDtype::kBFloat16,
      hidden.stride(0),
      checked.pool ? hidden.stride(1) : 0,
      checked.pool ? mask.data_ptr<float>() : nullptr,
      checked.B,
      checked.N,
      checked.H,
      w.data_ptr<float>(),
      bvec.data_ptr<float>(),
      checked.C,
      policy_state(checked.cfg, state, checked.C, score),
      rows_c.data_ptr<int64_t>(),
      logits.data_ptr<float>(),
      exit_mask.data_ptr<bool>(),
      out_logits.data_ptr<float>(),
      out_layer.data_ptr<int64_t>(),
  };
  const cudaError_t error =
      launch_exit_head_step(checked.cfg, args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(error == cudaSuccess, "exit_head_step: CUDA kernel launch failed: ",
              cudaGetErrorString(error));
  return {logits, exit_mask};
}
#endif

}  // namespace eeengine
