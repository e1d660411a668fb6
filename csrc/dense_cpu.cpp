// CPU kernels of the fused dense op: the product on the backend gemm_cpu.cpp picks (oneDNN,
// densepipe's AVX-512 kernel or BLAS), then one vectorized, parallel epilogue. Backward fuses act'(.) and
// the bias reduction into a single pass over grad_y.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "activation_cpu.h"
#include "dense.h"
#include "gemm_cpu.h"

namespace densepipe::cpu {

namespace {

constexpr int64_t kGrain = 16384;  // elements per task: big enough to amortize a thread wake-up

int64_t rows_per_task(int64_t n) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(n, 1)); }

// dx = g W and dW = g^T x need nothing from each other. On 2 threads a small product
// splits poorly (128 rows: 1.3x, not 2x), so up to this size (m * n * k) the two run
// side by side, one thread each, rather than one after the other on both. Measured on
// 2 cores only: with more threads a product's own split may well gain more than 2x, so
// there they keep running in turn. Which way they run depends only on the sizes and
// the thread count, so results stay the same from run to run for a given thread count.
constexpr int64_t kSideBySideMaxWork = int64_t{1} << 24;

bool side_by_side(int64_t work) {
  return work <= kSideBySideMaxWork && at::get_num_threads() == 2 && !at::in_parallel_region();
}

// One row of the forward epilogue: v = z + bias; y = f(v). z keeps v only when the
// backward pass needs the pre-activation (then y is a separate buffer).
template <Act A, bool HasBias, typename T>
inline void forward_row(T* z, T* y, const T* bias, int64_t n, Vec<T> alpha) {
  using V = Vec<T>;
  auto step = [&](int64_t j, int64_t count) {
    V v = V::loadu(z + j, count);
    if constexpr (HasBias) v = v + V::loadu(bias + j, count);
    if constexpr (HasBias && needs_preact(A)) v.store(z + j, count);
    forward<A, T>(v, alpha).store(y + j, count);
  };
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) step(j, V::size());
  if (j < n) step(j, n - j);
}

// y[m, n] = f(z + bias) row by row, in parallel over row blocks; y may alias z.
template <Act A, bool HasBias, typename T>
void activation_forward(T* z, T* y, const T* bias, int64_t m, int64_t n, T alpha) {
  at::parallel_for(0, m, rows_per_task(n), [=](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) forward_row<A, HasBias, T>(z + r * n, y + r * n, bias, n, Vec<T>(alpha));
  });
}

// g = grad_y * f'(s) for one row of n columns; writes g unless g is nullptr (no dx
// or dW wanted) or grad_y itself; adds g into acc unless acc is nullptr (no db).
template <Act A, typename T>
inline void backward_row(const T* gy, const T* s, T* g, T* acc, int64_t n, Vec<T> alpha) {
  using V = Vec<T>;
  auto step = [&](int64_t j, int64_t count) {
    V gv = V::loadu(gy + j, count);
    if constexpr (A != Act::Linear) gv = gv * derivative<A, T>(V::loadu(s + j, count), alpha);
    if (g && g != gy) gv.store(g + j, count);
    if (acc) (V::loadu(acc + j, count) + gv).store(acc + j, count);
  };
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) step(j, V::size());
  if (j < n) step(j, n - j);
}

// g[M,N] = grad_y * f'(s), db[N] = sum over rows of g. Rows are split into one
// block per thread; each block sums into its own row of `partial`, so the
// reduction is deterministic for a given thread count and needs no atomics.
template <Act A, typename T>
void activation_backward(const T* gy, const T* s, T* g, T* db, int64_t m, int64_t n, T alpha) {
  const int64_t blocks = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), (m + rows_per_task(n) - 1) / rows_per_task(n)));
  std::vector<T> partial(db ? blocks * n : 0, T(0));
  T* part = partial.data();
  at::parallel_for(0, blocks, 1, [=](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = m * b / blocks, r1 = m * (b + 1) / blocks;
      T* acc = db ? part + b * n : nullptr;
      for (int64_t r = r0; r < r1; ++r) {
        backward_row<A, T>(gy + r * n, s + r * n, g ? g + r * n : nullptr, acc, n, Vec<T>(alpha));
      }
    }
  });
  if (!db) return;
  using V = Vec<T>;
  for (int64_t j = 0; j < n; j += V::size()) {
    const int64_t w = std::min<int64_t>(V::size(), n - j);
    V sum(T(0));
    for (int64_t b = 0; b < blocks; ++b) sum = sum + V::loadu(part + b * n + j, w);
    sum.store(db + j, w);
  }
}

// g lives only inside one backward call, so each thread keeps its buffer for the next
// call: a fresh M x N allocation faults its pages in again whenever the C allocator
// has handed the memory back to the OS, which on a VM costs as much as ~20% of the
// two backward GEMMs (1024x512x512, one core). Holds the largest g seen per thread.
at::Tensor scratch_like(const at::Tensor& t) {
  thread_local at::Tensor buf;
  if (!buf.defined() || buf.scalar_type() != t.scalar_type() || buf.numel() < t.numel()) {
    buf.reset();  // free the old buffer before taking the new one
    buf = at::empty({t.numel()}, t.options());
  }
  return buf.narrow(0, 0, t.numel()).view(t.sizes());
}

std::tuple<at::Tensor, at::Tensor> dense_forward(const at::Tensor& x, const at::Tensor& weight,
                                                 const std::optional<at::Tensor>& bias,
                                                 c10::string_view activation, double alpha) {
  const DenseArgs a = check_dense_forward(x, weight, bias, std::string(activation), alpha);
  const at::Tensor x2 = x.reshape({a.rows, a.in_feat});
  // Bias goes into the epilogue, not addmm: addmm would first copy the broadcast bias
  // into the output and then run the GEMM with beta = 1, an extra pass over M x N.
  at::Tensor z = gemm(x2, weight.t());  // [M, N]
  const bool keep_z = needs_preact(a.act);
  at::Tensor y = keep_z ? at::empty_like(z) : z;
  if (a.act != Act::Linear || bias.has_value()) {
    const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "densepipe_dense_forward", [&] {
      dispatch_activation(a.act, [&](auto tag) {
        constexpr Act A = decltype(tag)::value;
        scalar_t* zp = z.mutable_data_ptr<scalar_t>();
        scalar_t* yp = y.mutable_data_ptr<scalar_t>();
        const auto al = static_cast<scalar_t>(alpha);
        if (b.defined()) {
          activation_forward<A, true, scalar_t>(zp, yp, b.const_data_ptr<scalar_t>(), a.rows, a.out_feat, al);
        } else {
          activation_forward<A, false, scalar_t>(zp, yp, nullptr, a.rows, a.out_feat, al);
        }
      });
    });
  }
  // x's leading dimensions back; for 2-D x (every dense layer of an MLP) z already has them.
  const auto shaped = [&](const at::Tensor& t) {
    return x.dim() == 2 ? t : t.view(dense_output_shape(x, a.out_feat));
  };
  return {shaped(y), keep_z ? shaped(z) : at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& saved,
    c10::string_view activation, double alpha, std::array<bool, 3> output_mask) {
  const DenseArgs a = check_dense_backward(grad_y, x, weight, saved, std::string(activation), alpha);
  const at::Tensor gy = grad_y.reshape({a.rows, a.out_feat}).contiguous();
  const at::Tensor s = a.act == Act::Linear ? gy : saved.reshape({a.rows, a.out_feat}).contiguous();
  const bool want_g = output_mask[0] || output_mask[1], want_db = output_mask[2];
  // g = grad_y * f'(s) feeds both GEMMs; for a linear layer it is grad_y itself.
  at::Tensor g = a.act == Act::Linear ? gy : want_g ? scratch_like(gy) : at::Tensor();
  at::Tensor db = want_db ? at::empty({a.out_feat}, x.options()) : at::empty({0}, x.options());
  if ((a.act != Act::Linear && want_g) || want_db) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "densepipe_dense_backward", [&] {
      dispatch_activation(a.act, [&](auto tag) {
        activation_backward<decltype(tag)::value, scalar_t>(
            gy.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(),
            g.defined() ? g.mutable_data_ptr<scalar_t>() : nullptr,
            want_db ? db.mutable_data_ptr<scalar_t>() : nullptr, a.rows, a.out_feat,
            static_cast<scalar_t>(alpha));
      });
    });
  }
  at::Tensor dx, dw;  // left undefined where not wanted, and returned empty
  auto product_dx = [&] { dx = x.dim() == 2 ? gemm(g, weight) : gemm(g, weight).view(x.sizes()); };
  auto product_dw = [&] { dw = gemm(g.t(), x.reshape({a.rows, a.in_feat})); };
  if (output_mask[0] && output_mask[1] && side_by_side(a.rows * a.out_feat * a.in_feat)) {
    at::parallel_for(0, 2, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) i == 0 ? product_dx() : product_dw();
    });
  } else {
    if (output_mask[0]) product_dx();
    if (output_mask[1]) product_dw();
  }
  const auto or_empty = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, x.options()); };
  return {or_empty(dx), or_empty(dw), db};
}

}  // namespace

TORCH_LIBRARY_IMPL(densepipe, CPU, m) {
  m.impl("dense_forward", &dense_forward);
  m.impl("dense_backward", &dense_backward);
}

}  // namespace densepipe::cpu
