// The dense layer's elementwise passes on CUDA: the forward activation (where
// the GEMM's epilogue could not apply it) and the backward act'(.) * grad_y fused
// with the bias-gradient column sum.
#pragma once

#include <ATen/core/Tensor.h>

#include "../activation.h"

namespace densepipe::cuda {

// y = act(z) over contiguous tensors of one shape; y may be z. Runs on the
// current stream.
void activation_forward(const at::Tensor& z, const at::Tensor& y, Act act, double alpha);

// g = grad_y * act'(saved) and db = g summed over rows, for contiguous
// row-major [rows, cols] tensors. saved is read only for activations other than
// linear; g and db may each be undefined to skip them. The column sums are
// deterministic: float32 per-split partials, summed in a fixed order.
void activation_grad(const at::Tensor& grad_y, const at::Tensor& saved, const at::Tensor& g,
                     const at::Tensor& db, Act act, double alpha);

}  // namespace densepipe::cuda
