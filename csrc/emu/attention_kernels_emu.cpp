// The CUDA kernels of csrc/cuda/attention_kernels.cu compiled as C++ for the CUDA emulator (tests only).
#include "cuda/attention_kernels.cu"
