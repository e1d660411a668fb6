// A chain of fused dense layers as one op: layer i's output is layer i+1's input.
//
// The layers run on the dense_forward / dense_backward kernels of the tensors' backend
// (reached through the dispatcher, so one implementation serves CPU and CUDA). Why a chain
// op at all: autograd then records one node for the whole stack instead of one per layer,
// and for the small layers of a tabular MLP that per-node cost (Python autograd glue,
// saved-tensor bookkeeping) is a large share of a training step.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

namespace densepipe {

namespace {

using Tensor = at::Tensor;
using Tensors = std::vector<Tensor>;

using ForwardSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                              c10::string_view, double);
using BackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                       const Tensor&, c10::string_view, double,
                                                       std::array<bool, 3>);

const c10::TypedOperatorHandle<ForwardSig>& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("densepipe::dense_forward", "")
                             .typed<ForwardSig>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSig>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("densepipe::dense_backward", "")
                             .typed<BackwardSig>();
  return op;
}

void check_lengths(const char* op, size_t layers, std::initializer_list<std::pair<const char*, size_t>> lists) {
  TORCH_CHECK(layers > 0, "densepipe ", op, ": weights is empty; a chain needs at least one layer");
  for (const auto& [name, size] : lists) {
    TORCH_CHECK(size == layers, "densepipe ", op, ": ", name, " has ", size, " entries but weights has ",
                layers, "; give one per layer");
  }
}

// Runs one layer's kernel; a failing check names the layer, since the kernel's own
// message speaks of "x" and "weight" without saying which layer of the chain.
template <typename Fn>
auto in_layer(const char* op, size_t i, Fn&& fn) {
  try {
    return fn();
  } catch (const c10::OutOfMemoryError&) {
    throw;  // keeps its type (torch.OutOfMemoryError), which callers may handle
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "densepipe ", op, ": layer ", i, ": ", e.what_without_backtrace());
  }
}

std::tuple<Tensor, Tensors, Tensors> dense_chain_forward(const Tensor& x, at::TensorList weights,
                                                         at::TensorList biases, std::vector<std::string> activations,
                                                         at::ArrayRef<double> alphas) {
  const size_t n = weights.size();
  check_lengths("dense_chain_forward", n,
                {{"biases", biases.size()}, {"activations", activations.size()}, {"alphas", alphas.size()}});
  Tensors hidden, preacts;  // hidden[i]: layer i's output for i < n - 1 (the next layer's input)
  hidden.reserve(n - 1);
  preacts.reserve(n);
  Tensor h = x;
  for (size_t i = 0; i < n; ++i) {
    auto [y, preact] = in_layer("dense_chain_forward", i, [&] {
      const std::optional<Tensor> bias = biases[i].numel() > 0 ? std::optional<Tensor>(biases[i]) : std::nullopt;
      return forward_op().call(h, weights[i], bias, activations[i], alphas[i]);
    });
    preacts.push_back(std::move(preact));
    if (i + 1 < n) hidden.push_back(y);
    h = std::move(y);
  }
  return {h, hidden, preacts};
}

std::tuple<Tensor, Tensors, Tensors> dense_chain_backward(
    const Tensor& grad_y, const Tensor& x, at::TensorList hidden, const Tensor& y, at::TensorList weights,
    at::TensorList preacts, std::vector<std::string> activations, at::ArrayRef<double> alphas,
    c10::List<bool> need_dweight, c10::List<bool> need_dbias, bool need_dx) {
  const size_t n = weights.size();
  check_lengths("dense_chain_backward", n,
                {{"preacts", preacts.size()}, {"activations", activations.size()}, {"alphas", alphas.size()},
                 {"need_dweight", need_dweight.size()}, {"need_dbias", need_dbias.size()}});
  TORCH_CHECK(hidden.size() + 1 == n, "densepipe dense_chain_backward: hidden has ", hidden.size(),
              " entries; a chain of ", n, " layers has ", n - 1);
  // The lowest layer that wants a parameter gradient: below it (frozen layers, an input that
  // needs no gradient) backpropagation stops.
  size_t lowest = n;
  for (size_t k = 0; k < n && lowest == n; ++k) {
    if (need_dweight.get(k) || need_dbias.get(k)) lowest = k;
  }
  const size_t stop = need_dx ? 0 : lowest;
  const Tensor none = at::empty({0}, x.options());
  Tensors dweights(n, none), dbiases(n, none);
  Tensor g = grad_y;
  for (size_t k = n; k-- > stop;) {  // last layer first
    const Tensor& input = k == 0 ? x : hidden[k - 1];
    const Tensor& output = k + 1 == n ? y : hidden[k];
    // The kernel wants the pre-activation where the forward kept one, else the output.
    const Tensor& saved = preacts[k].numel() > 0 ? preacts[k] : output;
    const std::array<bool, 3> mask = {k > stop || (k == 0 && need_dx), need_dweight.get(k), need_dbias.get(k)};
    auto [dx, dw, db] = in_layer("dense_chain_backward", k, [&] {
      return backward_op().call(g, input, weights[k], saved, activations[k], alphas[k], mask);
    });
    dweights[k] = std::move(dw);
    dbiases[k] = std::move(db);
    g = std::move(dx);
  }
  return {need_dx ? g : none, dweights, dbiases};
}

}  // namespace

}  // namespace densepipe

TORCH_LIBRARY_FRAGMENT(densepipe, m) {
  // Layers y_i = act_i(y_{i-1} @ weights[i]^T + biases[i]), y_{-1} = x; an empty bias is none
  // (Tensor[] rather than Tensor?[]: autograd's list support takes only lists of tensors).
  // Returns (y, hidden,
  // preacts): the last layer's output, the outputs of the others (what backward needs as
  // their successors' inputs) and each layer's pre-activation (empty unless its derivative
  // needs it), as dense_forward returns them.
  m.def("dense_chain_forward(Tensor x, Tensor[] weights, Tensor[] biases, str[] activations,"
        " float[] alphas) -> (Tensor, Tensor[], Tensor[])");
  // dense_backward through the chain, last layer first. Returns (dx, dweights, dbiases);
  // dx and the entries whose need_* flag is false come back empty.
  m.def("dense_chain_backward(Tensor grad_y, Tensor x, Tensor[] hidden, Tensor y, Tensor[] weights,"
        " Tensor[] preacts, str[] activations, float[] alphas, bool[] need_dweight, bool[] need_dbias,"
        " bool need_dx) -> (Tensor, Tensor[], Tensor[])");
}

// Below autograd and for every backend: the per-layer calls dispatch to the tensors' device.
TORCH_LIBRARY_IMPL(densepipe, CompositeExplicitAutograd, m) {
  m.impl("dense_chain_forward", &densepipe::dense_chain_forward);
  m.impl("dense_chain_backward", &densepipe::dense_chain_backward);
}
