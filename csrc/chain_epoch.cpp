// One epoch of training steps for a classifier that is one chain of fused dense layers under
// softmax cross-entropy from logits: the tabular MLP classifier, the model most runs train.
//
// It makes, step after step, the calls the Python loop makes for that model (train/loop.py's
// steps with train/direct.py's _ChainPlan): the batch's gather, dense_chain_forward,
// softmax_cross_entropy, dense_chain_backward, the gradient norms and the step's log row, with
// the same arguments in the same order, so training is the same bit for bit. What it leaves out
// is the Python between those calls: a tenth to a quarter of a small MLP's step on the CPU. The
// optimizer's update (with clipping and constraints) stays in Python: a callable, called once per
// step after the gradients are set, so every optimizer and its state work as they do elsewhere.
#include "chain_epoch.h"

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <string>
#include <tuple>
#include <vector>

namespace densepipe {

namespace {

using Tensor = at::Tensor;
using Tensors = std::vector<Tensor>;

// The kernels' own signatures (csrc/dense_chain.cpp, csrc/softmax_xent.cpp): reached through
// the dispatcher, as from Python, so the tensors' backend picks the implementation.
using ChainForwardSig = std::tuple<Tensor, Tensors, Tensors>(const Tensor&, at::TensorList, at::TensorList,
                                                             std::vector<std::string>, at::ArrayRef<double>);
using ChainBackwardSig = std::tuple<Tensor, Tensors, Tensors>(
    const Tensor&, const Tensor&, at::TensorList, const Tensor&, at::TensorList, at::TensorList,
    std::vector<std::string>, at::ArrayRef<double>, c10::List<bool>, c10::List<bool>, bool);
using XentSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&);

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// Sets p.grad as Python's `p.grad = g` does (an undefined g: None), touching no parameter
// that has no gradient to lose.
void set_grad(const Tensor& p, const Tensor& g) {
  if (g.defined() || p.grad().defined()) p.mutable_grad() = g;
}

}  // namespace

std::tuple<Tensor, Tensor> chain_classifier_epoch(const ChainSteps& s, const ChainLayers& c,
                                                  const std::function<void()>& update) {
  static const auto forward = op<ChainForwardSig>("densepipe::dense_chain_forward");
  static const auto backward = op<ChainBackwardSig>("densepipe::dense_chain_backward");
  static const auto xent = op<XentSig>("densepipe::softmax_cross_entropy");
  const size_t steps = s.bounds.size(), n = c.weights.size();
  TORCH_CHECK(s.coefs.size() == steps, "densepipe chain_classifier_epoch: ", s.coefs.size(), " coefs for ",
              steps, " steps");
  TORCH_CHECK(n > 0 && c.biases.size() == n && c.need_weight.size() == n && c.need_bias.size() == n,
              "densepipe chain_classifier_epoch: the chain's lists differ in length");
  c10::List<bool> need_w, need_b;
  for (size_t i = 0; i < n; ++i) {
    need_w.push_back(c.need_weight[i]);
    need_b.push_back(c.need_bias[i]);
  }
  const Tensor zero = c.weights[0].new_zeros({});  // the gradient norm of a frozen layer
  Tensors rows, outputs, norm_of(n);
  rows.reserve(steps);
  outputs.reserve(steps);
  for (size_t k = 0; k < steps; ++k) {
    const auto [lo, hi] = s.bounds[k];
    const Tensor idx = s.order.slice(0, lo, hi);
    Tensor xb = s.buffer.slice(0, 0, hi - lo);
    at::index_select_out(xb, s.x, 0, idx);
    const Tensor ids = s.target.index_select(0, idx).reshape(-1).to(at::kLong);
    const Tensor row_weight = s.class_weight.has_value() ? s.class_weight->index({ids}) : Tensor();
    // The loss total's chain rule down to the rows, in autograd's order: seed, head weight, row weight.
    const Tensor coef = row_weight.defined() ? s.coefs[k] * row_weight : s.coefs[k];
    Tensor y, loss, grad;
    {
      at::AutoDispatchBelowAutograd kernels_only;  // no graph is recorded
      auto [out, hidden, preacts] = forward.call(xb, c.weights, c.biases, c.activations, c.alphas);
      std::tie(loss, grad) = xent.call(out, ids);
      grad.mul_(coef.dim() ? coef.unsqueeze(1) : coef);
      Tensors dws(n), dbs(n);  // undefined where nothing trains: no gradient, as zero_grad leaves it
      if (c.trains) {
        std::tie(std::ignore, dws, dbs) = backward.call(grad, xb, hidden, out, c.weights, preacts, c.activations,
                                                        c.alphas, need_w, need_b, false);
      }
      for (size_t i = 0; i < n; ++i) {
        set_grad(c.weights[i], c.need_weight[i] ? dws[i] : Tensor());
        set_grad(c.biases[i], c.need_bias[i] ? dbs[i] : Tensor());
      }
      y = std::move(out);
    }
    const Tensor part = row_weight.defined() ? (loss * row_weight).sum() : loss.sum();
    const Tensor total = c.head_weight == 1.0 ? part : part * c.head_weight;
    // Norms of the gradients as backward made them, before clipping rescales them.
    for (size_t i = 0; i < n; ++i) {
      const Tensor& g = c.weights[i].grad();
      norm_of[i] = g.defined() ? g : zero;
    }
    Tensors row = {total, part};
    for (Tensor& norm : at::_foreach_norm(norm_of, 2)) row.push_back(std::move(norm));
    update();
    rows.push_back(at::stack(row));
    outputs.push_back(std::move(y));
  }
  return {at::stack(rows), at::cat(outputs)};
}

}  // namespace densepipe
