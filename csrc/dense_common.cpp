#include "dense.h"

#include <c10/util/Exception.h>

namespace densepipe {

namespace {

void check_dtype(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  if (t.is_cuda()) {
    TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
                "densepipe dense: ", name, " has dtype ", dt,
                "; on CUDA allowed: float32, float16, bfloat16, float64");
  } else {
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "densepipe dense: ", name, " has dtype ", dt,
                "; on CPU allowed: float32, float64");
  }
}

void check_alpha(Act act, const std::string& activation, double alpha) {
  if (act == Act::LeakyRelu || act == Act::Elu) {
    // The backward pass reads the derivative's branch off sign(y), which needs alpha >= 0.
    TORCH_CHECK(alpha >= 0.0, "densepipe dense: alpha must be >= 0 for activation '", activation,
                "', got ", alpha);
  }
}

void check_same(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "densepipe dense: ", name, " is on ", t.device(),
              " but x is on ", ref.device(), "; all tensors must be on one device");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "densepipe dense: ", name, " has dtype ",
              t.scalar_type(), " but x has ", ref.scalar_type(), "; dtypes must match");
}

}  // namespace

DenseArgs check_dense_forward(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const std::string& activation,
                              double alpha) {
  const Act act = parse_activation(activation);
  check_alpha(act, activation, alpha);
  check_dtype(x, "x");
  check_same(weight, x, "weight");
  TORCH_CHECK(weight.dim() == 2, "densepipe dense: weight must be 2-D (out_features, in_features), got ",
              weight.dim(), "-D with shape ", weight.sizes());
  TORCH_CHECK(x.dim() >= 1, "densepipe dense: x must have at least 1 dimension, got a scalar");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(x.size(-1) == k, "densepipe dense: x's last dimension is ", x.size(-1),
              " but weight expects in_features = ", k, " (x shape ", x.sizes(), ", weight shape ",
              weight.sizes(), ")");
  if (bias.has_value()) {
    check_same(*bias, x, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "densepipe dense: bias must have shape (", n,
                ",) to match weight's out_features, got ", bias->sizes());
  }
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return {act, rows, k, n};
}

DenseArgs check_dense_backward(const at::Tensor& grad_y, const at::Tensor& x,
                               const at::Tensor& weight, const at::Tensor& saved,
                               const std::string& activation, double alpha) {
  DenseArgs args = check_dense_forward(x, weight, std::nullopt, activation, alpha);
  check_same(grad_y, x, "grad_y");
  const auto expect = dense_output_shape(x, args.out_feat);
  TORCH_CHECK(grad_y.sizes() == at::IntArrayRef(expect), "densepipe dense backward: grad_y has shape ",
              grad_y.sizes(), ", expected ", at::IntArrayRef(expect));
  if (args.act != Act::Linear) {
    check_same(saved, x, "saved");
    TORCH_CHECK(saved.sizes() == at::IntArrayRef(expect), "densepipe dense backward: saved has shape ",
                saved.sizes(), ", expected ", at::IntArrayRef(expect));
  }
  return args;
}

std::vector<int64_t> dense_output_shape(const at::Tensor& x, int64_t out_feat) {
  auto shape = x.sizes().vec();
  shape.back() = out_feat;
  return shape;
}

}  // namespace densepipe
