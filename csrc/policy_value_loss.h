// Device-agnostic driver of the fused policy-value loss; backends supply the two kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "device_errors.h"
#include "policy_value_loss_args.h"

namespace dlmkern {

struct PvKernels {
  void (*forward)(PvForwardArgs& a);
  void (*backward)(PvBackwardArgs& a);
  // How seq_ids values are checked (device_errors.h): on the host, or on the device.
  ValueCheck (*value_check)(const at::Tensor& like);
};

// Returns (loss [], stats [kNumPvOutStats], u_logp, u_values, seq_scale).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_value_loss_forward(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
    const at::Tensor& mask, const std::optional<at::Tensor>& ref_logp,
    const std::optional<at::Tensor>& values, const std::optional<at::Tensor>& old_values,
    const std::optional<at::Tensor>& returns, const std::optional<at::Tensor>& seq_ids,
    const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& log_ratio,
    double eps_low, double eps_high, std::optional<double> dual_clip, double kl_coef,
    double vf_coef, double vf_clip, int64_t reduction, int64_t num_seqs, double normalizer,
    int64_t kl_kind, bool has_ratio, const PvKernels& k);

// Returns (grad_logp, grad_values) in fp32 with the shape of u_logp (grad_values empty when
// there were no values).
std::tuple<at::Tensor, at::Tensor> policy_value_loss_backward(
    const at::Tensor& grad_loss, const at::Tensor& u_logp, const at::Tensor& u_values,
    const std::optional<at::Tensor>& seq_ids, const at::Tensor& seq_scale, int64_t reduction,
    const PvKernels& k);

// The op's kernels for one backend: TORCH_LIBRARY_IMPL registers &PvOps<kTable>::forward etc.
template <const PvKernels& K>
struct PvOps {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
      const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
      const at::Tensor& mask, const std::optional<at::Tensor>& ref_logp,
      const std::optional<at::Tensor>& values, const std::optional<at::Tensor>& old_values,
      const std::optional<at::Tensor>& returns, const std::optional<at::Tensor>& seq_ids,
      const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& log_ratio,
      double eps_low, double eps_high, std::optional<double> dual_clip, double kl_coef,
      double vf_coef, double vf_clip, int64_t reduction, int64_t num_seqs, double normalizer,
      int64_t kl_kind, bool has_ratio) {
    return policy_value_loss_forward(logp, old_logp, advantages, mask, ref_logp, values,
                                     old_values, returns, seq_ids, weights, log_ratio, eps_low,
                                     eps_high, dual_clip, kl_coef, vf_coef, vf_clip, reduction,
                                     num_seqs, normalizer, kl_kind, has_ratio, K);
  }
  static std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_loss,
                                                     const at::Tensor& u_logp,
                                                     const at::Tensor& u_values,
                                                     const std::optional<at::Tensor>& seq_ids,
                                                     const at::Tensor& seq_scale,
                                                     int64_t reduction) {
    return policy_value_loss_backward(grad_loss, u_logp, u_values, seq_ids, seq_scale, reduction,
                                      K);
  }
};

}  // namespace dlmkern
