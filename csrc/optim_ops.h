// The fused optimizer and clipping ops, written once over a backend.
//
// A Backend provides
//   apply(lists, make_rule)  runs the rule make_rule(Tag<T>{}) over every element of
//                            the lists in place; T is the math type it picks (float,
//                            or double for float64 params).
//   norm(lists, kind, p)     the total norm of all tensors of lists[0] as one 0-d tensor.
// csrc/optim_cpu.cpp and csrc/cuda/optim.cu instantiate these functions with their
// backend and register them; the checks and scalar set-up live only here.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <type_traits>
#include <utility>
#include <vector>

#include "optim.h"
#include "optim_math.h"

namespace densepipe::optim {

template <typename T>
struct Tag {
  using type = T;
};

// Calls fn(std::integral_constant<bool, flag>), so a runtime flag picks a template.
template <typename Fn>
void dispatch_bool(bool flag, Fn&& fn) {
  if (flag) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

// Calls fn(std::integral_constant<NormKind, K>) for the runtime kind.
template <typename Fn>
void dispatch_norm(NormKind kind, Fn&& fn) {
  switch (kind) {
    case NormKind::One: return fn(std::integral_constant<NormKind, NormKind::One>{});
    case NormKind::Two: return fn(std::integral_constant<NormKind, NormKind::Two>{});
    case NormKind::P: return fn(std::integral_constant<NormKind, NormKind::P>{});
    case NormKind::Inf: return fn(std::integral_constant<NormKind, NormKind::Inf>{});
    case NormKind::NegInf: return fn(std::integral_constant<NormKind, NormKind::NegInf>{});
  }
}

// A state list that exists only under some hyperparameters (momentum buffers
// without momentum, ...) must then be passed, and otherwise be empty.
inline void optional_list(std::vector<NamedList>& lists, const char* op, const char* name,
                          at::TensorList tensors, bool used, const char* when) {
  if (used) {
    lists.push_back({name, tensors, true});
  } else {
    TORCH_CHECK(tensors.empty(), "densepipe ", op, ": ", name, " must be empty unless ", when,
                ", got ", tensors.size(), " tensors");
  }
}

inline std::vector<NamedList> param_and_grad(at::TensorList params, at::TensorList grads) {
  return {{"params", params, true}, {"grads", grads, false}};
}

template <class Backend>
void sgd_step(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
              double lr, double momentum, double dampening, double weight_decay, bool nesterov,
              bool maximize, bool first_step) {
  constexpr const char* op = "sgd_step_";
  check_range(op, "lr", lr, 0, INFINITY);
  check_range(op, "momentum", momentum, 0, INFINITY);
  check_range(op, "weight_decay", weight_decay, 0, INFINITY);
  TORCH_CHECK(!nesterov || (momentum > 0 && dampening == 0), "densepipe ", op,
              ": Nesterov momentum requires a momentum and zero dampening, got momentum ", momentum,
              " and dampening ", dampening);
  const bool has_momentum = momentum != 0;
  auto named = param_and_grad(params, grads);
  optional_list(named, op, "momentum_buffers", momentum_buffers, has_momentum, "momentum != 0");
  const Lists lists = check_lists(op, named);
  dispatch_bool(has_momentum, [&](auto M) {
    Backend::apply(lists, [&](auto tag) {
      using T = typename decltype(tag)::type;
      return SgdRule<T, M.value>{T(lr), T(momentum), T(1 - dampening), T(weight_decay),
                                 nesterov, maximize, first_step};
    });
  });
}

template <class Backend>
void adagrad_step(at::TensorList params, at::TensorList grads, at::TensorList state_sums, double lr,
                  double lr_decay, double weight_decay, double eps, bool maximize, double step) {
  constexpr const char* op = "adagrad_step_";
  check_range(op, "lr", lr, 0, INFINITY);
  check_range(op, "lr_decay", lr_decay, 0, INFINITY);
  check_range(op, "weight_decay", weight_decay, 0, INFINITY);
  check_range(op, "eps", eps, 0, INFINITY);
  check_range(op, "step", step, 1, INFINITY);
  auto named = param_and_grad(params, grads);
  named.push_back({"state_sums", state_sums, true});
  const Lists lists = check_lists(op, named);
  const double clr = adagrad_lr(lr, lr_decay, step);
  Backend::apply(lists, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return AdagradRule<T>{T(clr), T(weight_decay), T(eps), maximize};
  });
}

template <class Backend>
void rmsprop_step(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                  at::TensorList momentum_buffers, at::TensorList grad_avgs, double lr, double alpha,
                  double eps, double weight_decay, double momentum, bool centered, bool maximize) {
  constexpr const char* op = "rmsprop_step_";
  check_range(op, "lr", lr, 0, INFINITY);
  check_range(op, "alpha", alpha, 0, INFINITY);
  check_range(op, "eps", eps, 0, INFINITY);
  check_range(op, "weight_decay", weight_decay, 0, INFINITY);
  check_range(op, "momentum", momentum, 0, INFINITY);
  const bool has_momentum = momentum > 0;
  auto named = param_and_grad(params, grads);
  named.push_back({"square_avgs", square_avgs, true});
  optional_list(named, op, "momentum_buffers", momentum_buffers, has_momentum, "momentum > 0");
  optional_list(named, op, "grad_avgs", grad_avgs, centered, "centered");
  const Lists lists = check_lists(op, named);
  dispatch_bool(has_momentum, [&](auto M) {
    dispatch_bool(centered, [&](auto C) {
      Backend::apply(lists, [&](auto tag) {
        using T = typename decltype(tag)::type;
        return RmspropRule<T, M.value, C.value>{T(lr), T(alpha), T(1 - alpha), T(eps), T(weight_decay),
                                                T(momentum), maximize};
      });
    });
  });
}

// The checks and lists the Adam-style ops share: lr, betas in [0, 1), eps, weight_decay and
// step, then params, grads and the two moment lists.
inline std::vector<NamedList> adam_like(const char* op, at::TensorList params, at::TensorList grads,
                                        NamedList first, NamedList second, double lr, double beta1,
                                        double beta2, double eps, double weight_decay, double step) {
  check_range(op, "lr", lr, 0, INFINITY);
  check_range(op, "beta1", beta1, 0, 1, /*open_hi=*/true);
  check_range(op, "beta2", beta2, 0, 1, /*open_hi=*/true);
  check_range(op, "eps", eps, 0, INFINITY);
  check_range(op, "weight_decay", weight_decay, 0, INFINITY);
  check_range(op, "step", step, 1, INFINITY);
  auto named = param_and_grad(params, grads);
  named.push_back(first);
  named.push_back(second);
  return named;
}

template <typename T>
AdamMoments<T> adam_moments(double lr, double beta1, double beta2, double weight_decay, bool decoupled,
                            bool maximize) {
  return {T(1 - beta1), T(beta2), T(1 - beta2), T(weight_decay), T(1 - lr * weight_decay), decoupled,
          maximize};
}

template <class Backend>
void adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, double lr, double beta1,
               double beta2, double eps, double weight_decay, bool amsgrad, bool decoupled,
               bool maximize, double step) {
  constexpr const char* op = "adam_step_";
  auto named = adam_like(op, params, grads, {"exp_avgs", exp_avgs, true}, {"exp_avg_sqs", exp_avg_sqs, true},
                         lr, beta1, beta2, eps, weight_decay, step);
  optional_list(named, op, "max_exp_avg_sqs", max_exp_avg_sqs, amsgrad, "amsgrad");
  const Lists lists = check_lists(op, named);
  const AdamScalars s = adam_scalars(lr, beta1, beta2, step);
  dispatch_bool(amsgrad, [&](auto A) {
    Backend::apply(lists, [&](auto tag) {
      using T = typename decltype(tag)::type;
      return AdamRule<T, A.value>{adam_moments<T>(lr, beta1, beta2, weight_decay, decoupled, maximize),
                                  T(eps), T(s.step_size), T(s.bc2_sqrt)};
    });
  });
}

template <class Backend>
void nadam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                at::TensorList exp_avg_sqs, double lr, double beta1, double beta2, double eps,
                double weight_decay, double momentum_decay, bool decoupled, bool maximize,
                double step, double mu_product) {
  constexpr const char* op = "nadam_step_";
  auto named = adam_like(op, params, grads, {"exp_avgs", exp_avgs, true}, {"exp_avg_sqs", exp_avg_sqs, true},
                         lr, beta1, beta2, eps, weight_decay, step);
  check_range(op, "momentum_decay", momentum_decay, 0, INFINITY);
  check_range(op, "mu_product", mu_product, 0, 1, /*open_hi=*/true);
  const Lists lists = check_lists(op, named);
  const NadamScalars s = nadam_scalars(lr, beta1, momentum_decay, step, mu_product);
  const double bc2 = 1.0 - std::pow(beta2, step);
  Backend::apply(lists, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return NadamRule<T>{adam_moments<T>(lr, beta1, beta2, weight_decay, decoupled, maximize), T(eps), T(bc2),
                        T(s.grad_step), T(s.avg_step)};
  });
}

template <class Backend>
void adamax_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                 at::TensorList exp_infs, double lr, double beta1, double beta2, double eps,
                 double weight_decay, bool maximize, double step) {
  constexpr const char* op = "adamax_step_";
  const Lists lists = check_lists(op, adam_like(op, params, grads, {"exp_avgs", exp_avgs, true},
                                                {"exp_infs", exp_infs, true}, lr, beta1, beta2, eps,
                                                weight_decay, step));
  const double step_size = lr / (1.0 - std::pow(beta1, step));
  Backend::apply(lists, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return AdamaxRule<T>{T(1 - beta1), T(beta2), T(eps), T(weight_decay), T(step_size), maximize};
  });
}

template <class Backend>
at::Tensor grad_norm(at::TensorList grads, double norm_type) {
  constexpr const char* op = "grad_norm";
  TORCH_CHECK(!grads.empty(), "densepipe ", op, ": grads is empty; pass at least one tensor");
  const NormKind kind = parse_norm(op, norm_type);
  return Backend::norm(check_grads(op, grads, /*written=*/false), kind, norm_type);
}

template <class Backend>
void clip_grads_with_norm(at::TensorList grads, const at::Tensor& total_norm, double max_norm) {
  constexpr const char* op = "clip_grads_with_norm_";
  const Lists checked = check_grads(op, grads, /*written=*/true);
  if (checked.empty()) return;
  TORCH_CHECK(total_norm.numel() == 1 && total_norm.is_floating_point(), "densepipe ", op,
              ": total_norm must be a floating-point tensor with one element, got shape ",
              total_norm.sizes(), " and dtype ", total_norm.scalar_type());
  TORCH_CHECK(total_norm.device() == grads[0].device(), "densepipe ", op, ": total_norm is on ",
              total_norm.device(), " but grads are on ", grads[0].device());
  // The rule reads the norm in the math type where it runs (no host round trip).
  const bool dbl = grads[0].scalar_type() == at::kDouble;
  const at::Tensor norm = total_norm.reshape({}).to(dbl ? at::kDouble : at::kFloat).contiguous();
  Backend::apply(checked, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return ScaleByNormRule<T>{norm.const_data_ptr<T>(), T(max_norm)};
  });
}

template <class Backend>
void clip_grads_by_value(at::TensorList grads, double clip_value) {
  constexpr const char* op = "clip_grads_by_value_";
  const Lists checked = check_grads(op, grads, /*written=*/true);
  Backend::apply(checked, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return ClampRule<T>{T(clip_value)};
  });
}

// Registers every op above for one backend's dispatch key.
template <class Backend>
void register_optim_ops(torch::Library& m) {
  m.impl("sgd_step_", &sgd_step<Backend>);
  m.impl("adagrad_step_", &adagrad_step<Backend>);
  m.impl("rmsprop_step_", &rmsprop_step<Backend>);
  m.impl("adam_step_", &adam_step<Backend>);
  m.impl("nadam_step_", &nadam_step<Backend>);
  m.impl("adamax_step_", &adamax_step<Backend>);
  m.impl("grad_norm", &grad_norm<Backend>);
  m.impl("clip_grads_with_norm_", &clip_grads_with_norm<Backend>);
  m.impl("clip_grads_by_value_", &clip_grads_by_value<Backend>);
}

}  // namespace densepipe::optim
