// The fusedops operator library. Each operator's file defines its schemas (TORCH_LIBRARY_FRAGMENT)
// and its CPU kernels, its *_autograd.cpp the differentiable op over them (and over the Triton ops,
// which are registered from Python, as are the fake kernels).
#include <Python.h>
#include <torch/library.h>

// Lets `import fusedops._C` load this library; loading it registers the ops.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(fusedops, m) {}
