// Operator schemas of the simplex_param library, and the stub that lets
// `import simplex_param._C` load this shared object. Kernels live in
// cpu/ and cuda/, one file per backend; autograd and fake kernels are
// registered from Python (simplex_param/ops.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(simplex_param, m) {
  m.def("softmax_weighted_sum(Tensor logits, Tensor[] inputs, float temperature=1.0) -> Tensor");
  m.def("weighted_sum(Tensor weights, Tensor[] inputs) -> Tensor");
  // Backward ops. `inputs` may be empty when the logits/weights need no
  // gradient; `inputs_requires_grad` has one entry per input, and the
  // gradients of inputs that need none are returned as empty tensors.
  m.def(
      "_softmax_weighted_sum_backward(Tensor grad, Tensor logits, Tensor[] inputs, "
      "float temperature, bool logits_requires_grad, bool[] inputs_requires_grad) "
      "-> (Tensor, Tensor[])");
  m.def(
      "_weighted_sum_backward(Tensor grad, Tensor weights, Tensor[] inputs, "
      "bool weights_requires_grad, bool[] inputs_requires_grad) -> (Tensor, Tensor[])");
}
