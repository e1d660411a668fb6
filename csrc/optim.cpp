// Schemas of the fused optimizer and clipping ops, and their shared checks.
// Every op updates whole parameter groups in place: list arguments hold one tensor
// per parameter, scalars are the group's hyperparameters, and step counts come
// from the host as doubles (all tensors of one call share a step).
#include "optim.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

namespace densepipe::optim {

namespace {

bool reduced_float(at::ScalarType dt) { return dt == at::kHalf || dt == at::kBFloat16; }

void check_param_dtype(const char* op, const at::Tensor& p, size_t i) {
  const auto dt = p.scalar_type();
  if (p.is_cuda()) {
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || reduced_float(dt), "densepipe ", op,
                ": params[", i, "] has dtype ", dt,
                "; on CUDA allowed: float32, float64, float16, bfloat16");
  } else {
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "densepipe ", op, ": params[", i,
                "] has dtype ", dt, "; on CPU allowed: float32, float64");
  }
}

void check_dense(const char* op, const char* name, size_t i, const at::Tensor& t) {
  TORCH_CHECK(t.is_non_overlapping_and_dense(), "densepipe ", op, ": ", name, "[", i,
              "] (shape ", t.sizes(), ", strides ", t.strides(),
              ") must cover one dense block of memory to be updated in place");
}

}  // namespace

Lists check_lists(const char* op, const std::vector<NamedList>& lists) {
  const at::TensorList params = lists.at(0).tensors;
  const size_t n = params.size();
  for (const NamedList& l : lists) {
    TORCH_CHECK(l.tensors.size() == n, "densepipe ", op, ": ", l.name, " has ", l.tensors.size(),
                " tensors but params has ", n, "; every list needs one tensor per parameter");
  }
  Lists out;
  out.owned.reserve(lists.size());  // views into owned lists stay valid
  for (const NamedList& l : lists) out.views.push_back(l.tensors);
  if (n == 0) return out;
  const at::Device device = params[0].device();
  const at::ScalarType pdt = params[0].scalar_type();
  check_param_dtype(op, params[0], 0);
  for (size_t k = 0; k < lists.size(); ++k) {
    const char* name = lists[k].name;
    const at::TensorList ts = lists[k].tensors;
    // State lists use one dtype throughout: the param's, or float32 under 16-bit params.
    const at::ScalarType want = k < 2 ? pdt : ts[0].scalar_type();
    TORCH_CHECK(want == pdt || (reduced_float(pdt) && want == at::kFloat), "densepipe ", op, ": ",
                name, "[0] has dtype ", want, " but params are ", pdt,
                "; state must match the params' dtype", reduced_float(pdt) ? " or be float32" : "");
    bool copied = false;
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& p = params[i];
      const at::Tensor& t = ts[i];
      TORCH_CHECK(t.device() == device, "densepipe ", op, ": ", name, "[", i, "] is on ", t.device(),
                  " but params[0] is on ", device, "; all tensors of one call must share a device");
      TORCH_CHECK(t.scalar_type() == want, "densepipe ", op, ": ", name, "[", i, "] has dtype ",
                  t.scalar_type(), ", expected ", want, " like ", k < 2 ? "params[0]" : name,
                  k < 2 ? "" : "[0]");
      TORCH_CHECK(t.sizes() == p.sizes(), "densepipe ", op, ": ", name, "[", i, "] has shape ",
                  t.sizes(), " but params[", i, "] has shape ", p.sizes());
      TORCH_CHECK(t.layout() == at::kStrided, "densepipe ", op, ": ", name, "[", i, "] is ",
                  t.layout(), "; sparse gradients are not supported, use a dense gradient");
      if (k == 0) {
        check_dense(op, name, i, t);
      } else if (t.strides() != p.strides()) {
        TORCH_CHECK(!lists[k].written, "densepipe ", op, ": ", name, "[", i, "] has strides ",
                    t.strides(), " but params[", i, "] has ", p.strides(),
                    "; state must share the parameter's memory layout");
        if (!copied) {  // a read-only input in another layout is copied into the param's
          out.owned.emplace_back(ts.begin(), ts.end());
          copied = true;
        }
        out.owned.back()[i] = at::empty_like(p).copy_(t);
      }
    }
    if (copied) out.views[k] = out.owned.back();
  }
  return out;
}

Lists check_grads(const char* op, at::TensorList grads, bool written) {
  Lists out;
  out.views.push_back(grads);
  if (grads.empty()) return out;
  const at::Device device = grads[0].device();
  const at::ScalarType dt = grads[0].scalar_type();
  check_param_dtype(op, grads[0], 0);
  std::vector<at::Tensor> copies;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.device() == device, "densepipe ", op, ": grads[", i, "] is on ", g.device(),
                " but grads[0] is on ", device, "; all tensors of one call must share a device");
    TORCH_CHECK(g.scalar_type() == dt, "densepipe ", op, ": grads[", i, "] has dtype ",
                g.scalar_type(), " but grads[0] has ", dt, "; one call takes one dtype");
    TORCH_CHECK(g.layout() == at::kStrided, "densepipe ", op, ": grads[", i, "] is ", g.layout(),
                "; sparse gradients are not supported, use a dense gradient");
    if (written) {
      check_dense(op, "grads", i, g);
    } else if (!g.is_non_overlapping_and_dense()) {  // read-only: a dense copy will do
      if (copies.empty()) copies.assign(grads.begin(), grads.end());
      copies[i] = g.contiguous();
    }
  }
  if (!copies.empty()) {
    out.owned.push_back(std::move(copies));
    out.views[0] = out.owned.back();
  }
  return out;
}

void check_range(const char* op, const char* name, double value, double lo, double hi,
                 bool open_hi) {
  const bool ok = value >= lo && (open_hi ? value < hi : value <= hi);
  TORCH_CHECK(ok, "densepipe ", op, ": invalid ", name, " ", value, "; allowed: ", lo,
              " <= ", name, open_hi ? " < " : " <= ", hi);
}

AdamScalars adam_scalars(double lr, double beta1, double beta2, double step) {
  const double bc1 = 1.0 - std::pow(beta1, step);
  const double bc2 = 1.0 - std::pow(beta2, step);
  return {lr / bc1, std::sqrt(bc2)};
}

double nadam_mu(double beta1, double momentum_decay, double step) {
  return beta1 * (1.0 - 0.5 * std::pow(0.96, step * momentum_decay));
}

NadamScalars nadam_scalars(double lr, double beta1, double momentum_decay, double step,
                           double mu_product) {
  const double mu = nadam_mu(beta1, momentum_decay, step);
  const double mu_next = nadam_mu(beta1, momentum_decay, step + 1);
  return {lr * (1.0 - mu) / (1.0 - mu_product), lr * mu_next / (1.0 - mu_product * mu_next)};
}

double adagrad_lr(double lr, double lr_decay, double step) {
  return lr / (1.0 + (step - 1.0) * lr_decay);
}

NormKind parse_norm(const char* op, double norm_type) {
  if (norm_type == INFINITY) return NormKind::Inf;
  if (norm_type == -INFINITY) return NormKind::NegInf;
  TORCH_CHECK(std::isfinite(norm_type) && norm_type > 0, "densepipe ", op, ": norm_type ", norm_type,
              " is not supported; allowed: a positive number, inf or -inf");
  if (norm_type == 1.0) return NormKind::One;
  if (norm_type == 2.0) return NormKind::Two;
  return NormKind::P;
}

}  // namespace densepipe::optim

TORCH_LIBRARY_FRAGMENT(densepipe, m) {
  // Lists hold one tensor per parameter; an optional state list (momentum buffers
  // without momentum, max_exp_avg_sqs without amsgrad, ...) is passed empty.
  m.def("sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, float lr,"
        " float momentum, float dampening, float weight_decay, bool nesterov, bool maximize,"
        " bool first_step) -> ()");
  m.def("adagrad_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state_sums, float lr,"
        " float lr_decay, float weight_decay, float eps, bool maximize, float step) -> ()");
  m.def("rmsprop_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] square_avgs,"
        " Tensor(c!)[] momentum_buffers, Tensor(d!)[] grad_avgs, float lr, float alpha, float eps,"
        " float weight_decay, float momentum, bool centered, bool maximize) -> ()");
  m.def("adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs,"
        " Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, float lr, float beta1,"
        " float beta2, float eps, float weight_decay, bool amsgrad, bool decoupled_weight_decay,"
        " bool maximize, float step) -> ()");
  // mu_product: the product of the momentum schedule up to and including this step, as the
  // caller keeps it (torch keeps it as a float32 scalar per parameter).
  m.def("nadam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs,"
        " Tensor(c!)[] exp_avg_sqs, float lr, float beta1, float beta2, float eps,"
        " float weight_decay, float momentum_decay, bool decoupled_weight_decay, bool maximize,"
        " float step, float mu_product) -> ()");
  m.def("adamax_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs,"
        " Tensor(c!)[] exp_infs, float lr, float beta1, float beta2, float eps, float weight_decay,"
        " bool maximize, float step) -> ()");
  // The norm of all grads as one vector (0-d, grads' dtype); norm_type > 0, inf or -inf.
  m.def("grad_norm(Tensor[] grads, float norm_type) -> Tensor");
  // grads *= min(max_norm / (total_norm + 1e-6), 1); total_norm: one element, grads' device.
  m.def("clip_grads_with_norm_(Tensor(a!)[] grads, Tensor total_norm, float max_norm) -> ()");
  m.def("clip_grads_by_value_(Tensor(a!)[] grads, float clip_value) -> ()");
  // Adds one to every step counter (one-element tensors, torch.optim's state["step"]);
  // returns the new counts as a float64 CPU tensor, for the host-side bias corrections.
  m.def("advance_steps_(Tensor(a!)[] steps) -> Tensor");
  // Multiplies every one-element tensor by factor in its own dtype (torch's `t *= factor`, as
  // NAdam's per-parameter mu_product); returns the new values as a float64 CPU tensor.
  m.def("mul_scalars_(Tensor(a!)[] values, float factor) -> Tensor");
}

namespace densepipe::optim {

namespace {

// Updates one-element tensors in place and returns their new values as a float64 CPU tensor.
// CPU ones are updated directly in their own dtype, without a dispatch each (a group has one per
// parameter, and this runs every step); others go through `fallback` (an ATen op) and item.
template <typename Update, typename Fallback>
at::Tensor update_scalars(const char* op, const char* name, at::TensorList values, Update update,
                          Fallback fallback) {
  at::Tensor out = at::empty({static_cast<int64_t>(values.size())}, at::kDouble);
  double* result = out.mutable_data_ptr<double>();
  for (size_t i = 0; i < values.size(); ++i) {
    const at::Tensor& s = values[i];
    TORCH_CHECK(s.numel() == 1 && s.is_floating_point(), "densepipe ", op, ": ", name, "[", i,
                "] must be a floating-point tensor with one element, got shape ", s.sizes(),
                " and dtype ", s.scalar_type());
    if (s.is_cpu() && s.scalar_type() == at::kFloat) {
      result[i] = update(*s.mutable_data_ptr<float>());
    } else if (s.is_cpu() && s.scalar_type() == at::kDouble) {
      result[i] = update(*s.mutable_data_ptr<double>());
    } else {
      fallback(s);
      result[i] = s.item<double>();
    }
  }
  return out;
}

at::Tensor advance_steps(at::TensorList steps) {
  return update_scalars(
      "advance_steps_", "steps", steps, [](auto& v) { return ++v; }, [](const at::Tensor& s) { s.add_(1); });
}

// In the tensor's own dtype, as torch's `t *= factor` rounds (float32 for NAdam's mu_product).
at::Tensor mul_scalars(at::TensorList values, double factor) {
  return update_scalars(
      "mul_scalars_", "values", values,
      [factor](auto& v) { return v *= static_cast<std::remove_reference_t<decltype(v)>>(factor); },
      [factor](const at::Tensor& s) { s.mul_(factor); });
}

}  // namespace

}  // namespace densepipe::optim

TORCH_LIBRARY_IMPL(densepipe, CompositeExplicitAutograd, m) {
  m.impl("advance_steps_", &densepipe::optim::advance_steps);
  m.impl("mul_scalars_", &densepipe::optim::mul_scalars);
}
