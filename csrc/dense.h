// Fused dense + activation: shared argument checks for every backend.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

#include "activation.h"

namespace densepipe {

struct DenseArgs {
  Act act;
  int64_t rows;      // M: product of the input's leading dims
  int64_t in_feat;   // K
  int64_t out_feat;  // N
};

// Validates y = act(x @ weight^T + bias) arguments; names the offending argument
// in every message so a user can tell which tensor is wrong.
DenseArgs check_dense_forward(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const std::string& activation,
                              double alpha);

DenseArgs check_dense_backward(const at::Tensor& grad_y, const at::Tensor& x,
                               const at::Tensor& weight, const at::Tensor& saved,
                               const std::string& activation, double alpha);

// y's shape: x's leading dims with the last one replaced by out_feat.
std::vector<int64_t> dense_output_shape(const at::Tensor& x, int64_t out_feat);

}  // namespace densepipe
