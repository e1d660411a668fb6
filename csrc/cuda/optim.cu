// CUDA backend of the fused optimizer ops (csrc/optim_ops.h holds the ops; the
// update rules are csrc/optim_math.h, shared with the CPU).
//
// Params and grads may be float32, float64, float16 or bfloat16; math runs in
// float32 (float64 for float64 params) and state is float32 for 16-bit params.
// Each block handles one chunk of one tensor: aligned chunks are read and written
// kILP elements at a time with one vector load/store per list, the rest (tails,
// tensors at odd offsets) element by element.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "../optim_ops.h"
#include "multi_tensor_apply.cuh"

namespace densepipe::optim::cuda {

namespace {

constexpr int kILP = 4;  // elements per thread per vector load

template <typename P>
using opmath_t = std::conditional_t<std::is_same_v<P, double>, double, float>;

template <typename T>
struct alignas(sizeof(T) * kILP) Pack {
  T v[kILP];
};

// List k holds params/grads (type P) for k < 2, optimizer state (type S) after.
template <typename P, typename S, int N>
struct ChunkPtrs {
  void* p[N];
  bool aligned;

  __device__ ChunkPtrs(void* const (&addr)[N], int64_t base) : aligned(true) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const size_t es = k < 2 ? sizeof(P) : sizeof(S);
      p[k] = static_cast<char*>(addr[k]) + base * static_cast<int64_t>(es);
      aligned = aligned && reinterpret_cast<uintptr_t>(p[k]) % (es * kILP) == 0;
    }
  }

  template <int K, typename T>
  __device__ T load(int64_t i) const {
    using E = std::conditional_t<(K < 2), P, S>;
    return static_cast<T>(static_cast<const E*>(p[K])[i]);
  }
  template <int K, typename T>
  __device__ void store(int64_t i, T v) const {
    using E = std::conditional_t<(K < 2), P, S>;
    static_cast<E*>(p[K])[i] = static_cast<E>(v);
  }
  template <int K, typename T>
  __device__ void load_pack(int64_t i, T (&x)[kILP][N]) const {
    using E = std::conditional_t<(K < 2), P, S>;
    const Pack<E> v = static_cast<const Pack<E>*>(p[K])[i];
#pragma unroll
    for (int j = 0; j < kILP; ++j) x[j][K] = static_cast<T>(v.v[j]);
  }
  template <int K, typename T>
  __device__ void store_pack(int64_t i, const T (&x)[kILP][N]) const {
    using E = std::conditional_t<(K < 2), P, S>;
    Pack<E> v;
#pragma unroll
    for (int j = 0; j < kILP; ++j) v.v[j] = static_cast<E>(x[j][K]);
    static_cast<Pack<E>*>(p[K])[i] = v;
  }
};

// Compile-time loop over the lists: f(std::integral_constant<int, K>) for K < N.
template <int N, typename F, int K = 0>
__device__ __forceinline__ void for_lists(F&& f) {
  if constexpr (K < N) {
    f(std::integral_constant<int, K>{});
    for_lists<N, F, K + 1>(static_cast<F&&>(f));
  }
}

// Lists a rule writes: all but the read-only grad (list 1) of an optimizer step.
template <int N>
__device__ constexpr bool writes(int k) {
  return k != 1 || N == 1;
}

template <typename P, typename S, typename Rule>
__global__ void __launch_bounds__(kBlockThreads) rule_kernel(ListMeta<Rule::kLists> meta, Rule rule) {
  constexpr int N = Rule::kLists;
  using T = opmath_t<P>;
  if constexpr (requires { rule.skip(); }) {
    if (rule.skip()) return;
  }
  const int slot = meta.block_tensor[blockIdx.x];
  const int64_t base = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunk;
  const int64_t n = min(kChunk, meta.numel[slot] - base);
  void* addr[N];
#pragma unroll
  for (int k = 0; k < N; ++k) addr[k] = meta.addr[k][slot];
  const ChunkPtrs<P, S, N> ptr(addr, base);

  const int64_t packs = ptr.aligned ? n / kILP : 0;
  for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
    T x[kILP][N];
    for_lists<N>([&](auto k) { ptr.template load_pack<k.value>(i, x); });
#pragma unroll
    for (int j = 0; j < kILP; ++j) rule(x[j]);
    for_lists<N>([&](auto k) {
      if constexpr (writes<N>(k.value)) ptr.template store_pack<k.value>(i, x);
    });
  }
  for (int64_t i = packs * kILP + threadIdx.x; i < n; i += blockDim.x) {
    T x[N];
    for_lists<N>([&](auto k) { x[k.value] = ptr.template load<k.value, T>(i); });
    rule(x);
    for_lists<N>([&](auto k) {
      if constexpr (writes<N>(k.value)) ptr.template store<k.value>(i, x[k.value]);
    });
  }
}

// Deterministic block reduction of one value per thread (fixed tree order).
template <NormKind K, typename A>
__device__ A block_combine(A v) {
  __shared__ A buf[kBlockThreads];
  buf[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) buf[threadIdx.x] = norm_combine<K>(buf[threadIdx.x], buf[threadIdx.x + s]);
    __syncthreads();
  }
  return buf[0];
}

// partial[first_block + b] = the combined norm terms of block b's chunk.
template <typename P, NormKind K>
__global__ void __launch_bounds__(kBlockThreads)
    norm_kernel(ListMeta<1> meta, opmath_t<P>* partial, int64_t first_block, opmath_t<P> p) {
  using T = opmath_t<P>;
  const int slot = meta.block_tensor[blockIdx.x];
  const int64_t base = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunk;
  const int64_t n = min(kChunk, meta.numel[slot] - base);
  void* addr[1] = {meta.addr[0][slot]};
  const ChunkPtrs<P, P, 1> ptr(addr, base);
  T acc = norm_identity<K, T>();
  const int64_t packs = ptr.aligned ? n / kILP : 0;
  for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
    T x[kILP][1];
    ptr.template load_pack<0>(i, x);
#pragma unroll
    for (int j = 0; j < kILP; ++j) acc = norm_combine<K>(acc, norm_term<K>(x[j][0], p));
  }
  for (int64_t i = packs * kILP + threadIdx.x; i < n; i += blockDim.x) {
    acc = norm_combine<K>(acc, norm_term<K>(ptr.template load<0, T>(i), p));
  }
  const T total = block_combine<K>(acc);
  if (threadIdx.x == 0) partial[first_block + blockIdx.x] = total;
}

// out = the norm from all partials, combined in double in a fixed order.
template <NormKind K, typename A, typename Out>
__global__ void __launch_bounds__(kBlockThreads)
    norm_finish_kernel(const A* partial, int64_t count, Out* out, double p) {
  double acc = norm_identity<K, double>();
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) acc = norm_combine<K>(acc, double(partial[i]));
  const double total = block_combine<K>(acc);
  if (threadIdx.x == 0) out[0] = static_cast<Out>(static_cast<opmath_t<Out>>(norm_finish<K>(total, p)));
}

template <typename P>
constexpr bool reduced_v = std::is_same_v<P, c10::Half> || std::is_same_v<P, c10::BFloat16>;

template <typename P, typename S, typename Rule>
void launch_rule(const Lists& lists, const Rule& rule) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  multi_tensor_apply<Rule::kLists>(lists, [&](const ListMeta<Rule::kLists>& meta, int blocks, int64_t) {
    rule_kernel<P, S, Rule><<<blocks, kBlockThreads, 0, stream>>>(meta, rule);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

struct CudaBackend {
  template <typename MakeRule>
  static void apply(const Lists& lists, MakeRule make_rule) {
    if (lists.empty()) return;
    const at::Tensor& p0 = lists[0][0];
    const c10::cuda::CUDAGuard guard(p0.device());
    const bool fp32_state = lists.size() > 2 && lists[2][0].scalar_type() == at::kFloat;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p0.scalar_type(), "densepipe_optim_cuda", [&] {
      using P = scalar_t;
      const auto rule = make_rule(Tag<opmath_t<P>>{});
      if constexpr (reduced_v<P>) {
        if (fp32_state) {
          launch_rule<P, float>(lists, rule);
          return;
        }
      }
      launch_rule<P, P>(lists, rule);
    });
  }

  static at::Tensor norm(const Lists& lists, NormKind kind, double norm_type) {
    const at::TensorList grads = lists[0];
    const c10::cuda::CUDAGuard guard(grads[0].device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    at::Tensor out = at::empty({}, grads[0].options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "densepipe_grad_norm_cuda", [&] {
      using P = scalar_t;
      using A = opmath_t<P>;
      const int64_t blocks = total_blocks(grads);
      at::Tensor partial = at::empty({blocks}, grads[0].options().dtype(c10::CppTypeToScalarType<A>::value));
      dispatch_norm(kind, [&](auto k) {
        multi_tensor_apply<1>(lists, [&](const ListMeta<1>& meta, int nblocks, int64_t first) {
          norm_kernel<P, k.value><<<nblocks, kBlockThreads, 0, stream>>>(
              meta, partial.mutable_data_ptr<A>(), first, static_cast<A>(norm_type));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
        norm_finish_kernel<k.value, A, P><<<1, kBlockThreads, 0, stream>>>(
            partial.const_data_ptr<A>(), blocks, out.mutable_data_ptr<P>(), norm_type);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    return out;
  }
};

}  // namespace densepipe::optim::cuda

TORCH_LIBRARY_IMPL(densepipe, CUDA, m) {
  densepipe::optim::register_optim_ops<densepipe::optim::cuda::CudaBackend>(m);
}
// A sparse gradient dispatches here; the checks then refuse it with a clear message.
TORCH_LIBRARY_IMPL(densepipe, SparseCUDA, m) {
  densepipe::optim::register_optim_ops<densepipe::optim::cuda::CudaBackend>(m);
}
