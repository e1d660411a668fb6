// A register-blocked float32 matrix product for AVX-512: the products of a tabular MLP's
// training step (a block of 32-128 rows times layer widths of 10-512).
//
// Why our own: torch's MKL runs AVX2 code on AMD CPUs. On an AMD EPYC (Zen 5: AVX-512 at full
// width, one core) MKL reached 90-100 GFLOP/s on every shape from 64x64x256 to 1024^3, a fifth
// under the core's AVX2 peak but well under half its AVX-512 peak (about 240 GFLOP/s); oneDNN
// reaches the AVX-512 rate on large products, but each call costs it about 8 us of set-up,
// more than a whole small product. This kernel has no set-up: it reads the operands where they
// lie, packing only a transposed right operand (a layer's W^T in the forward pass).
//
// Shape of the work: a tile of c is kTileRows rows by kPanel columns (8 x 32, sixteen zmm
// accumulators). Each step along p loads two vectors of b's row p and broadcasts eight
// elements of a's column p, for sixteen fused multiply-adds: the two FMA pipes stay busy and
// the loads keep within the two load ports. Column tails are masked; row tails use a tile of
// fewer rows.
#include "gemm_avx512.h"

#if defined(__AVX512F__)

#include <immintrin.h>

#include <array>
#include <utility>
#include <vector>

namespace densepipe::cpu::avx512 {

namespace {

constexpr int kLanes = 16;  // floats in a zmm register

// Rows R of c's tile at c, V vectors of 16 columns (the last masked by m1, or the only one by
// m0): c[r, :] = sum_p a(r, p) b[p, :]. a(r, p) is a[r * lda + p] for a row-major a, else
// a[p * lda + r]; b's row p starts at b + p * ldb.
template <int R, int V, bool RowMajorA>
void tile(int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
          __mmask16 m0, __mmask16 m1) {
  __m512 acc[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < k; ++p) {
    const float* row = b + p * ldb;
    __m512 bv[V];
    bv[0] = _mm512_maskz_loadu_ps(m0, row);
    if constexpr (V == 2) bv[1] = _mm512_maskz_loadu_ps(m1, row + kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(RowMajorA ? a[r * lda + p] : a[p * lda + r]);
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(c + r * ldc, m0, acc[r][0]);
    if constexpr (V == 2) _mm512_mask_storeu_ps(c + r * ldc + kLanes, m1, acc[r][1]);
  }
}

using TileFn = void (*)(int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t, __mmask16,
                        __mmask16);

// tile<R, V, RowMajorA> by rows R (1..kTileRows, index R - 1).
template <int V, bool RowMajorA, size_t... I>
constexpr std::array<TileFn, sizeof...(I)> tiles_by_rows(std::index_sequence<I...>) {
  return {&tile<static_cast<int>(I) + 1, V, RowMajorA>...};
}

template <int V, bool RowMajorA>
constexpr auto kTiles = tiles_by_rows<V, RowMajorA>(std::make_index_sequence<kTileRows>());

TileFn tile_for(int64_t rows, int vectors, bool row_major_a) {
  const auto& table = vectors == 2 ? (row_major_a ? kTiles<2, true> : kTiles<2, false>)
                                   : (row_major_a ? kTiles<1, true> : kTiles<1, false>);
  return table[rows - 1];
}

__mmask16 first_lanes(int64_t count) {
  return count >= kLanes ? __mmask16(0xFFFF) : count <= 0 ? __mmask16(0) : __mmask16((1u << count) - 1);
}

// dst[r, c] = src[c * ld + r] for r < 16, c < 16: a 16 x 16 block transposed in registers.
// dst's rows are dst_ld apart.
void transpose16(const float* src, int64_t ld, float* dst, int64_t dst_ld) {
  __m512 x[kLanes], t[kLanes];
  for (int i = 0; i < kLanes; ++i) x[i] = _mm512_loadu_ps(src + i * ld);  // x[i]: source row i
  // Pairs of rows interleaved within each 128-bit lane.
  for (int i = 0; i < kLanes; i += 2) {
    t[i] = _mm512_unpacklo_ps(x[i], x[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(x[i], x[i + 1]);
  }
  // Groups of four rows g: s(g, q) holds, in lane l, column 4l + q of rows 4g..4g+3.
  __m512 s[4][4];
  for (int g = 0; g < 4; ++g) {
    const __m512d lo = _mm512_castps_pd(t[4 * g]), hi = _mm512_castps_pd(t[4 * g + 1]);
    const __m512d lo2 = _mm512_castps_pd(t[4 * g + 2]), hi2 = _mm512_castps_pd(t[4 * g + 3]);
    s[g][0] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo, lo2));
    s[g][1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo, lo2));
    s[g][2] = _mm512_castpd_ps(_mm512_unpacklo_pd(hi, hi2));
    s[g][3] = _mm512_castpd_ps(_mm512_unpackhi_pd(hi, hi2));
  }
  // Column 4l + q gathers lane l of s(0, q), s(1, q), s(2, q), s(3, q).
  for (int q = 0; q < 4; ++q) {
    const __m512 x01 = _mm512_shuffle_f32x4(s[0][q], s[1][q], 0x44), y01 = _mm512_shuffle_f32x4(s[0][q], s[1][q], 0xEE);
    const __m512 x23 = _mm512_shuffle_f32x4(s[2][q], s[3][q], 0x44), y23 = _mm512_shuffle_f32x4(s[2][q], s[3][q], 0xEE);
    _mm512_storeu_ps(dst + (0 + q) * dst_ld, _mm512_shuffle_f32x4(x01, x23, 0x88));
    _mm512_storeu_ps(dst + (4 + q) * dst_ld, _mm512_shuffle_f32x4(x01, x23, 0xDD));
    _mm512_storeu_ps(dst + (8 + q) * dst_ld, _mm512_shuffle_f32x4(y01, y23, 0x88));
    _mm512_storeu_ps(dst + (12 + q) * dst_ld, _mm512_shuffle_f32x4(y01, y23, 0xDD));
  }
}

// Columns [j0, j0 + width) of b, k rows, into panel[p * kPanel + j], for a b whose rows are
// its unit stride (b(p, j) at b[p + j * cols]: a layer's W^T). Columns past width are left as
// they are: the tiles' masked loads never read them.
void pack_transposed(const Strided& b, int64_t k, int64_t j0, int64_t width, float* panel) {
  const float* src = b.data + j0 * b.cols;
  int64_t j = 0;
  for (; j + kLanes <= width; j += kLanes) {
    int64_t p = 0;
    for (; p + kLanes <= k; p += kLanes) transpose16(src + j * b.cols + p, b.cols, panel + p * kPanel + j, kPanel);
    for (; p < k; ++p) {
      for (int64_t jj = j; jj < j + kLanes; ++jj) panel[p * kPanel + jj] = src[jj * b.cols + p];
    }
  }
  for (; j < width; ++j) {
    for (int64_t p = 0; p < k; ++p) panel[p * kPanel + j] = src[j * b.cols + p];
  }
}

}  // namespace

void gemm_block(int64_t n, int64_t k, Strided a, Strided b, float* c, int64_t ldc, int64_t i0, int64_t i1,
                int64_t q0, int64_t q1) {
  const bool row_major_a = a.cols == 1;
  const int64_t lda = row_major_a ? a.rows : a.cols;
  const bool direct_b = b.cols == 1;  // b's rows are contiguous: its vectors load in place
  thread_local std::vector<float> panel;
  if (!direct_b && panel.size() < static_cast<size_t>(k * kPanel)) panel.resize(k * kPanel);
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t j0 = q * kPanel, width = n - j0 < kPanel ? n - j0 : kPanel;
    const float* bp = direct_b ? b.data + j0 : panel.data();
    const int64_t ldb = direct_b ? b.rows : kPanel;
    if (!direct_b) pack_transposed(b, k, j0, width, panel.data());
    const int vectors = width > kLanes ? 2 : 1;
    const __mmask16 m0 = first_lanes(width), m1 = first_lanes(width - kLanes);
    for (int64_t i = i0; i < i1; i += kTileRows) {
      const int64_t rows = i1 - i < kTileRows ? i1 - i : kTileRows;
      tile_for(rows, vectors, row_major_a)(k, a.data + i * a.rows, lda, bp, ldb, c + i * ldc + j0, ldc, m0, m1);
    }
  }
}

}  // namespace densepipe::cpu::avx512

#endif  // __AVX512F__
