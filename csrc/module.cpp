// The densepipe._C Python module and the operator schemas. Importing the module
// runs the registrations; the ops are then reached as torch.ops.densepipe.*. The
// module's own functions are the ones a dispatcher op cannot be: those that call
// back into Python.
#include <pybind11/functional.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include "chain_epoch.h"
#include "gemm_avx512.h"
#include "gemm_cpu.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.def(
      "chain_classifier_epoch",
      [](at::Tensor x, at::Tensor target, at::Tensor order, at::Tensor buffer,
         std::vector<std::pair<int64_t, int64_t>> bounds, std::vector<at::Tensor> coefs,
         std::optional<at::Tensor> class_weight, std::vector<at::Tensor> weights, std::vector<at::Tensor> biases,
         std::vector<std::string> activations, std::vector<double> alphas, std::vector<bool> need_weight,
         std::vector<bool> need_bias, bool trains, double head_weight, const std::function<void()>& update) {
        const densepipe::ChainSteps steps{std::move(x),      std::move(target), std::move(order),
                                          std::move(buffer), std::move(bounds), std::move(coefs),
                                          std::move(class_weight)};
        const densepipe::ChainLayers chain{std::move(weights),     std::move(biases),    std::move(activations),
                                           std::move(alphas),      std::move(need_weight), std::move(need_bias),
                                           trains,                 head_weight};
        return densepipe::chain_classifier_epoch(steps, chain, update);
      },
      "One epoch of a dense-chain classifier's training steps (csrc/chain_epoch.cpp).", py::arg("x"),
      py::arg("target"), py::arg("order"), py::arg("buffer"), py::arg("bounds"), py::arg("coefs"),
      py::arg("class_weight"), py::arg("weights"), py::arg("biases"), py::arg("activations"), py::arg("alphas"),
      py::arg("need_weight"), py::arg("need_bias"), py::arg("trains"), py::arg("head_weight"), py::arg("update"));
  m.def(
      "gemm_backend",
      [](const at::Tensor& a, const at::Tensor& b) {
        return densepipe::cpu::gemm_backend_name(densepipe::cpu::gemm_backend(a, b));
      },
      "Which implementation runs the CPU product a @ b: onednn, avx512 or blas (csrc/gemm_cpu.cpp).",
      py::arg("a"), py::arg("b"));
  m.attr("avx512_gemm") = densepipe::cpu::avx512::kBuilt;  // whether this build has the AVX-512 kernel
}

TORCH_LIBRARY(densepipe, m) {
  // y = act(x @ weight^T + bias). Returns (y, preact); preact is empty unless
  // the activation's derivative needs the pre-activation.
  m.def("dense_forward(Tensor x, Tensor weight, Tensor? bias, str activation, float alpha)"
        " -> (Tensor, Tensor)");
  // saved: preact where the forward returned one, else y. Returns (dx, dweight,
  // dbias); entries whose output_mask is false come back empty.
  m.def("dense_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor saved, str activation,"
        " float alpha, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}
