// The dense layer's elementwise passes on CUDA: the forward bias + activation
// epilogue (where the GEMM could not fuse it) and the backward act'(.) * grad_y
// fused with the bias-gradient column sum.
#pragma once

#include <ATen/core/Tensor.h>

#include "../activation.h"

namespace densepipe::cuda {

// y = act(z + bias) over a contiguous row-major z[rows, cols]. bias ([cols]) may
// be undefined. When preact is defined, z + bias is stored there as well (it may
// be z itself). y may be z. Runs on the current stream.
void bias_activation(const at::Tensor& z, const at::Tensor& bias, const at::Tensor& preact,
                     const at::Tensor& y, Act act, double alpha);

// g = grad_y * act'(saved) and db = g summed over rows, for contiguous
// row-major [rows, cols] tensors. saved is read only for activations other than
// linear; g and db may each be undefined to skip them. The column sums are
// deterministic: float32 per-split partials, summed in a fixed order.
void activation_grad(const at::Tensor& grad_y, const at::Tensor& saved, const at::Tensor& g,
                     const at::Tensor& db, Act act, double alpha);

}  // namespace densepipe::cuda
