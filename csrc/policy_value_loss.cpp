// Driver of the fused policy-value loss (SPEC 2.4): validation, flattening, output allocation;
// the backends run one kernel forward (loss, stats and unscaled gradients) and one backward.
#include "policy_value_loss.h"

#include <c10/core/DeviceGuard.h>

#include <cmath>

#include "checks.h"
#include "device_errors.h"
#include "dlmkern/error_flag.h"

namespace dlmkern {
namespace {

constexpr const char* kOp = "dlmkern.policy_value_loss";

void check_token_tensor(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK_TYPE(is_float_type(t.scalar_type()), kOp, ": `", name,
                   "` must be float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == like.sizes(), kOp, ": `", name, "` must have the shape of `logp` ",
                    like.sizes(), ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == like.device(), kOp, ": `", name, "` must be on ", like.device(),
                    ", got ", t.device());
}

at::Tensor flat_f32(const at::Tensor& t) { return t.reshape({-1}).to(at::kFloat).contiguous(); }

const float* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<float>() : nullptr;
}

// Only unmasked tokens belong to a sequence; masked ones (padding) may carry any id. On the device
// path a bad id sets kErrSeqIds (the kernel leaves that token out of the sums and makes the loss
// NaN; it never indexes with it).
void check_seq_ids(const at::Tensor& sid, const at::Tensor& mask, int64_t num_seqs,
                   const ValueCheck& vc) {
  auto bad = (sid < 0).logical_or_(sid >= num_seqs).logical_and_(mask.reshape({-1}));
  if (!vc.on_host) return flag_if_any(vc.flag, bad, kErrSeqIds);
  if (read_item<bool>(bad.any())) {
    const int64_t i = read_item<int64_t>(bad.nonzero().select(1, 0)[0]);
    TORCH_CHECK_INDEX(false, kOp, ": `seq_ids` of unmasked tokens must lie in [0, ", num_seqs,
                      "), got seq_ids[", i, "] = ", read_item<int64_t>(sid[i]));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_value_loss_forward(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
    const at::Tensor& mask, const std::optional<at::Tensor>& ref_logp,
    const std::optional<at::Tensor>& values, const std::optional<at::Tensor>& old_values,
    const std::optional<at::Tensor>& returns, const std::optional<at::Tensor>& seq_ids,
    const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& log_ratio,
    double eps_low, double eps_high, std::optional<double> dual_clip, double kl_coef,
    double vf_coef, double vf_clip, int64_t reduction, int64_t num_seqs, double normalizer,
    int64_t kl_kind, bool has_ratio, const PvKernels& k) {
  const c10::DeviceGuard guard(logp.device());
  TORCH_CHECK_VALUE(logp.dim() == 1 || logp.dim() == 2, kOp,
                    ": token tensors must be [T] or [B, L], got `logp` of shape ", logp.sizes());
  check_token_tensor(logp, "logp", logp);
  check_token_tensor(old_logp, "old_logp", logp);
  check_token_tensor(advantages, "advantages", logp);
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, kOp, ": `mask` must be bool, got ",
                   mask.scalar_type());
  TORCH_CHECK_VALUE(mask.sizes() == logp.sizes() && mask.device() == logp.device(), kOp,
                    ": `mask` must have the shape and device of `logp`");
  const bool has_ref = ref_logp.has_value() && ref_logp->defined();
  const bool has_v = values.has_value() && values->defined();
  const bool has_r = returns.has_value() && returns->defined();
  const bool has_ov = old_values.has_value() && old_values->defined();
  TORCH_CHECK_VALUE(has_v == has_r, kOp, ": `values` and `returns` must be given together");
  TORCH_CHECK_VALUE(!has_ov || has_v, kOp, ": `old_values` needs `values` and `returns`");
  if (has_ref) check_token_tensor(*ref_logp, "ref_logp", logp);
  if (has_v) check_token_tensor(*values, "values", logp);
  if (has_r) check_token_tensor(*returns, "returns", logp);
  if (has_ov) check_token_tensor(*old_values, "old_values", logp);
  const bool has_w = weights.has_value() && weights->defined();
  const bool has_lr = log_ratio.has_value() && log_ratio->defined();
  if (has_w) check_token_tensor(*weights, "weights", logp);
  if (has_lr) check_token_tensor(*log_ratio, "log_ratio", logp);
  TORCH_CHECK_VALUE(kl_kind >= kKlK1 && kl_kind <= kKlQuadratic, kOp, ": unknown `kl_kind` code ",
                    kl_kind, " (0: k1, 1: k3, 2: quadratic)");
  TORCH_CHECK_VALUE(has_ratio || !dual_clip.has_value(), kOp,
                    ": `dual_clip` bounds a ratio's loss; `has_ratio` is false");
  TORCH_CHECK_VALUE(has_ratio || !has_lr, kOp, ": `log_ratio` given but `has_ratio` is false");
  TORCH_CHECK_VALUE(eps_low >= 0 && eps_high >= 0 && std::isfinite(eps_low) &&
                        std::isfinite(eps_high), kOp,
                    ": `eps_low` and `eps_high` must be finite and >= 0, got ", eps_low, ", ",
                    eps_high);
  TORCH_CHECK_VALUE(!dual_clip.has_value() || *dual_clip > 1.0, kOp,
                    ": `dual_clip` must be > 1 (or None), got ", dual_clip.value_or(0.0));
  TORCH_CHECK_VALUE(vf_clip >= 0, kOp, ": `vf_clip` must be >= 0, got ", vf_clip);
  TORCH_CHECK_VALUE(std::isfinite(kl_coef) && std::isfinite(vf_coef), kOp,
                    ": `kl_coef` and `vf_coef` must be finite");
  TORCH_CHECK_VALUE(reduction >= kTokenMean && reduction <= kSum, kOp,
                    ": unknown reduction code ", reduction);
  TORCH_CHECK_VALUE(reduction != kSum || (normalizer > 0 && std::isfinite(normalizer)), kOp,
                    ": `normalizer` must be a finite number > 0, got ", normalizer);

  const int64_t T = logp.numel();
  const int64_t row_len = logp.dim() == 2 ? logp.size(1) : std::max<int64_t>(T, 1);
  at::Tensor sid;
  if (seq_ids.has_value() && seq_ids->defined()) {
    TORCH_CHECK_TYPE(seq_ids->scalar_type() == at::kLong, kOp, ": `seq_ids` must be int64, got ",
                     seq_ids->scalar_type());
    TORCH_CHECK_VALUE(seq_ids->sizes() == logp.sizes() && seq_ids->device() == logp.device(), kOp,
                      ": `seq_ids` must have the shape and device of `logp`");
    sid = seq_ids->reshape({-1}).contiguous();
  }
  if (reduction == kSeqMean) {
    TORCH_CHECK_VALUE(sid.defined() || logp.dim() == 2, kOp,
                      ": reduction='seq_mean' on [T] tokens needs `seq_ids`");
    TORCH_CHECK_VALUE(num_seqs >= 1, kOp, ": `num_seqs` must be >= 1, got ", num_seqs);
    if (!sid.defined()) {
      TORCH_CHECK_VALUE(num_seqs == logp.size(0), kOp, ": `num_seqs` must equal B=",
                        logp.size(0), " for [B, L] tokens without `seq_ids`, got ", num_seqs);
    } else if (T > 0) {
      check_seq_ids(sid, mask, num_seqs, k.value_check(logp));
    }
  } else {
    num_seqs = 1;
  }

  auto lp = flat_f32(logp), olp = flat_f32(old_logp), adv = flat_f32(advantages);
  auto m = mask.reshape({-1}).contiguous();
  at::Tensor ref = has_ref ? flat_f32(*ref_logp) : at::Tensor();
  at::Tensor v = has_v ? flat_f32(*values) : at::Tensor();
  at::Tensor ov = has_ov ? flat_f32(*old_values) : at::Tensor();
  at::Tensor r = has_r ? flat_f32(*returns) : at::Tensor();
  at::Tensor w = has_w ? flat_f32(*weights) : at::Tensor();
  at::Tensor lr = has_lr ? flat_f32(*log_ratio) : at::Tensor();

  auto f32 = logp.options().dtype(at::kFloat);
  auto loss = at::empty({}, f32);
  auto stats = at::empty({kNumPvOutStats}, f32);
  auto u_logp = at::empty(logp.sizes(), f32);
  auto u_v = has_v ? at::empty(logp.sizes(), f32) : at::empty({0}, f32);
  auto seq_scale = at::empty({num_seqs}, f32);
  auto workspace = at::zeros({pv_workspace_floats(num_seqs)}, f32);

  PvForwardArgs a{};
  a.logp = lp.const_data_ptr<float>();
  a.old_logp = olp.const_data_ptr<float>();
  a.adv = adv.const_data_ptr<float>();
  a.ref_logp = ptr_or_null(ref);
  a.values = ptr_or_null(v);
  a.old_values = ptr_or_null(ov);
  a.returns = ptr_or_null(r);
  a.weights = ptr_or_null(w);
  a.log_ratio = ptr_or_null(lr);
  a.mask = m.const_data_ptr<bool>();
  a.seq_ids = sid.defined() ? sid.const_data_ptr<int64_t>() : nullptr;
  a.num_tokens = T;
  a.row_len = row_len;
  a.num_seqs = num_seqs;
  a.params = PvParams{static_cast<float>(eps_low), static_cast<float>(eps_high),
                      dual_clip.has_value() ? static_cast<float>(*dual_clip) : 0.f,
                      static_cast<float>(kl_coef), static_cast<float>(vf_coef),
                      static_cast<float>(vf_clip), has_ref, has_v, has_ov,
                      static_cast<int>(kl_kind), has_ratio};
  a.reduction = static_cast<int>(reduction);
  a.normalizer = static_cast<float>(normalizer);
  a.loss = loss.data_ptr<float>();
  a.stats = stats.data_ptr<float>();
  a.u_logp = u_logp.data_ptr<float>();
  a.u_values = has_v ? u_v.data_ptr<float>() : nullptr;
  a.seq_scale = seq_scale.data_ptr<float>();
  a.workspace = workspace.data_ptr<float>();
  k.forward(a);
  return {loss, stats, u_logp, u_v, seq_scale};
}

std::tuple<at::Tensor, at::Tensor> policy_value_loss_backward(
    const at::Tensor& grad_loss, const at::Tensor& u_logp, const at::Tensor& u_values,
    const std::optional<at::Tensor>& seq_ids, const at::Tensor& seq_scale, int64_t reduction,
    const PvKernels& k) {
  const c10::DeviceGuard guard(u_logp.device());
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, kOp, ": `grad_loss` must be a scalar");
  TORCH_CHECK_VALUE(u_logp.scalar_type() == at::kFloat && u_logp.is_contiguous(), kOp,
                    ": internal gradient buffers must be contiguous float32");
  const int64_t T = u_logp.numel();
  const bool has_v = u_values.numel() > 0;
  TORCH_CHECK_VALUE(!has_v || u_values.sizes() == u_logp.sizes(), kOp,
                    ": `u_values` must match `u_logp`");
  const bool per_seq = reduction == kSeqMean;
  at::Tensor sid;
  if (seq_ids.has_value() && seq_ids->defined()) sid = seq_ids->reshape({-1}).contiguous();
  auto g = grad_loss.reshape({}).to(at::kFloat).contiguous();
  auto grad_logp = at::empty(u_logp.sizes(), u_logp.options());
  auto grad_v = has_v ? at::empty(u_values.sizes(), u_values.options())
                      : at::empty({0}, u_logp.options());
  PvBackwardArgs a{};
  a.grad_loss = g.const_data_ptr<float>();
  a.u_logp = u_logp.const_data_ptr<float>();
  a.u_values = has_v ? u_values.const_data_ptr<float>() : nullptr;
  a.seq_ids = sid.defined() ? sid.const_data_ptr<int64_t>() : nullptr;
  a.num_tokens = T;
  a.row_len = u_logp.dim() == 2 ? u_logp.size(1) : std::max<int64_t>(T, 1);
  a.per_seq = per_seq;
  a.num_seqs = seq_scale.numel();
  a.seq_scale = seq_scale.const_data_ptr<float>();
  a.grad_logp = grad_logp.data_ptr<float>();
  a.grad_values = has_v ? grad_v.data_ptr<float>() : nullptr;
  k.backward(a);
  return {grad_logp, grad_v};
}

}  // namespace dlmkern
