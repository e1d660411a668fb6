// Matrix products for the CPU kernels, on the fastest backend ATen offers.
#pragma once

#include <ATen/core/Tensor.h>

namespace densepipe::cpu {

// a[m, k] @ b[k, n] -> new contiguous [m, n]; a and b may be transposed views.
at::Tensor gemm(const at::Tensor& a, const at::Tensor& b);

}  // namespace densepipe::cpu
