// Matrix products for the CPU kernels, each on the fastest backend at hand for its size.
#pragma once

#include <ATen/core/Tensor.h>

namespace densepipe::cpu {

// The implementations a float32 product may run on (see gemm_cpu.cpp).
enum class GemmBackend { OneDnn, Avx512, Blas };

// Which one gemm(a, b) runs, and its name ("onednn", "avx512", "blas").
GemmBackend gemm_backend(const at::Tensor& a, const at::Tensor& b);
const char* gemm_backend_name(GemmBackend backend);

// a[m, k] @ b[k, n] -> new contiguous [m, n]; a and b may be transposed views.
at::Tensor gemm(const at::Tensor& a, const at::Tensor& b);

}  // namespace densepipe::cpu
