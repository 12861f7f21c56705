// Device-agnostic drivers for the log-prob ops. The chunk loop and the GEMMs (at::mm, which goes
// to MKL / cuBLAS) live here once; each backend supplies two row kernels that stream a chunk of
// logits through the shared online log-sum-exp math (dlmkern/online_lse.h).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "device_errors.h"

namespace dlmkern {

struct RowKernels {
  // state: [r, 4] fp32 rows (m, s, t, z_target), updated in place with the columns
  // [col0, col0 + chunk.size(1)) of chunk [r, vc] (row stride chunk.stride(0), unit column stride).
  void (*update)(const at::Tensor& chunk, const at::Tensor& targets, int64_t col0, double inv_temp,
                 at::Tensor& state);
  // out[r, vc] = inv_temp * d(g_logp * logp + g_ent * entropy) / dz for the chunk's columns.
  void (*grad)(const at::Tensor& chunk, const at::Tensor& targets, int64_t col0, double inv_temp,
               const at::Tensor& lse, const at::Tensor& mean_z, const at::Tensor& g_logp,
               const at::Tensor& g_ent, at::Tensor& out);
  // How targets / rows values are checked (device_errors.h): on the host, or on the device.
  ValueCheck (*value_check)(const at::Tensor& like);
  // Chunk sizes of the masked_logprobs drivers (rows x vocabulary).
  int64_t row_chunk;
  int64_t vocab_chunk;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_logprobs_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const std::optional<at::Tensor>& rows, double temperature, int64_t ignore_index,
    const RowKernels& k);

std::tuple<at::Tensor, at::Tensor> masked_logprobs_backward(
    const std::optional<at::Tensor>& grad_logp, const std::optional<at::Tensor>& grad_entropy,
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const std::optional<at::Tensor>& rows, const at::Tensor& lse, const at::Tensor& entropy,
    double temperature, int64_t ignore_index, std::array<bool, 2> output_mask,
    const RowKernels& k);

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_from_logits_forward(
    const at::Tensor& logits, const at::Tensor& targets, double temperature, int64_t ignore_index,
    const RowKernels& k);

at::Tensor logprobs_from_logits_backward(
    const std::optional<at::Tensor>& grad_logp, const std::optional<at::Tensor>& grad_entropy,
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
    const at::Tensor& entropy, double temperature, int64_t ignore_index, const RowKernels& k);

// The ops' kernels for one backend: TORCH_LIBRARY_IMPL registers &LogprobOps<kTable>::... .
template <const RowKernels& K>
struct LogprobOps {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> masked(
      const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
      const std::optional<at::Tensor>& rows, double temperature, int64_t ignore_index) {
    return masked_logprobs_forward(hidden, weight, targets, rows, temperature, ignore_index, K);
  }
  static std::tuple<at::Tensor, at::Tensor> masked_backward(
      const std::optional<at::Tensor>& grad_logp, const std::optional<at::Tensor>& grad_entropy,
      const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
      const std::optional<at::Tensor>& rows, const at::Tensor& lse, const at::Tensor& entropy,
      double temperature, int64_t ignore_index, std::array<bool, 2> output_mask) {
    return masked_logprobs_backward(grad_logp, grad_entropy, hidden, weight, targets, rows, lse,
                                    entropy, temperature, ignore_index, output_mask, K);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> from_logits(
      const at::Tensor& logits, const at::Tensor& targets, double temperature,
      int64_t ignore_index) {
    return logprobs_from_logits_forward(logits, targets, temperature, ignore_index, K);
  }
  static at::Tensor from_logits_backward(
      const std::optional<at::Tensor>& grad_logp, const std::optional<at::Tensor>& grad_entropy,
      const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
      const at::Tensor& entropy, double temperature, int64_t ignore_index) {
    return logprobs_from_logits_backward(grad_logp, grad_entropy, logits, targets, lse, entropy,
                                         temperature, ignore_index, K);
  }
};

}  // namespace dlmkern
