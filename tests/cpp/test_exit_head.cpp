// C++ unit test of exit_head_step (run by ctest, see CMakeLists.txt): hand-computed cases
// through the direct call and through the dispatcher, and argument errors. The thorough
// comparison against the torch reference is tests/test_exit_head_step.py.
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <string>

#include "expect.h"
#include "ops.h"

using eeengine_test::expect;

namespace {

// Two rows, three tokens, hidden 2, two classes; row 1 has one padding token.
// weight = I, bias = 0, so the logits are the pooled means.
struct Case {
  at::Tensor hidden = at::tensor({4.f, 0.f, 2.f, 0.f, 0.f, 0.f,  //
                                  1.f, 1.f, 0.f, 2.f, 9.f, 9.f})
                          .reshape({2, 3, 2});
  at::Tensor mask = at::tensor({1, 1, 1, 1, 1, 0}, at::kLong).reshape({2, 3});
  at::Tensor weight = at::eye(2);
  at::Tensor bias = at::zeros({2});
  at::Tensor rows = at::tensor({3, 0}, at::kLong);
  at::Tensor out_logits = at::zeros({4, 2});
  at::Tensor out_layer = at::full({4}, -1, at::kLong);
};

void test_entropy_exit_and_latch() {
  Case c;
  // Row 0: logits (2, 0), entropy 0.365 nats; row 1: (0.5, 1.5), entropy 0.582 nats.
  auto [logits, exit_mask] =
      eeengine::exit_head_step(c.hidden, c.mask, c.weight, c.bias,
                               static_cast<int64_t>(eeengine::PolicyCode::kEntropy), {0.5}, 2,
                               6, {}, c.rows, c.out_logits, c.out_layer);
  expect(at::allclose(logits, at::tensor({2.f, 0.f, 0.5f, 1.5f}).reshape({2, 2})),
         "mean pooling over the mask + linear");
  expect(exit_mask[0].item<bool>() && !exit_mask[1].item<bool>(), "entropy < 0.5 exits row 0 only");
  expect(c.out_layer[3].item<int64_t>() == 2 && c.out_layer[0].item<int64_t>() == -1,
         "exit layer latched at rows[0] = 3 only");
  expect(at::allclose(c.out_logits[3], at::tensor({2.f, 0.f})), "logits latched at row 3");
}

void test_patience_through_dispatcher() {
  Case c;
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("eeengine::exit_head_step", "")
                .typed<std::tuple<at::Tensor, at::Tensor>(
                    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                    const at::Tensor&, int64_t, at::ArrayRef<double>, int64_t, int64_t,
                    at::TensorList, const at::Tensor&, at::Tensor&, at::Tensor&,
                    const std::optional<at::Tensor>&)>();
  at::Tensor counter = at::tensor({1, 1}, at::kLong);
  at::Tensor prev = at::tensor({0, 0}, at::kLong);  // row 0 predicts 0 again, row 1 switches
  std::vector<at::Tensor> state{counter, prev};
  auto [logits, exit_mask] =
      op.call(c.hidden, c.mask, c.weight, c.bias,
              static_cast<int64_t>(eeengine::PolicyCode::kPatience), {2.0, 0.0}, 3, 6, state,
              c.rows, c.out_logits, c.out_layer, std::nullopt);
  expect(exit_mask[0].item<bool>() && !exit_mask[1].item<bool>(), "patience 2 exits row 0");
  expect(counter[0].item<int64_t>() == 2 && counter[1].item<int64_t>() == 0, "counters");
  expect(prev[0].item<int64_t>() == 0 && prev[1].item<int64_t>() == 1, "previous argmax");
}

void test_mpee_latches_the_memory() {
  Case c;
  // lambda = 0.5 from a zero memory: m = (1, 0) and (0.25, 0.75), entropies 0.582 and 0.662.
  at::Tensor memory = at::zeros({2, 2});
  auto [logits, exit_mask] = eeengine::exit_head_step(
      c.hidden, c.mask, c.weight, c.bias, static_cast<int64_t>(eeengine::PolicyCode::kMpee),
      {0.6, 0.5}, 2, 6, {memory}, c.rows, c.out_logits, c.out_layer);
  expect(at::allclose(memory, at::tensor({1.f, 0.f, 0.25f, 0.75f}).reshape({2, 2})),
         "memory 0.5 m + 0.5 z");
  expect(exit_mask[0].item<bool>() && !exit_mask[1].item<bool>(), "H(m) < 0.6 exits row 0 only");
  expect(at::allclose(c.out_logits[3], at::tensor({1.f, 0.f})), "the memory is latched");
}

void test_elbert_stable_window() {
  Case c;
  // Stage 1 off (tau 0); window N = 2 of labels 0: row 0 predicts 0 again, row 1 switches to 1.
  at::Tensor window = at::zeros({2, 2}, at::kLong);
  auto [logits, exit_mask] = eeengine::exit_head_step(
      c.hidden, c.mask, c.weight, c.bias, static_cast<int64_t>(eeengine::PolicyCode::kElbert),
      {0.0, 2.0, static_cast<double>(eeengine::WindowTest::kStable), 0.0}, 2, 6, {window},
      c.rows, c.out_logits, c.out_layer);
  expect(exit_mask[0].item<bool>() && !exit_mask[1].item<bool>(), "stable window exits row 0");
  expect(at::equal(window, at::tensor({0, 0, 0, 1}, at::kLong).reshape({2, 2})),
         "window shifted, current label last");
}

void test_last_layer_and_errors() {
  Case c;
  auto [logits, exit_mask] = eeengine::exit_head_step(
      c.hidden, c.mask, c.weight, c.bias, static_cast<int64_t>(eeengine::PolicyCode::kNone), {},
      6, 6, {}, c.rows, c.out_logits, c.out_layer);
  expect(exit_mask.all().item<bool>(), "every row exits at the last layer");
  bool threw = false;
  try {
    eeengine::exit_head_step(c.hidden, std::nullopt, c.weight, c.bias, 0, {}, 1, 6, {}, c.rows,
                             c.out_logits, c.out_layer);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("attention_mask") != std::string::npos;
  }
  expect(threw, "a missing attention_mask is named in the error");
}

}  // namespace

int main() {
  test_entropy_exit_and_latch();
  test_patience_through_dispatcher();
  test_mpee_latches_the_memory();
  test_elbert_stable_window();
  test_last_layer_and_errors();
  return eeengine_test::report("exit_head_step");
}
