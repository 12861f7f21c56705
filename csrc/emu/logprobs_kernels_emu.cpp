// The CUDA kernels of csrc/cuda/logprobs_kernels.cu compiled as C++ for the CUDA emulator (tests only).
#include "cuda/logprobs_kernels.cu"
