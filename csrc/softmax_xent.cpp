// Softmax cross-entropy against class ids, with its gradient, in one pass over the logits.
//
// Returns each row's loss, logsumexp(z) - z[target], and the loss's gradient with respect to
// the logits, softmax(z) - onehot(target). The gradient comes out of the forward pass for two
// reasons: training without autograd (train/direct.py) needs it right away, and it costs one
// exp per logit that the loss computes anyway. The CPU kernel makes one pass per row; other
// backends run the composite version below on ATen ops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "vec_math.h"

namespace densepipe {

namespace {

using Tensor = at::Tensor;

void check_inputs(const Tensor& logits, const Tensor& target) {
  TORCH_CHECK(logits.dim() == 2, "densepipe softmax_cross_entropy: logits must be 2-D (rows, classes), got ",
              logits.dim(), "-D");
  TORCH_CHECK(logits.size(1) > 0, "densepipe softmax_cross_entropy: logits have no classes (0 columns)");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0),
              "densepipe softmax_cross_entropy: target must hold one class id per row (", logits.size(0),
              "), got shape ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, "densepipe softmax_cross_entropy: target must be int64 "
              "class ids, got ", target.scalar_type());
  TORCH_CHECK(target.device() == logits.device(), "densepipe softmax_cross_entropy: target is on ",
              target.device(), " but logits are on ", logits.device());
}

// One row: e = exp(z - max z) into grad, then grad = e / sum(e) - onehot(t) and the loss
// max z + log(sum(e)) - z[t]. Vectorized: a scalar exp per logit made this op cost 7x torch's
// cross_entropy at 100 classes. Each lane sums its own share of the terms.
template <typename T>
inline void softmax_xent_row(const T* z, int64_t t, T* loss, T* grad, int64_t classes) {
  using V = at::vec::Vectorized<T>;
  const V lowest(-std::numeric_limits<T>::infinity()), zero(T(0));
  V top_v = lowest;  // a NaN logit propagates through maximum, exp and the sum: the loss is NaN
  for (int64_t c = 0; c < classes; c += V::size()) {
    const int64_t w = std::min<int64_t>(V::size(), classes - c);
    top_v = at::vec::maximum(top_v, V::set(lowest, V::loadu(z + c, w), w));
  }
  const T top = at::vec::vec_reduce_all<T>([](V a, V b) { return at::vec::maximum(a, b); }, top_v);
  V sum_v = zero;
  for (int64_t c = 0; c < classes; c += V::size()) {
    const int64_t w = std::min<int64_t>(V::size(), classes - c);
    const V e = cpu::vmath::exp(V::loadu(z + c, w) - V(top));
    e.store(grad + c, w);
    sum_v = sum_v + V::set(zero, e, w);
  }
  const double sum = at::vec::vec_reduce_all<T>([](V a, V b) { return a + b; }, sum_v);
  const V inv(static_cast<T>(1.0 / sum));
  for (int64_t c = 0; c < classes; c += V::size()) {
    const int64_t w = std::min<int64_t>(V::size(), classes - c);
    (V::loadu(grad + c, w) * inv).store(grad + c, w);
  }
  grad[t] -= T(1);
  *loss = static_cast<T>(static_cast<double>(top) + std::log(sum) - static_cast<double>(z[t]));
}

template <typename T>
void softmax_xent_rows(const T* z, const int64_t* target, T* loss, T* grad, int64_t rows, int64_t classes) {
  // A few hundred logits per task: below that a thread's wake-up costs more than the rows.
  const int64_t grain = std::max<int64_t>(1, 4096 / classes);
  at::parallel_for(0, rows, grain, [=](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      softmax_xent_row(z + r * classes, target[r], loss + r, grad + r * classes, classes);
    }
  });
}

std::tuple<Tensor, Tensor> softmax_cross_entropy_cpu(const Tensor& logits_in, const Tensor& target_in) {
  check_inputs(logits_in, target_in);
  TORCH_CHECK(logits_in.scalar_type() == at::kFloat || logits_in.scalar_type() == at::kDouble,
              "densepipe softmax_cross_entropy: logits have dtype ", logits_in.scalar_type(),
              "; on CPU allowed: float32, float64");
  const Tensor logits = logits_in.contiguous(), target = target_in.contiguous();
  const int64_t rows = logits.size(0), classes = logits.size(1);
  const int64_t* t = target.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(t[r] >= 0 && t[r] < classes, "densepipe softmax_cross_entropy: row ", r, " has class id ",
                t[r], ", outside 0..", classes - 1, " (", classes, " classes)");
  }
  Tensor loss = at::empty({rows}, logits.options());
  Tensor grad = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "softmax_cross_entropy", [&] {
    softmax_xent_rows<scalar_t>(logits.data_ptr<scalar_t>(), t, loss.data_ptr<scalar_t>(),
                                grad.data_ptr<scalar_t>(), rows, classes);
  });
  return {loss, grad};
}

// Every other backend: the same result from ATen's log_softmax.
std::tuple<Tensor, Tensor> softmax_cross_entropy_composite(const Tensor& logits, const Tensor& target) {
  check_inputs(logits, target);
  const Tensor ids = target.unsqueeze(1);
  const Tensor log_probs = at::log_softmax(logits, 1);
  Tensor loss = log_probs.gather(1, ids).squeeze(1).neg();
  Tensor grad = log_probs.exp();
  grad.scatter_add_(1, ids, at::full({logits.size(0), 1}, -1.0, logits.options()));
  return {loss, grad};
}

}  // namespace

}  // namespace densepipe

TORCH_LIBRARY_FRAGMENT(densepipe, m) {
  // logits (rows, classes), target (rows,) int64 class ids. Returns (loss, grad): loss (rows,)
  // = logsumexp(logits) - logits[target] per row, grad (rows, classes) = softmax(logits) -
  // onehot(target), the derivative of each row's loss with respect to its logits.
  m.def("softmax_cross_entropy(Tensor logits, Tensor target) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(densepipe, CPU, m) {
  m.impl("softmax_cross_entropy", &densepipe::softmax_cross_entropy_cpu);
}

TORCH_LIBRARY_IMPL(densepipe, CompositeExplicitAutograd, m) {
  m.impl("softmax_cross_entropy", &densepipe::softmax_cross_entropy_composite);
}
