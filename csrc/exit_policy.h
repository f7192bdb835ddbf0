// The exit policies of exit_head_step: codes, parameter and state layouts, decoded parameters,
// and the per-row decision. Plain C++ (no torch headers), and host + device code under nvcc, so
// the CPU op (exit_head.cpp) and the CUDA kernel (exit_head_cuda.cu) share one definition.
#pragma once

#include <math.h>

#include <cstdint>

#ifdef __CUDACC__
#define EE_HOST_DEVICE __host__ __device__
#else
#define EE_HOST_DEVICE
#endif

// Policy codes and layouts: X(name, code, number of params, number of state tensors).
// eeengine/policy_codes.py (PolicyCode, POLICY_LAYOUTS) states the same table for Python and
// Triton; tests/test_policy_codes.py checks that the two agree.
// Per policy (B live rows, C classes, tau this layer's threshold; counters int64):
//   kNone               params []                     state []
//   kEntropy            params [tau]                  state []          H < tau (nats)
//   kNormalizedEntropy  params [tau]                  state []          H / log C < tau
//   kMaxProb            params [tau]                  state []          max softmax >= tau
//   kPatience           params [patience, delta]      state [counter [B], previous [B]]
//                       PABEE; previous is the int64 argmax (C >= 2, delta unused) or the fp32
//                       value (C == 1, regression: same when |v_l - v_{l-1}| < delta)
//   kPcee               params [tau, patience]        state [counter [B]]
//   kBudget             params [k]                    state []          layer >= k
//   kElbert             params [tau, N, test, r]      state [window]    ELBERT; window is
//                       [B, N] int64 labels (test kStable) else [B, N, C] fp32 probabilities,
//                       oldest first; r is read only by kRange
//   kLte                params [tau]                  state []          lte_score < tau; the
//                       score [B] is an input of the op (only for this policy)
//   kMpee               params [tau, lambda]          state [memory [B, C] fp32]
//                       MPEE; exiting rows latch the memory, not the logits
#define EEENGINE_EXIT_POLICIES(X) \
  X(kNone, 0, 0, 0)               \
  X(kEntropy, 1, 1, 0)            \
  X(kNormalizedEntropy, 2, 1, 0)  \
  X(kMaxProb, 3, 1, 0)            \
  X(kPatience, 4, 2, 2)           \
  X(kPcee, 5, 2, 1)               \
  X(kBudget, 6, 1, 0)             \
  X(kElbert, 7, 4, 1)             \
  X(kLte, 8, 1, 0)                \
  X(kMpee, 9, 2, 1)

// ELBERT's window tests: X(name, code); eeengine/policy_codes.py WindowTest mirrors them.
#define EEENGINE_WINDOW_TESTS(X) \
  X(kMonotonic, 0)               \
  X(kStable, 1)                  \
  X(kRange, 2)

namespace eeengine {

#define EE_ENUM_ENTRY(name, code, ...) name = code,
enum class PolicyCode : int64_t { EEENGINE_EXIT_POLICIES(EE_ENUM_ENTRY) };
enum class WindowTest : int64_t { EEENGINE_WINDOW_TESTS(EE_ENUM_ENTRY) };
#undef EE_ENUM_ENTRY

#define EE_COUNT_ENTRY(...) +1
constexpr int64_t kNumPolicies = 0 EEENGINE_EXIT_POLICIES(EE_COUNT_ENTRY);
constexpr int64_t kNumWindowTests = 0 EEENGINE_WINDOW_TESTS(EE_COUNT_ENTRY);
#undef EE_COUNT_ENTRY

// Number of params and of state tensors of a policy (the table above).
struct PolicyLayout {
  int64_t num_params;
  int64_t num_state;
};
inline PolicyLayout policy_layout(PolicyCode code) {
  switch (code) {
#define EE_LAYOUT_CASE(name, code, num_params, num_state) \
  case PolicyCode::name:                                  \
    return {num_params, num_state};
    EEENGINE_EXIT_POLICIES(EE_LAYOUT_CASE)
#undef EE_LAYOUT_CASE
  }
  return {0, 0};
}

// The policy and its parameters, decoded and validated once per call.
struct PolicyConfig {
  PolicyCode code;
  float threshold = 0.0f;  // tau: entropy, normalized_entropy, max_prob, pcee, elbert, lte, mpee
  int64_t patience = 0;    // patience, pcee
  float delta = 0.0f;      // patience on a regression head (C == 1)
  int64_t budget = 0;      // budget: the exit layer k
  int64_t window = 0;      // elbert: N
  WindowTest window_test = WindowTest::kMonotonic;
  float window_range = 0.0f;  // elbert, kRange: r
  float memory_keep = 0.0f;   // mpee: 1 - lambda, rounded to fp32 as torch rounds the scalar
  float memory_weight = 0.0f;  // mpee: lambda
  int64_t layer;
  int64_t num_layers;
  float log_num_labels;
};

// Base pointers of the policy's state tensors and of the LTE score (nullptr where the policy
// has none), for all B rows; row_state() offsets them to one row.
struct PolicyState {
  int64_t* counter;         // [B]                kPatience, kPcee
  int64_t* previous;        // [B]                kPatience, C >= 2
  float* previous_value;    // [B]                kPatience, C == 1
  int64_t* window_labels;   // [B, N]             kElbert, kStable
  float* window_probs;      // [B, N, C]          kElbert, kMonotonic and kRange
  float* memory;            // [B, C]             kMpee
  const float* lte_score;   // [B]                kLte
};

// One row's view of PolicyState.
struct RowState {
  int64_t* counter;
  int64_t* previous;
  float* previous_value;
  int64_t* window_labels;  // [N]
  float* window_probs;     // [N, C]
  float* memory;           // [C]
  float lte_score;
};

EE_HOST_DEVICE inline RowState row_state(const PolicyState& s, const PolicyConfig& cfg,
                                         int64_t b, int64_t num_labels) {
  const int64_t n = cfg.window;
  return {
      s.counter ? s.counter + b : nullptr,
      s.previous ? s.previous + b : nullptr,
      s.previous_value ? s.previous_value + b : nullptr,
      s.window_labels ? s.window_labels + b * n : nullptr,
      s.window_probs ? s.window_probs + b * n * num_labels : nullptr,
      s.memory ? s.memory + b * num_labels : nullptr,
      s.lte_score ? s.lte_score[b] : 0.0f,
  };
}

// Softmax statistics of v[0:C] in fp32, as torch.log_softmax: lse = max + log(sum exp(v - max));
// argmax is the first index of the maximum, as torch.argmax.
struct SoftmaxStats {
  int64_t argmax;
  float max;
  float sum_exp;
  float lse;
  float entropy;  // nats
};

EE_HOST_DEVICE inline SoftmaxStats softmax_stats(const float* v, int64_t num_labels) {
  SoftmaxStats s{};
  for (int64_t c = 1; c < num_labels; ++c) {
    if (v[c] > v[s.argmax]) s.argmax = c;
  }
  s.max = v[s.argmax];
  for (int64_t c = 0; c < num_labels; ++c) s.sum_exp += expf(v[c] - s.max);
  s.lse = s.max + logf(s.sum_exp);
  for (int64_t c = 0; c < num_labels; ++c) {
    const float log_p = v[c] - s.lse;
    s.entropy -= expf(log_p) * log_p;
  }
  return s;
}

// ELBERT's second stage (Xie et al. 2021, Sec. 3.3): append this layer to the row's window of
// the last N layers (oldest first, dropping the oldest; at layer 1 every entry is layer 1, as in
// the reference, never tested) and test the window for the current prediction c (generalized
// from p(class 0) to p(c)).
EE_HOST_DEVICE inline bool elbert_window_steady(const PolicyConfig& cfg, const float* z,
                                                int64_t num_labels, const SoftmaxStats& s,
                                                const RowState& row) {
  const int64_t n = cfg.window;
  const int64_t c = s.argmax;
  const int64_t first = cfg.layer == 1 ? 0 : n - 1;  // the first entry written
  if (cfg.window_test == WindowTest::kStable) {
    int64_t* labels = row.window_labels;
    for (int64_t k = 0; k < first; ++k) labels[k] = labels[k + 1];
    for (int64_t k = first; k < n; ++k) labels[k] = c;
    bool steady = true;
    for (int64_t k = 0; k < n; ++k) steady = steady && labels[k] == c;
    return steady;
  }
  float* probs = row.window_probs;  // [N, C]
  for (int64_t i = 0; i < first * num_labels; ++i) probs[i] = probs[i + num_labels];
  // softmax as torch.softmax computes it: exp(z - max) * (1 / sum).
  const float inv_sum = 1.0f / s.sum_exp;
  for (int64_t k = first; k < n; ++k) {
    for (int64_t i = 0; i < num_labels; ++i) {
      probs[k * num_labels + i] = expf(z[i] - s.max) * inv_sum;
    }
  }
  const float* q = probs + c;  // q_k = q[k * num_labels]
  bool steady = true;
  float lo = q[0], hi = q[0];
  for (int64_t k = 1; k < n; ++k) {
    const float qk = q[k * num_labels];
    steady = steady && qk >= q[(k - 1) * num_labels];
    lo = fminf(lo, qk);
    hi = fmaxf(hi, qk);
  }
  return cfg.window_test == WindowTest::kMonotonic ? steady : hi - lo <= cfg.window_range;
}

// Exit decision of one row from its logits z[0:C]; updates the row's policy state.
EE_HOST_DEVICE inline bool decide(const PolicyConfig& cfg, const float* z, int64_t num_labels,
                                  const RowState& row) {
  bool exits = false;
  switch (cfg.code) {
    case PolicyCode::kNone:
      break;
    case PolicyCode::kBudget:
      exits = cfg.layer >= cfg.budget;
      break;
    case PolicyCode::kLte:
      // BERxiT learning-to-exit (Xin et al. 2021, Sec. 4.2): s_l predicts "not yet correct".
      exits = row.lte_score < cfg.threshold;
      break;
    case PolicyCode::kPatience: {
      // PABEE (Zhou et al. 2020): count consecutive layers whose prediction agrees with the
      // previous layer's (regression: |v_l - v_{l-1}| < delta); exit when it reaches patience.
      bool same;
      if (num_labels == 1) {
        same = cfg.layer > 1 && fabsf(z[0] - *row.previous_value) < cfg.delta;
        *row.previous_value = z[0];
      } else {
        const int64_t argmax = softmax_stats(z, num_labels).argmax;
        same = cfg.layer > 1 && argmax == *row.previous;
        *row.previous = argmax;
      }
      *row.counter = same ? *row.counter + 1 : 0;
      exits = *row.counter >= cfg.patience;
      break;
    }
    case PolicyCode::kMpee: {
      // MPEE (Kong et al. 2022, eq. 10): m_1 = z_1, m_l = (1 - lambda) m_{l-1} + lambda z_l;
      // exit when H(softmax(m_l)) < tau (nats).
      for (int64_t c = 0; c < num_labels; ++c) {
        row.memory[c] = cfg.layer == 1 ? z[c]
                                       : cfg.memory_keep * row.memory[c] + cfg.memory_weight * z[c];
      }
      exits = softmax_stats(row.memory, num_labels).entropy < cfg.threshold;
      break;
    }
    default: {
      const SoftmaxStats s = softmax_stats(z, num_labels);
      const float normalized = s.entropy / cfg.log_num_labels;
      switch (cfg.code) {
        case PolicyCode::kEntropy:
          exits = s.entropy < cfg.threshold;
          break;
        case PolicyCode::kNormalizedEntropy:
          exits = normalized < cfg.threshold;
          break;
        case PolicyCode::kMaxProb:
          // max softmax as torch.softmax computes it: exp(max - max) * (1 / sum) = 1 / sum.
          exits = 1.0f / s.sum_exp >= cfg.threshold;
          break;
        case PolicyCode::kPcee:
          // PCEE-BERT (Zhang et al. 2022, eq. 3): count consecutive confident layers
          // (normalized entropy < tau); exit when the count reaches the patience.
          *row.counter = normalized < cfg.threshold ? *row.counter + 1 : 0;
          exits = *row.counter >= cfg.patience;
          break;
        case PolicyCode::kElbert: {
          // Stage 1 (eq. 5): normalized entropy < tau; stage 2 from layer N on: the window.
          // The window is updated at every layer, whichever stage decides.
          const bool steady = elbert_window_steady(cfg, z, num_labels, s, row);
          exits = normalized < cfg.threshold || (steady && cfg.layer >= cfg.window);
          break;
        }
        default:
          break;
      }
    }
  }
  // A row that reaches the last layer exits there, whatever the policy says.
  return exits || cfg.layer == cfg.num_layers;
}

// The logits an exiting row latches: the classifier memory for MPEE, else the head's logits.
EE_HOST_DEVICE inline const float* exit_logits(const PolicyConfig& cfg, const float* z,
                                               const RowState& row) {
  return cfg.code == PolicyCode::kMpee ? row.memory : z;
}

}  // namespace eeengine
