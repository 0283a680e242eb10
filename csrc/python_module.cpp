// diffkernels._C: importing it loads this library, whose static initialisers register the
// operators with the PyTorch dispatcher. Its functions carry dk.set_backend's per-thread choice
// and the Triton availability (known in Python) to the C++ router in csrc/backend.cpp.
#include <Python.h>

#include "backend.h"

namespace {

PyObject* set_backend(PyObject*, PyObject* arg) {
  const long value = PyLong_AsLong(arg);
  if (value == -1 && PyErr_Occurred()) return nullptr;
  if (value < 0 || value > static_cast<long>(diffkernels::Backend::Cuda)) {
    PyErr_SetString(PyExc_ValueError, "backend: unknown backend code");
    return nullptr;
  }
  diffkernels::select_backend(static_cast<diffkernels::Backend>(value));
  Py_RETURN_NONE;
}

PyObject* set_triton_availability(PyObject*, PyObject* args) {
  int available = 0, interpret = 0;
  if (!PyArg_ParseTuple(args, "pp", &available, &interpret)) return nullptr;
  diffkernels::set_triton_availability(available != 0, interpret != 0);
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"_set_backend", set_backend, METH_O, "Select this thread's backend (a Backend code)."},
    {"_set_triton_availability", set_triton_availability, METH_VARARGS,
     "(available, interpret): whether the Triton backend runs, and on CPU tensors."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  PyObject* module = PyModule_Create(&module_def);
#ifdef DIFFKERNELS_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (module != nullptr && PyModule_AddIntConstant(module, "WITH_CUDA", with_cuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
