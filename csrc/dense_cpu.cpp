// CPU kernels of the fused dense op: GEMM through ATen (MKL/OpenBLAS), then one
// vectorized, parallel epilogue. Backward fuses act'(.) and the bias reduction
// into a single pass over grad_y.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "activation_cpu.h"
#include "dense.h"

namespace densepipe::cpu {

namespace {

constexpr int64_t kGrain = 16384;  // elements per task: big enough to amortize a thread wake-up

// y[i] = f(z[i]) over n elements; y may alias z.
template <Act A, typename T>
void activation_forward(const T* z, T* y, int64_t n, T alpha) {
  using V = Vec<T>;
  const V va(alpha);
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + V::size() <= end; i += V::size()) forward<A, T>(V::loadu(z + i), va).store(y + i);
    if (i < end) forward<A, T>(V::loadu(z + i, end - i), va).store(y + i, end - i);
  });
}

// g = grad_y * f'(s) for one row of n columns; adds g into acc when acc != nullptr.
template <Act A, typename T>
inline void backward_row(const T* gy, const T* s, T* g, T* acc, int64_t n, T alpha) {
  using V = Vec<T>;
  const V va(alpha);
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) {
    V gv = V::loadu(gy + j);
    if constexpr (A != Act::Linear) gv = gv * derivative<A, T>(V::loadu(s + j), va);
    if (g != gy) gv.store(g + j);
    if (acc) (V::loadu(acc + j) + gv).store(acc + j);
  }
  if (j < n) {
    const int64_t r = n - j;
    V gv = V::loadu(gy + j, r);
    if constexpr (A != Act::Linear) gv = gv * derivative<A, T>(V::loadu(s + j, r), va);
    if (g != gy) gv.store(g + j, r);
    if (acc) (V::loadu(acc + j, r) + gv).store(acc + j, r);
  }
}

// g[M,N] = grad_y * f'(s), db[N] = sum over rows of g. Rows are split into one
// block per thread; each block sums into its own row of `partial`, so the
// reduction is deterministic for a given thread count and needs no atomics.
template <Act A, typename T>
void activation_backward(const T* gy, const T* s, T* g, T* db, int64_t m, int64_t n, T alpha) {
  const int64_t rows_per_task = std::max<int64_t>(1, kGrain / std::max<int64_t>(n, 1));
  const int64_t blocks = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), (m + rows_per_task - 1) / rows_per_task));
  std::vector<T> partial(db ? blocks * n : 0, T(0));
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = m * b / blocks, r1 = m * (b + 1) / blocks;
      T* acc = db ? partial.data() + b * n : nullptr;
      for (int64_t r = r0; r < r1; ++r) {
        backward_row<A, T>(gy + r * n, s ? s + r * n : nullptr, g + r * n, acc, n, alpha);
      }
    }
  });
  if (!db) return;
  using V = Vec<T>;
  for (int64_t j = 0; j < n; j += V::size()) {
    const int64_t w = std::min<int64_t>(V::size(), n - j);
    V sum(T(0));
    for (int64_t b = 0; b < blocks; ++b) sum = sum + V::loadu(partial.data() + b * n + j, w);
    sum.store(db + j, w);
  }
}

std::tuple<at::Tensor, at::Tensor> dense_forward(const at::Tensor& x, const at::Tensor& weight,
                                                 const std::optional<at::Tensor>& bias,
                                                 c10::string_view activation, double alpha) {
  const DenseArgs a = check_dense_forward(x, weight, bias, std::string(activation), alpha);
  const at::Tensor x2 = x.reshape({a.rows, a.in_feat});
  at::Tensor z = bias.has_value() ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
  const auto shape = dense_output_shape(x, a.out_feat);
  if (a.act == Act::Linear) return {z.view(shape), at::empty({0}, x.options())};
  const bool keep_z = needs_preact(a.act);
  at::Tensor y = keep_z ? at::empty_like(z) : z;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "densepipe_dense_forward", [&] {
    dispatch_activation(a.act, [&](auto tag) {
      activation_forward<decltype(tag)::value, scalar_t>(z.const_data_ptr<scalar_t>(),
                                                         y.mutable_data_ptr<scalar_t>(), z.numel(),
                                                         static_cast<scalar_t>(alpha));
    });
  });
  return {y.view(shape), keep_z ? z.view(shape) : at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& saved,
    c10::string_view activation, double alpha, std::array<bool, 3> output_mask) {
  const DenseArgs a = check_dense_backward(grad_y, x, weight, saved, std::string(activation), alpha);
  const at::Tensor gy = grad_y.reshape({a.rows, a.out_feat}).contiguous();
  const at::Tensor s = a.act == Act::Linear ? gy : saved.reshape({a.rows, a.out_feat}).contiguous();
  const bool want_db = output_mask[2];
  at::Tensor g = a.act == Act::Linear ? gy : at::empty_like(gy);
  at::Tensor db = want_db ? at::empty({a.out_feat}, x.options()) : at::empty({0}, x.options());
  if (a.act != Act::Linear || want_db) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "densepipe_dense_backward", [&] {
      dispatch_activation(a.act, [&](auto tag) {
        activation_backward<decltype(tag)::value, scalar_t>(
            gy.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(),
            g.mutable_data_ptr<scalar_t>(), want_db ? db.mutable_data_ptr<scalar_t>() : nullptr,
            a.rows, a.out_feat, static_cast<scalar_t>(alpha));
      });
    });
  }
  at::Tensor dx = output_mask[0] ? at::mm(g, weight).view(x.sizes()) : at::empty({0}, x.options());
  at::Tensor dw = output_mask[1] ? at::mm(g.t(), x.reshape({a.rows, a.in_feat}))
                                 : at::empty({0}, x.options());
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(densepipe, CPU, m) {
  m.impl("dense_forward", &dense_forward);
  m.impl("dense_backward", &dense_backward);
}

}  // namespace densepipe::cpu
