// An empty Python module: importing diffkernels._C loads this library, whose static
// initialisers register the operators with the PyTorch dispatcher.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
