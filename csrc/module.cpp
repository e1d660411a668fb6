// The densepipe._C Python module and the operator schemas. Importing the module
// runs the registrations; the ops are then reached as torch.ops.densepipe.*.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// An empty module: everything it offers is registered with the dispatcher.
PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
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
