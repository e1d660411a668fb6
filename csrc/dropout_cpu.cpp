// Dropout's multiplicative noise on the CPU: 0 with probability p, else 1 / (1 - p).
//
// Each element's draw is a hash of one seed and its position (SplitMix64's output function over
// a counter, a generator that passes BigCrush), so the noise is the same at any thread count and
// is made in parallel without a shared state. The seed is one 64-bit draw from the torch
// generator, which keeps dropout reproducible under torch.manual_seed. Why not torch's
// bernoulli_: it draws element by element from one Mersenne Twister, ~190 us for a 128 x 256
// batch on one core, as long as the rest of a small MLP's training step.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/DistributionsHelper.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <mutex>
#include <optional>

namespace densepipe {

namespace {

constexpr uint64_t kGamma = 0x9e3779b97f4a7c15ULL;  // SplitMix64's increment (2^64 / golden ratio)

inline uint64_t mix(uint64_t z) {  // SplitMix64's output function
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

uint64_t draw_seed(const std::optional<at::Generator>& generator) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->random64();
}

at::Tensor dropout_noise_cpu(const at::Tensor& x, double p, std::optional<at::Generator> generator) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "densepipe dropout_noise: p (the share dropped) must be in [0, 1), got ", p);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "densepipe dropout_noise: x has dtype ",
              x.scalar_type(), "; on CPU allowed: float32, float64");
  const uint64_t seed = draw_seed(generator);
  at::Tensor noise = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = noise.numel();
  // An element is kept when the top 32 bits of its hash, u, reach the threshold: probability
  // (2^32 - threshold) / 2^32, which is 1 - p to within 2^-32.
  const uint64_t threshold = static_cast<uint64_t>(std::ceil(p * 4294967296.0));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "densepipe_dropout_noise", [&] {
    const auto keep = static_cast<scalar_t>(1.0 / (1.0 - p));
    scalar_t* out = noise.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 32768, [=](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const uint64_t u = mix(seed + static_cast<uint64_t>(i + 1) * kGamma) >> 32;
        out[i] = u >= threshold ? keep : scalar_t(0);
      }
    });
  });
  return noise;
}

}  // namespace

}  // namespace densepipe

TORCH_LIBRARY_FRAGMENT(densepipe, m) {
  // A tensor of x's shape and dtype (contiguous) whose elements are 0 with probability p and
  // 1 / (1 - p) otherwise, independently: what dropout multiplies its input by. x gives only the
  // shape, dtype and device.
  m.def("dropout_noise(Tensor x, float p, Generator? generator=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(densepipe, CPU, m) {
  m.impl("dropout_noise", &densepipe::dropout_noise_cpu);
}
