// CUDA kernels of the fused dense op, registered for the CUDA dispatch key.
//
// Forward: one cuBLASLt matmul whose epilogue adds the bias and, for gelu_tanh,
// applies the activation too; every other activation gets the GEMM followed by
// one vectorized activation pass. A problem cuBLASLt declines (alignment, dtype)
// runs as addmm, so the bias is still added before the single rounding to the
// output dtype: a bfloat16 z rounded before the bias could change sign near zero
// and flip relu's mask. Backward: one pass computing g = grad_y * act'(saved)
// and the bias gradient, then the two GEMMs dx = g @ W and dW = g^T @ x.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

#include "../dense.h"
#include "cublaslt_matmul.h"
#include "dense_epilogue.h"

namespace densepipe::cuda {

namespace {

// Activations the cuBLASLt epilogue computes itself; the rest run in our kernel.
constexpr std::array<std::pair<Act, LtActivation>, 1> kLtFused{{
    {Act::GeluTanh, LtActivation::GeluTanhAux},  // cuBLASLt's GELU is the tanh approximation
}};

LtActivation lt_fused(Act act, int64_t out_feat) {
  for (const auto& [a, lt] : kLtFused) {
    if (a != act) continue;
    // The pre-activation (aux) output needs a leading dimension cuBLASLt accepts.
    if (lt == LtActivation::GeluTanhAux && out_feat % kLtAuxLdMultiple != 0) return LtActivation::None;
    return lt;
  }
  return LtActivation::None;
}

// Stands for an output the caller did not ask for (as the CPU kernels return).
at::Tensor not_computed(const at::Tensor& x) { return at::empty({0}, x.options()); }

std::tuple<at::Tensor, at::Tensor> dense_forward(const at::Tensor& x, const at::Tensor& weight,
                                                 const std::optional<at::Tensor>& bias_opt,
                                                 c10::string_view activation, double alpha) {
  const DenseArgs a = check_dense_forward(x, weight, bias_opt, std::string(activation), alpha);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = x.reshape({a.rows, a.in_feat}).contiguous();  // [M, K]
  const at::Tensor w = weight.contiguous();                           // [N, K]
  const at::Tensor bias = bias_opt.has_value() ? bias_opt->contiguous() : at::Tensor();  // [N]
  const bool keep_z = needs_preact(a.act);
  at::Tensor z = at::empty({a.rows, a.out_feat}, x.options());  // pre-activation, [M, N]
  const at::Tensor y = keep_z ? at::empty_like(z) : z;          // output, [M, N]; z itself unless z is kept

  // Try the fused epilogue, then a bias-only epilogue; else addmm (or mm). Every
  // path leaves z = x W^T + b rounded once.
  const LtActivation fused = lt_fused(a.act, a.out_feat);
  const bool act_done =
      fused != LtActivation::None &&
      lt_dense_matmul(x2, w, bias, fused, y, fused == LtActivation::GeluTanhAux ? z : at::Tensor());
  if (!act_done && !lt_dense_matmul(x2, w, bias, LtActivation::None, z, at::Tensor())) {
    if (bias.defined()) {
      at::addmm_out(z, bias, x2, w.t());
    } else {
      at::mm_out(z, x2, w.t());
    }
  }
  if (!act_done && a.act != Act::Linear) activation_forward(z, y, a.act, alpha);
  const auto shape = dense_output_shape(x, a.out_feat);
  return {y.view(shape), keep_z ? z.view(shape) : not_computed(x)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& saved,
    c10::string_view activation, double alpha, std::array<bool, 3> output_mask) {
  const DenseArgs a = check_dense_backward(grad_y, x, weight, saved, std::string(activation), alpha);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor gy = grad_y.reshape({a.rows, a.out_feat}).contiguous();  // [M, N]
  const bool linear = a.act == Act::Linear;
  const at::Tensor s = linear ? at::Tensor() : saved.reshape({a.rows, a.out_feat}).contiguous();
  const at::Tensor g = linear ? gy : at::empty_like(gy);  // dL/dz, [M, N]
  const at::Tensor db = output_mask[2] ? at::empty({a.out_feat}, x.options()) : not_computed(x);
  if (!linear || output_mask[2]) {
    activation_grad(gy, s, linear ? at::Tensor() : g, output_mask[2] ? db : at::Tensor(), a.act, alpha);
  }
  const at::Tensor dx = output_mask[0] ? at::mm(g, weight).view(x.sizes()) : not_computed(x);
  const at::Tensor dw =
      output_mask[1] ? at::mm(g.t(), x.reshape({a.rows, a.in_feat})) : not_computed(x);
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(densepipe, CUDA, m) {
  m.impl("dense_forward", &dense_forward);
  m.impl("dense_backward", &dense_backward);
}

}  // namespace densepipe::cuda
