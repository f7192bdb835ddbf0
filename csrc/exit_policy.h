// The exit policies of exit_head_step: codes, decoded parameters, and the per-row decision.
// Plain C++ (no torch headers), and host + device code under nvcc, so the CPU op
// (exit_head.cpp) and the CUDA kernel (exit_head_cuda.cu) share one definition.
#pragma once

#include <math.h>

#include <cstdint>

#ifdef __CUDACC__
#define EE_HOST_DEVICE __host__ __device__
#else
#define EE_HOST_DEVICE
#endif

namespace eeengine {

// Exit policy codes of exit_head_step; eeengine._custom_ops.PolicyCode mirrors them.
// Per policy, the layout of `params` and `state` (B = live rows, tau = threshold of this layer):
//   kNone               params []              state []                never exits
//   kEntropy            params [tau]           state []                H < tau (nats)
//   kNormalizedEntropy  params [tau]           state []                H / log C < tau
//   kMaxProb            params [tau]           state []                max softmax >= tau
//   kPatience           params [patience]      state [counter, prev]   PABEE, see decide()
//   kPcee               params [tau, patience] state [counter]         PCEE-BERT, see decide()
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

// The policy and its parameters, decoded and validated once per call.
struct PolicyConfig {
  PolicyCode code;
  float threshold = 0.0f;  // entropy, normalized_entropy, max_prob, pcee
  int64_t patience = 0;    // patience, pcee
  int64_t budget = 0;      // budget: the exit layer k
  int64_t layer;
  int64_t num_layers;
  float log_num_labels;
};

// Exit decision of one row from its logits z[0:C]; updates the row's policy state.
EE_HOST_DEVICE inline bool decide(const PolicyConfig& cfg, const float* z, int64_t num_labels,
                                  int64_t* counter, int64_t* prev_pred) {
  bool exits = false;
  if (cfg.code == PolicyCode::kNone || cfg.code == PolicyCode::kBudget) {
    exits = cfg.code == PolicyCode::kBudget && cfg.layer >= cfg.budget;
  } else {
    // Softmax statistics in fp32, as torch.log_softmax: lse = max + log(sum exp(z - max)).
    // argmax is the first index of the maximum, as torch.argmax.
    int64_t argmax = 0;
    for (int64_t c = 1; c < num_labels; ++c) {
      if (z[c] > z[argmax]) argmax = c;
    }
    const float zmax = z[argmax];
    float sum_exp = 0.0f;
    for (int64_t c = 0; c < num_labels; ++c) sum_exp += expf(z[c] - zmax);
    const float lse = zmax + logf(sum_exp);
    float entropy = 0.0f;
    for (int64_t c = 0; c < num_labels; ++c) {
      const float log_p = z[c] - lse;
      entropy -= expf(log_p) * log_p;
    }
    switch (cfg.code) {
      case PolicyCode::kEntropy:
        exits = entropy < cfg.threshold;
        break;
      case PolicyCode::kNormalizedEntropy:
        exits = entropy / cfg.log_num_labels < cfg.threshold;
        break;
      case PolicyCode::kMaxProb:
        exits = expf(zmax - lse) >= cfg.threshold;
        break;
      case PolicyCode::kPatience:
        // PABEE (Zhou et al. 2020): count consecutive layers whose argmax equals the previous
        // layer's; exit when the count reaches the patience.
        *counter = argmax == *prev_pred ? *counter + 1 : 0;
        *prev_pred = argmax;
        exits = *counter >= cfg.patience;
        break;
      case PolicyCode::kPcee:
        // PCEE-BERT (Zhang et al. 2022, eq. 3): count consecutive confident layers
        // (normalized entropy < tau); exit when the count reaches the patience.
        *counter = entropy / cfg.log_num_labels < cfg.threshold ? *counter + 1 : 0;
        exits = *counter >= cfg.patience;
        break;
      default:
        break;
    }
  }
  // A row that reaches the last layer exits there, whatever the policy says.
  return exits || cfg.layer == cfg.num_layers;
}

}  // namespace eeengine
