// C++ unit test of token_prune (run by ctest, see CMakeLists.txt): a hand-computed case, keep
// ratio 1 as the identity, and a named argument error. The thorough comparison against the
// torch reference is tests/test_token_prune.py.
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "expect.h"
#include "ops.h"

using eeengine_test::expect;

namespace {

// One row of 6 tokens, hidden 2, one head of size 1: q = 1 and k_n = log w_n, so the [CLS]
// attention is w / sum(w) = (0.1 | 0.3, 0.05, 0.25, 0.2, 0.1).
struct Case {
  at::Tensor hidden = at::arange(12, at::kFloat).reshape({1, 6, 2});
  at::Tensor mask = at::ones({1, 6}, at::kLong);
  at::Tensor query = at::ones({1, 1, 1});
  at::Tensor key =
      at::log(at::tensor({0.1f, 0.3f, 0.05f, 0.25f, 0.2f, 0.1f})).reshape({1, 1, 6, 1});
  at::Tensor memory = at::tensor({0.0f, 0.4f, 0.0f, 0.0f, 0.2f}).reshape({1, 5});
};

void test_by_hand() {
  Case c;
  // m = 0.5 m + 0.5 a = (0.15, 0.225, 0.125, 0.1, 0.15); k = ceil(0.5 * 5) = 3 keeps positions
  // 1, 2, 5; positions 3 and 4 fuse with weights 0.125 / 0.225 and 0.1 / 0.225.
  auto [hidden, mask, memory, kept] =
      eeengine::token_prune(c.hidden, c.mask, c.query, c.key, c.memory, 0.5, 0.5);
  expect(kept.equal(at::tensor({0, 1, 2, 5, -1}, at::kLong).reshape({1, 5})), "kept indices");
  expect(mask.equal(at::ones({1, 5}, at::kLong)), "mask: 5 real tokens, the input's dtype");
  expect(at::allclose(memory, at::tensor({0.15f, 0.225f, 0.15f, 0.225f}).reshape({1, 4})),
         "memory gathered with the kept tokens, fusion token's memory = dropped total");
  const at::Tensor fusion = (0.125f * c.hidden[0][3] + 0.1f * c.hidden[0][4]) / 0.225f;
  expect(at::allclose(hidden[0][4], fusion), "fusion token = renormalised memory-weighted sum");
  expect(hidden[0][3].equal(c.hidden[0][5]), "kept tokens copied in order");
}

void test_keep_all_is_identity() {
  Case c;
  c.mask[0][4] = 0;
  c.mask[0][5] = 0;
  auto [hidden, mask, memory, kept] =
      eeengine::token_prune(c.hidden, c.mask, c.query, c.key, c.memory, 1.0, 0.5);
  expect(mask.equal(c.mask), "keep ratio 1 keeps the mask");
  expect(hidden.narrow(1, 0, 4).equal(c.hidden.narrow(1, 0, 4)), "and the real tokens");
  expect(hidden.narrow(1, 4, 2).abs().sum().item<float>() == 0.0f, "padding comes out zero");
}

void test_errors_name_the_argument() {
  Case c;
  bool threw = false;
  try {
    eeengine::token_prune(c.hidden, c.mask, c.query, c.key, c.memory, 1.5, 0.5);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("keep_ratio") != std::string::npos;
  }
  expect(threw, "a keep_ratio out of range is named in the error");
}

}  // namespace

int main() {
  test_by_hand();
  test_keep_all_is_identity();
  test_errors_name_the_argument();
  return eeengine_test::report("token_prune");
}
