// The Python extension module `dlmkern._C_emu` (tests only): the CUDA glue and kernels of
// csrc/cuda/ compiled as C++ against the CUDA emulator, registered as torch.ops.dlmkern_emu.* for
// CPU tensors. See csrc/emu/README.md.
#include <Python.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "dlmkern_emu/runtime_api.h"

namespace dlmkern_emu {
void set_capturing(bool on);
void set_schedule(int schedule, uint64_t seed);
int run_selftest(const std::string& name, float* out);
}  // namespace dlmkern_emu

namespace {

// capturing: make cudaStreamIsCapturing report an active capture (the glue takes its graph-capture
// path). schedule: 0 forward, 1 reverse, 2 random order of the threads
// between barriers (seeded).
void emu_config(bool capturing, int64_t schedule, int64_t seed) {
  TORCH_CHECK_VALUE(schedule >= 0 && schedule <= 2, "dlmkern_emu: schedule must be 0, 1 or 2");
  dlmkern_emu::set_capturing(capturing);
  dlmkern_emu::set_schedule(static_cast<int>(schedule), static_cast<uint64_t>(seed));
}

// Runs one of the deliberately broken kernels of selftest_kernels.cpp; returns its 64 outputs or
// raises the emulator's report.
at::Tensor emu_selftest(const std::string& name) {
  auto out = at::zeros({64}, at::kFloat);
  const int err = dlmkern_emu::run_selftest(name, out.data_ptr<float>());
  TORCH_CHECK(err == 0, "dlmkern_emu selftest ", name, ": ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dlmkern_emu, m) {
  m.def("_emu_config(bool capturing, int schedule, int seed) -> ()", &emu_config);
  m.def("_emu_selftest(str name) -> Tensor", &emu_selftest);
}

static PyModuleDef dlmkern_emu_module = {
    PyModuleDef_HEAD_INIT, "_C_emu",
    "dlmkern's CUDA kernels on the CPU CUDA emulator (tests only; torch.ops.dlmkern_emu)", -1,
    nullptr};

PyMODINIT_FUNC PyInit__C_emu(void) { return PyModule_Create(&dlmkern_emu_module); }
