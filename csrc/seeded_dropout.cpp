// seeded_dropout on CPU: inverted dropout whose mask is a pure function of (seed, element index),
// so the backward pass recomputes it instead of storing it, and the forward pass is one
// parallel sweep (torch's CPU dropout draws one Bernoulli sample per element and then
// multiplies twice: 3-4x slower on the training batches of the default checkpoint).
//
// Mask rule (the plain-torch twin is eeengine.dropout.seeded_dropout_reference): the flat
// index i of the contiguous tensor falls in group g = i / 4 and lane i % 4; the group's 64 bits
// are splitmix64(seed + (g + 1) * 0x9E3779B97F4A7C15) and the lane's 16 bits are bits
// [16 * lane, 16 * lane + 16) of it. Element i is kept when those 16 bits, as an unsigned
// number, are >= t = round(p * 65536). Every element is multiplied by 65536 / (65536 - t) if
// kept and by 0 if dropped, in fp32 (fp64 for fp64 input), and rounded once to the input
// dtype. So the drop probability is t / 65536 (p to within 2^-17) and the kept elements keep
// their expectation.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "ops.h"

namespace eeengine {
namespace {

// Groups of four elements per parallel chunk.
constexpr int64_t kGrainGroups = 1 << 13;
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

template <typename scalar_t>
void dropout_groups(const scalar_t* src, scalar_t* dst, int64_t numel, uint64_t seed,
                    uint32_t threshold, at::opmath_type<scalar_t> scale, int64_t begin,
                    int64_t end) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t g = begin; g < end; ++g) {
    const uint64_t bits = splitmix64(seed + static_cast<uint64_t>(g + 1) * kGolden);
    const int64_t first = 4 * g;
    const int64_t lanes = std::min<int64_t>(4, numel - first);  // fewer in the last group
    for (int64_t lane = 0; lane < lanes; ++lane) {
      const uint32_t draw = static_cast<uint32_t>((bits >> (16 * lane)) & 0xFFFFu);
      const opmath_t factor = draw >= threshold ? scale : opmath_t(0);
      dst[first + lane] = static_cast<scalar_t>(static_cast<opmath_t>(src[first + lane]) * factor);
    }
  }
}

}  // namespace

at::Tensor seeded_dropout(const at::Tensor& input, double p, int64_t seed) {
  TORCH_CHECK(input.device().is_cpu(), "seeded_dropout: input must be a CPU tensor, got ",
              input.device());
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "seeded_dropout: p must be in [0, 1], got ", p);
  const at::Tensor x = input.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t numel = x.numel();
  const uint32_t threshold = static_cast<uint32_t>(std::lround(p * 65536.0));
  const double scale = threshold >= 65536u ? 0.0 : 65536.0 / (65536.0 - threshold);
  const uint64_t seed_bits = static_cast<uint64_t>(seed);
  const int64_t groups = (numel + 3) / 4;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::BFloat16, at::ScalarType::Half, x.scalar_type(), "seeded_dropout", [&] {
        const scalar_t* src = x.const_data_ptr<scalar_t>();
        scalar_t* dst = out.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, groups, kGrainGroups, [&](int64_t begin, int64_t end) {
          dropout_groups(src, dst, numel, seed_bits, threshold,
                         static_cast<at::opmath_type<scalar_t>>(scale), begin, end);
        });
      });
  return out;
}

}  // namespace eeengine
