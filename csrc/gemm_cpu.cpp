// GEMM backend for the CPU kernels: which implementation runs a float32 product.
//
// - oneDNN (ATen's mkldnn_matmul) for products of at least 2^24 multiply-adds, when it is
//   enabled: its JIT kernels block for the caches and run near the AVX-512 peak, but each call
//   costs it about 8 us of set-up, which only a large product hides.
// - Below that, densepipe's own AVX-512 kernel (gemm_avx512.cpp), where the build targets
//   AVX-512 and each operand has a unit stride: on an AMD EPYC (Zen 5, one thread) it ran a
//   training step's products (64-128 rows by widths 64-256) at 160-210 GFLOP/s, where torch's
//   MKL, which runs AVX2 code on AMD CPUs, reached 80-90; at 2^24 it ran within 10% of oneDNN,
//   above 2^25 oneDNN pulled ahead.
// - BLAS (at::mm) for the rest, and for float64.
// Which backend runs depends only on the shapes, strides, dtype and build, so results stay the
// same from run to run on a machine. (On an AMD Zen 4 server, before the AVX-512 kernel, oneDNN
// lost to MKL on small products, 0.81x at 128 x 64 x 256, and the two tied near 2^23..2^24.)
#include "gemm_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>

#include "gemm_avx512.h"

namespace at::native {
// Exported by libtorch_cpu (ATen/native/mkldnn/Matmul.h, not among the installed
// headers): result = beta * result + alpha * mat1 @ mat2. Weak, so a torch built
// without it still loads this library and falls back to BLAS.
__attribute__((weak)) void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result,
                                         float beta, float alpha);
}  // namespace at::native

namespace densepipe::cpu {

namespace {

constexpr int64_t kOneDnnMinWork = int64_t{1} << 24;  // m * n * k: below it oneDNN's set-up outweighs its speed

// oneDNN refuses fp32 on CPUs without AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT; the first
// refusal switches it off for the process instead of re-checking ISA flags here.
std::atomic<bool> onednn_usable{true};

bool want_onednn(const at::Tensor& a, const at::Tensor& b) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  return a.scalar_type() == at::kFloat && m * n * k >= kOneDnnMinWork && m > 0 && n > 0 && k > 0 &&
         at::native::mkldnn_matmul != nullptr && onednn_usable.load(std::memory_order_relaxed) &&
         at::hasMKLDNN() && at::globalContext().userEnabledMkldnn();
}

// An operand as the AVX-512 kernel reads it: one of its strides is 1.
bool unit_strided(const at::Tensor& t) { return t.stride(0) == 1 || t.stride(1) == 1; }

// The deepest product the AVX-512 kernel takes: it does not block along k, so a column panel of b
// (k x 32 floats, 512 KiB here) must stay within the L2 cache.
constexpr int64_t kAvx512MaxDepth = 4096;

bool want_avx512(const at::Tensor& a, const at::Tensor& b) {
  return avx512::kBuilt && a.scalar_type() == at::kFloat && a.size(0) > 0 && a.size(1) > 0 && b.size(1) > 0 &&
         a.size(1) <= kAvx512MaxDepth && unit_strided(a) && unit_strided(b);
}

// Flops a thread's task takes at least: enough to repay waking the thread.
constexpr int64_t kTaskWork = int64_t{1} << 20;

// c = a @ b on the AVX-512 kernel, split into tasks of whole tiles' rows by one column panel.
at::Tensor avx512_gemm(const at::Tensor& a, const at::Tensor& b) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  at::Tensor out = at::empty({m, n}, a.options());
  const avx512::Strided sa{a.const_data_ptr<float>(), a.stride(0), a.stride(1)};
  const avx512::Strided sb{b.const_data_ptr<float>(), b.stride(0), b.stride(1)};
  float* c = out.mutable_data_ptr<float>();
  const int64_t panels = (n + avx512::kPanel - 1) / avx512::kPanel;
  const int64_t tile_work = 2 * avx512::kTileRows * avx512::kPanel * k;
  const int64_t rows = std::min(std::max<int64_t>(1, kTaskWork / tile_work) * avx512::kTileRows, m);
  const int64_t chunks = (m + rows - 1) / rows;
  const int64_t grain = std::max<int64_t>(1, kTaskWork / (2 * rows * avx512::kPanel * k));
  at::parallel_for(0, chunks * panels, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = t / panels * rows, q = t % panels;
#if defined(__AVX512F__)  // the kernel exists only there; elsewhere want_avx512() never picks it
      avx512::gemm_block(n, k, sa, sb, c, n, i0, std::min(i0 + rows, m), q, q + 1);
#endif
    }
  });
  return out;
}

at::Tensor onednn_gemm(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  at::native::mkldnn_matmul(a, b, out, /*beta=*/0.0f, /*alpha=*/1.0f);
  return out;
}

}  // namespace

GemmBackend gemm_backend(const at::Tensor& a, const at::Tensor& b) {
  if (want_onednn(a, b)) return GemmBackend::OneDnn;
  if (want_avx512(a, b)) return GemmBackend::Avx512;
  return GemmBackend::Blas;
}

const char* gemm_backend_name(GemmBackend backend) {
  switch (backend) {
    case GemmBackend::OneDnn: return "onednn";
    case GemmBackend::Avx512: return "avx512";
    case GemmBackend::Blas: return "blas";
  }
  return "blas";
}

at::Tensor gemm(const at::Tensor& a, const at::Tensor& b) {
  GemmBackend backend = gemm_backend(a, b);
  if (backend == GemmBackend::OneDnn) {
    try {
      return onednn_gemm(a, b);
    } catch (const c10::Error&) {
      onednn_usable.store(false, std::memory_order_relaxed);
      backend = gemm_backend(a, b);
    }
  }
  return backend == GemmBackend::Avx512 ? avx512_gemm(a, b) : at::mm(a, b);
}

}  // namespace densepipe::cpu
