// The CUDA kernels of csrc/cuda/policy_value_loss_kernels.cu compiled as C++ for the CUDA emulator (tests only).
#include "cuda/policy_value_loss_kernels.cu"
