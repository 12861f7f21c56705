// The Python extension module `dlmkern._C`. Importing it loads the shared library, whose static
// initializers register the ops (TORCH_LIBRARY / TORCH_LIBRARY_IMPL); it exports nothing else.
#include <Python.h>

static PyModuleDef dlmkern_module = {PyModuleDef_HEAD_INIT, "_C",
                                     "dlmkern's C++/CUDA kernels (registered as torch.ops.dlmkern)",
                                     -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&dlmkern_module); }
