// GEMM backend for the CPU kernels.
//
// float32 products go to oneDNN (ATen's mkldnn_matmul) when it is enabled and the
// product is big enough, and to BLAS (at::mm) otherwise. On an AMD Zen 4 server with
// torch 2.13's MKL, one thread, oneDNN's JIT kernels ran large products faster (m = 4096,
// k x n = 64 x 256 or 256 x 128: 1.23x; 1024 x 512 x 512: 1.13x) but small ones slower
// (128 x 64 x 256: 0.81x; 128 x 256 x 128: 0.93x): a call costs it more, and MKL's Zen
// kernels are fast on small blocks. The two tied near m * n * k = 2^23..2^24, on one and on
// two threads. A training step's products (batch x layer widths) are mostly below that, an
// evaluation chunk's above. float64 has no oneDNN path: at::mm.
#include "gemm_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/util/Exception.h>

#include <atomic>

namespace at::native {
// Exported by libtorch_cpu (ATen/native/mkldnn/Matmul.h, not among the installed
// headers): result = beta * result + alpha * mat1 @ mat2. Weak, so a torch built
// without it still loads this library and falls back to BLAS.
__attribute__((weak)) void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result,
                                         float beta, float alpha);
}  // namespace at::native

namespace densepipe::cpu {

namespace {

constexpr int64_t kOneDnnMinWork = int64_t{1} << 24;  // m * n * k; the backends tie near 2^23..2^24

// oneDNN refuses fp32 on CPUs without AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT; the first
// refusal switches it off for the process instead of re-checking ISA flags here.
std::atomic<bool> onednn_usable{true};

bool want_onednn(const at::Tensor& a, const at::Tensor& b) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  return a.scalar_type() == at::kFloat && m * n * k >= kOneDnnMinWork && m > 0 && n > 0 && k > 0 &&
         at::native::mkldnn_matmul != nullptr && onednn_usable.load(std::memory_order_relaxed) &&
         at::hasMKLDNN() && at::globalContext().userEnabledMkldnn();
}

}  // namespace

at::Tensor gemm(const at::Tensor& a, const at::Tensor& b) {
  if (want_onednn(a, b)) {
    at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
    try {
      at::native::mkldnn_matmul(a, b, out, /*beta=*/0.0f, /*alpha=*/1.0f);
      return out;
    } catch (const c10::Error&) {
      onednn_usable.store(false, std::memory_order_relaxed);
    }
  }
  return at::mm(a, b);
}

}  // namespace densepipe::cpu
