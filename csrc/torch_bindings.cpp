// Registers every eeengine op with the dispatcher (library "eeengine").
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(eeengine, m) {
  m.def(
      "exit_head_step(Tensor hidden_states, Tensor? attention_mask, Tensor weight, Tensor bias, "
      "int policy, float[] params, int layer, int num_layers, Tensor(a!)[] state, Tensor rows, "
      "Tensor(b!) out_logits, Tensor(c!) out_layer, Tensor? lte_score=None) -> (Tensor logits, "
      "Tensor exit_mask)");
  m.def(
      "token_prune(Tensor hidden_states, Tensor attention_mask, Tensor cls_query, Tensor key, "
      "Tensor memory, float keep_ratio, float beta) -> (Tensor hidden_states, "
      "Tensor attention_mask, Tensor memory, Tensor kept_indices)");
  m.def("seeded_dropout(Tensor input, float p, int seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(eeengine, CPU, m) {
  m.impl("exit_head_step", &eeengine::exit_head_step);
  m.impl("token_prune", &eeengine::token_prune);
  m.impl("seeded_dropout", &eeengine::seeded_dropout);
}

// CUDA kernels, built only against a CUDA torch (setup.py / CMake define EEENGINE_CUDA).
#ifdef EEENGINE_CUDA
TORCH_LIBRARY_IMPL(eeengine, CUDA, m) {
  m.impl("exit_head_step", &eeengine::exit_head_step_cuda);
}
#endif
