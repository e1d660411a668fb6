// densepipe's own float32 matrix product for AVX-512 CPUs (see gemm_avx512.cpp).
#pragma once

#include <cstdint>

namespace densepipe::cpu::avx512 {

// Whether this build has the kernel: it is compiled only where the compiler targets AVX-512
// (setup.py builds for the widest ISA of the machine it builds on).
#if defined(__AVX512F__)
inline constexpr bool kBuilt = true;
#else
inline constexpr bool kBuilt = false;
#endif

// The product is computed kPanel columns and kTileRows rows of c at a time.
inline constexpr int64_t kPanel = 32;
inline constexpr int64_t kTileRows = 8;

// An operand's layout: element (i, j) at data[i * rows + j * cols]; one of the two strides is 1.
struct Strided {
  const float* data;
  int64_t rows, cols;
};

// c[i, j] = sum_p a[i, p] b[p, j] for rows [i0, i1) of c and its column panels [q0, q1) (panel q:
// columns [q * kPanel, (q + 1) * kPanel) below n). c is row-major with row stride ldc. Each
// element is one chain of fused multiply-adds over p in order, whichever call computes it, so
// how the rows and panels are split among threads does not change the result.
void gemm_block(int64_t n, int64_t k, Strided a, Strided b, float* c, int64_t ldc, int64_t i0, int64_t i1,
                int64_t q0, int64_t q1);

}  // namespace densepipe::cpu::avx512
