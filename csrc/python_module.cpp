// The Python extension module kdops._C. Importing it loads the CPU kernels, which register
// themselves on the kdops ops (TORCH_LIBRARY_IMPL in cpu/kd_loss.cpp); the module itself only
// reports which CPU capability they run with.
#include <Python.h>

#include "cpu/kd_loss.h"

namespace {

PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(kdops::cpu::capability());
}

PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The CPU capability (DEFAULT, AVX2, AVX512) of the loss kernels in use."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "kdops native kernels", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module); }
