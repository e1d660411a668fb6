// Elementwise kernels of the fused dense op. Both passes are memory bound: they
// move 16-byte vectors where the pointers and the row length allow it, and fall
// back to one element per thread otherwise. Math in float32 (float64 for
// float64 tensors); indices are 64-bit.
#include "dense_epilogue.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "activation.cuh"

namespace densepipe::cuda {

namespace {

constexpr int kVecBytes = 16;          // one 128-bit load / store per thread
constexpr int kThreads = 256;          // threads per block of the forward pass
constexpr int kBlocksPerSm = 8;        // 8 x 256 threads fill an SM (2048 resident threads)
constexpr int kTileX = 32;             // backward: one warp spans 32 vectors of a row
constexpr int kTileY = 8;              // backward: warps per block, each on its own rows
constexpr int64_t kMinRowsPerSplit = 64;  // rows a backward block sums before writing a partial
constexpr int64_t kMaxSplits = 1024;   // bounds the partial buffer to kMaxSplits x cols

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
constexpr int kVec = kVecBytes / static_cast<int>(sizeof(T));  // elements per 16-byte vector

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// 16-byte packs move as one uint4 so the compiler emits a single 128-bit
// access (it would otherwise split a pack of 2-byte types into 16-bit stores).
template <int V, typename T>
__device__ __forceinline__ Pack<T, V> load(const T* p) {
  if constexpr (sizeof(Pack<T, V>) == sizeof(uint4)) {
    const uint4 bits = *reinterpret_cast<const uint4*>(p);
    Pack<T, V> v;
    memcpy(&v, &bits, sizeof(v));
    return v;
  } else {
    return *reinterpret_cast<const Pack<T, V>*>(p);
  }
}

template <int V, typename T>
__device__ __forceinline__ void store(T* p, const Pack<T, V>& v) {
  if constexpr (sizeof(Pack<T, V>) == sizeof(uint4)) {
    uint4 bits;
    memcpy(&bits, &v, sizeof(bits));
    __stwb(reinterpret_cast<uint4*>(p), bits);  // a plain uint4 store may still be split up
  } else {
    *reinterpret_cast<Pack<T, V>*>(p) = v;
  }
}

bool vec_aligned(const at::Tensor& t) {
  return !t.defined() || reinterpret_cast<uintptr_t>(t.const_data_ptr()) % kVecBytes == 0;
}

int sm_count() {
  static std::atomic<int> cache[C10_COMPILE_TIME_MAX_GPUS] = {};  // per device; 0 = not read yet
  const c10::DeviceIndex d = c10::cuda::current_device();
  int n = cache[d].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, d));
    cache[d].store(n, std::memory_order_relaxed);
  }
  return n;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------- forward

// y = act(z), z already holding the GEMM's output with its bias (one rounding to
// the storage type, as F.linear's), the activation in compute precision. V > 1:
// both pointers 16-byte aligned. z and y may alias (in place).
template <Act A, typename T, int V>
__global__ void __launch_bounds__(kThreads)
act_kernel(const T* z, T* y, int64_t n, acc_t<T> alpha) {
  using C = acc_t<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / V;
  for (int64_t i = tid; i < nvec; i += stride) {
    const Pack<T, V> zv = load<V>(z + i * V);
    Pack<T, V> yv;
#pragma unroll
    for (int j = 0; j < V; ++j) yv.v[j] = static_cast<T>(forward<A, C>(static_cast<C>(zv.v[j]), alpha));
    store<V>(y + i * V, yv);
  }
  for (int64_t i = nvec * V + tid; i < n; i += stride) {  // tail shorter than one vector
    y[i] = static_cast<T>(forward<A, C>(static_cast<C>(z[i]), alpha));
  }
}

template <Act A, typename T, int V>
void launch_act(const at::Tensor& z, const at::Tensor& y, double alpha) {
  const int64_t n = z.numel();
  const int64_t work = std::max<int64_t>(1, n / V);
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(work, kThreads), int64_t{sm_count()} * kBlocksPerSm));
  act_kernel<A, T, V><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      z.const_data_ptr<T>(), y.mutable_data_ptr<T>(), n, static_cast<acc_t<T>>(alpha));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------- backward

// Block (kTileX, kTileY) covers kTileX * V columns of one row split; its
// warps walk the split's rows (coalesced: a warp reads kTileX * V contiguous
// elements of one row), each thread summing its columns in registers, then the
// block reduces over its warps in shared memory and writes one partial row.
// V > 1 needs 16-byte aligned pointers and cols % V == 0.
template <Act A, typename T, int V>
__global__ void __launch_bounds__(kTileX * kTileY)
act_grad_kernel(const T* __restrict__ gy, const T* __restrict__ s, T* __restrict__ g,
                acc_t<T>* __restrict__ partial, int64_t rows, int64_t cols, int64_t rows_per_split,
                acc_t<T> alpha) {
  using C = acc_t<T>;
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * kTileX + threadIdx.x) * V;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t r1 = rows < r0 + rows_per_split ? rows : r0 + rows_per_split;
  C acc[V] = {};
  if (col < cols) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kTileY) {
      const int64_t off = r * cols + col;
      const Pack<T, V> gv = load<V>(gy + off);
      Pack<T, V> sv, out;
      if constexpr (A != Act::Linear) sv = load<V>(s + off);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        C d = static_cast<C>(gv.v[j]);
        if constexpr (A != Act::Linear) d *= derivative<A, C>(static_cast<C>(sv.v[j]), alpha);
        out.v[j] = static_cast<T>(d);
      }
      if (g) store<V>(g + off, out);
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] += static_cast<C>(out.v[j]);  // sum what dx and dW will see
    }
  }
  if (partial == nullptr) return;  // same for the whole block: no barrier is skipped by a part of it
  __shared__ C red[kTileY][kTileX * V];
#pragma unroll
  for (int j = 0; j < V; ++j) red[threadIdx.y][threadIdx.x * V + j] = acc[j];
  __syncthreads();
  for (int c = threadIdx.y * kTileX + threadIdx.x; c < kTileX * V; c += kTileX * kTileY) {
    const int64_t gc = static_cast<int64_t>(blockIdx.x) * kTileX * V + c;
    if (gc >= cols) break;
    C sum = 0;
#pragma unroll
    for (int w = 0; w < kTileY; ++w) sum += red[w][c];
    partial[static_cast<int64_t>(blockIdx.y) * cols + gc] = sum;
  }
}

// db[c] = sum over splits of partial[split, c], in split order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
sum_splits_kernel(const acc_t<T>* __restrict__ partial, T* __restrict__ db, int64_t splits, int64_t cols) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < cols; c += stride) {
    acc_t<T> sum = 0;
    for (int64_t sp = 0; sp < splits; ++sp) sum += partial[sp * cols + c];
    db[c] = static_cast<T>(sum);
  }
}

template <Act A, typename T, int V>
void launch_act_grad(const at::Tensor& gy, const at::Tensor& s, const at::Tensor& g, const at::Tensor& db,
                     double alpha) {
  using C = acc_t<T>;
  const int64_t rows = gy.size(0), cols = gy.size(1);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  // Enough blocks to fill the GPU: split rows until col_tiles x splits covers
  // every SM, but keep each split long enough to amortize its partial row.
  const int64_t col_tiles = ceil_div(cols, int64_t{kTileX} * V);
  int64_t splits = ceil_div(int64_t{sm_count()} * kBlocksPerSm, col_tiles);
  splits = std::clamp<int64_t>(std::min(splits, ceil_div(rows, kMinRowsPerSplit)), 1, kMaxSplits);
  const int64_t rows_per_split = ceil_div(rows, splits);
  splits = ceil_div(rows, rows_per_split);
  at::Tensor partial;
  if (db.defined()) partial = at::empty({splits, cols}, gy.options().dtype(c10::CppTypeToScalarType<C>::value));
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(splits));
  act_grad_kernel<A, T, V><<<grid, dim3(kTileX, kTileY), 0, stream>>>(
      gy.const_data_ptr<T>(), A == Act::Linear ? nullptr : s.const_data_ptr<T>(),
      g.defined() ? g.mutable_data_ptr<T>() : nullptr,
      partial.defined() ? partial.mutable_data_ptr<C>() : nullptr, rows, cols, rows_per_split,
      static_cast<C>(alpha));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!db.defined()) return;
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(cols, kThreads), int64_t{sm_count()} * kBlocksPerSm));
  sum_splits_kernel<T><<<blocks, kThreads, 0, stream>>>(partial.const_data_ptr<C>(), db.mutable_data_ptr<T>(),
                                                        splits, cols);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Instantiates `Launch<A, T, V>` for the runtime activation and dtype, with the
// 16-byte vector width when `vectorized` and one element otherwise.
template <template <Act, typename, int> class Launch, typename... Args>
void dispatch(at::ScalarType dtype, Act act, bool vectorized, Args&&... args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "densepipe_dense_epilogue", [&] {
    dispatch_activation(act, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      if (vectorized) {
        Launch<A, scalar_t, kVec<scalar_t>>::run(args...);
      } else {
        Launch<A, scalar_t, 1>::run(args...);
      }
    });
  });
}

template <Act A, typename T, int V>
struct ActForward {
  static void run(const at::Tensor& z, const at::Tensor& y, double alpha) { launch_act<A, T, V>(z, y, alpha); }
};

template <Act A, typename T, int V>
struct ActGrad {
  static void run(const at::Tensor& gy, const at::Tensor& s, const at::Tensor& g, const at::Tensor& db,
                  double alpha) {
    launch_act_grad<A, T, V>(gy, s, g, db, alpha);
  }
};

}  // namespace

void activation_forward(const at::Tensor& z, const at::Tensor& y, Act act, double alpha) {
  if (z.numel() == 0) return;
  dispatch<ActForward>(z.scalar_type(), act, vec_aligned(z) && vec_aligned(y), z, y, alpha);
}

void activation_grad(const at::Tensor& grad_y, const at::Tensor& saved, const at::Tensor& g,
                     const at::Tensor& db, Act act, double alpha) {
  const int64_t rows = grad_y.size(0), cols = grad_y.size(1);
  if (cols == 0) return;
  if (rows == 0) {
    if (db.defined()) db.zero_();
    return;
  }
  const int vec = kVecBytes / static_cast<int>(grad_y.element_size());
  const bool vectorized = cols % vec == 0 && vec_aligned(grad_y) && vec_aligned(g) &&
                          (act == Act::Linear || vec_aligned(saved));
  dispatch<ActGrad>(grad_y.scalar_type(), act, vectorized, grad_y, saved, g, db, alpha);
}

}  // namespace densepipe::cuda
