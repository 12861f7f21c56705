// Chunked drivers for masked_logprobs / logprobs_from_logits (SPEC 2.3). The [N, V] logits are
// never materialized: the vocabulary is streamed in chunks of k.vocab_chunk columns and the rows
// in chunks of k.row_chunk, so the only logits buffer is [row_chunk, vocab_chunk] fp32.
#include "logprobs.h"

#include <c10/core/DeviceGuard.h>

#include <cmath>

#include <cstdlib>
#include <string>

#include "checks.h"
#include "device_errors.h"
#include "dlmkern/error_flag.h"

namespace dlmkern {
namespace {

constexpr const char* kOp = "dlmkern.masked_logprobs";
constexpr const char* kOpLogits = "dlmkern.logprobs_from_logits";

void check_temperature(const char* op, double temperature) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0, op,
                    ": `temperature` must be a finite number > 0, got ", temperature);
}

// Targets must lie in [0, V) or equal ignore_index. On the host path a bad one raises at once; on
// the device path it sets kErrTargets (the row kernels only compare targets with column ids, so an
// impossible one reads nothing out of bounds).
void check_targets(const char* op, const at::Tensor& targets, int64_t n, int64_t vocab,
                   int64_t ignore_index, const ValueCheck& vc) {
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong, op, ": `targets` must be int64, got ",
                   targets.scalar_type());
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == n, op,
                    ": `targets` must have shape [", n, "], got ", targets.sizes());
  if (n == 0) return;
  auto bad = (targets != ignore_index).logical_and_((targets < 0).logical_or_(targets >= vocab));
  if (!vc.on_host) return flag_if_any(vc.flag, bad, kErrTargets);
  if (read_item<bool>(bad.any())) {
    const int64_t i = read_item<int64_t>(bad.nonzero().select(1, 0)[0]);
    TORCH_CHECK_INDEX(false, op, ": `targets` must lie in [0, ", vocab,
                      ") or equal ignore_index=", ignore_index, "; targets[", i,
                      "] = ", read_item<int64_t>(targets[i]));
  }
}

// Returns int64 row indices (a bool mask is turned into the indices of its true entries: a host
// read, whatever the device). On the device path impossible indices are clamped into [0, N) for
// the gathers (an out-of-range index_select is a device-side assert) and set kErrRows.
at::Tensor row_indices(const at::Tensor& rows, int64_t n_total, const at::Tensor& like,
                       const ValueCheck& vc) {
  TORCH_CHECK_VALUE(rows.device() == like.device(), kOp, ": `rows` must be on ", like.device(),
                    ", got ", rows.device());
  TORCH_CHECK_VALUE(rows.dim() == 1, kOp, ": `rows` must be 1-D, got shape ", rows.sizes());
  if (rows.scalar_type() == at::kBool) {
    TORCH_CHECK_VALUE(rows.size(0) == n_total, kOp, ": bool `rows` must have shape [", n_total,
                      "], got ", rows.sizes());
    note_host_read();  // nonzero() sizes its output from the data
    return rows.nonzero().select(1, 0);
  }
  TORCH_CHECK_TYPE(rows.scalar_type() == at::kLong, kOp,
                   ": `rows` must be int64 indices or a bool mask, got ", rows.scalar_type());
  if (rows.numel() == 0) return rows;
  TORCH_CHECK_INDEX(n_total > 0, kOp, ": `rows` indices must lie in [0, 0): `hidden` has no rows");
  auto bad = (rows < 0).logical_or_(rows >= n_total);
  if (!vc.on_host) {
    flag_if_any(vc.flag, bad, kErrRows);
    return rows.clamp(0, n_total - 1);
  }
  TORCH_CHECK_INDEX(!read_item<bool>(bad.any()), kOp, ": `rows` indices must lie in [0, ",
                    n_total, "), got min ", read_item<int64_t>(rows.min()), " max ",
                    read_item<int64_t>(rows.max()));
  return rows;
}

void check_hidden_weight(const at::Tensor& hidden, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(hidden.dim() == 2, kOp, ": `hidden` must be 2-D [N, H], got shape ",
                    hidden.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, kOp, ": `weight` must be 2-D [V, H], got shape ",
                    weight.sizes());
  TORCH_CHECK_TYPE(is_float_type(hidden.scalar_type()), kOp,
                   ": `hidden` must be float32, float16 or bfloat16, got ", hidden.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == hidden.scalar_type(), kOp,
                   ": `weight` must have the dtype of `hidden` (", hidden.scalar_type(),
                   "), got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.size(1) == hidden.size(1), kOp, ": `weight` must be [V, ",
                    hidden.size(1), "] to match `hidden`'s hidden size, got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) > 0, kOp, ": `weight` must have at least one vocabulary row");
  TORCH_CHECK_VALUE(weight.device() == hidden.device(), kOp, ": `weight` must be on ",
                    hidden.device(), " like `hidden`, got ", weight.device());
}

// Dtype of the GEMM operands: the input dtype on CUDA (tensor cores, fp32 accumulation and fp32
// output), fp32 on CPU (reduced-precision GEMMs on CPU are slow and less accurate).
// The CUDA emulator (csrc/emu/) runs the CUDA path on CPU tensors: input-dtype operands there too.
at::ScalarType gemm_dtype(const at::Tensor& t) {
#ifdef DLMKERN_CUDA_EMU
  return t.scalar_type();
#else
  return t.is_cuda() ? t.scalar_type() : at::kFloat;
#endif
}

// out(fp32) = a @ b.t() with fp32 accumulation.
void gemm_nt(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat) {
    at::mm_out(out, a, b.t());
    return;
  }
#ifdef DLMKERN_CUDA_EMU
  // No half x half -> fp32 GEMM on CPU: upcast (exact products, fp32 sums, like tensor cores).
  at::mm_out(out, a.to(at::kFloat), b.t().to(at::kFloat));
#else
  at::mm_out(out, a, b.t(), at::kFloat);
#endif
}

// acc(fp32) += a @ b, with fp32 accumulation for half inputs.
void gemm_acc(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat) {
    acc.addmm_(a, b);
    return;
  }
#ifdef DLMKERN_CUDA_EMU
  acc.addmm_(a.to(at::kFloat), b.to(at::kFloat));
  return;
#endif
  // addmm.dtype_out accumulates in place with beta = 1. Should a torch build reject the aliasing,
  // fall back (once, for good) to a separate fp32 product.
  static bool in_place_ok = true;
  if (in_place_ok) {
    try {
      at::addmm_out(acc, acc, a, b, at::kFloat);
      return;
    } catch (const c10::Error&) {
      in_place_ok = false;
    }
  }
  acc.add_(at::mm(a, b, at::kFloat));
}

// A contiguous [rows, cols] view at the start of a flat scratch buffer (GEMM outputs and the
// row kernels then see a dense tile even for the last, partial chunk).
at::Tensor tile(const at::Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

at::Tensor init_state(int64_t n, const at::TensorOptions& opts) {
  auto state = at::zeros({n, 4}, opts.dtype(at::kFloat));
  state.select(1, 0).fill_(-INFINITY);
  return state;
}

// logp = z_target - lse, entropy = lse - E[z]; ignored rows give 0 for both. Both are formed
// relative to the max m, so large logits (|z| ~ 1e3, where an fp32 lse is only good to ~1e-4)
// keep their precision.
std::tuple<at::Tensor, at::Tensor, at::Tensor> finalize(const at::Tensor& state,
                                                        const at::Tensor& targets,
                                                        int64_t ignore_index) {
  auto m = state.select(1, 0), s = state.select(1, 1), t = state.select(1, 2);
  auto tz = state.select(1, 3);
  auto lse = m + s.log();
  auto valid = targets != ignore_index;
  auto zero = at::zeros({}, lse.options());
  auto log_s = s.log();
  auto logp = at::where(valid, (tz - m) - log_s, zero);
  auto entropy = at::where(valid, log_s - t / s, zero);  // t is relative to m (online_lse.h)
  return {logp, entropy, lse};
}

// Upstream gradients as fp32 with ignored rows zeroed (they get no gradient).
at::Tensor masked_grad(const std::optional<at::Tensor>& g, const at::Tensor& valid) {
  if (!g.has_value() || !g->defined()) return at::zeros(valid.sizes(), valid.options().dtype(at::kFloat));
  return at::where(valid, g->to(at::kFloat), at::zeros({}, valid.options().dtype(at::kFloat)));
}

// Targets for the gradient row kernels: -1 marks an ignored row (zero gradient, whatever its
// logits hold; ignore_index itself may be any value).
at::Tensor grad_targets(const at::Tensor& tgt, const at::Tensor& valid) {
  return at::where(valid, tgt, at::full({}, -1, tgt.options())).contiguous();
}

// Gradient tiles are stored in the GEMM dtype. In fp16 (largest 65504, smallest normal 6e-5) an
// RL upstream gradient of ~1 / num_tokens times p_j ~ 1 / V underflows to zero, so the upstream
// gradients are multiplied by a power of two s that puts the largest possible tile entry near
// 2^14, and the fp32 accumulators are divided by s at the end (exact for powers of two). The bound:
// p_j (z_j - E) = p_j log p_j + p_j H, so |d/dz_j| <= |g_logp| + |g_ent| (H + 1/e), times
// 1 / temperature. Computed on the device: no host sync. Applied in every dtype (a no-op
// numerically in fp32, where it keeps the CPU tests exercising the same path).
at::Tensor grad_tile_scale(const at::Tensor& g_lp, const at::Tensor& g_ent,
                           const at::Tensor& entropy, double inv_temp) {
  // Non-finite rows (NaN logits or upstream gradients) are left out of the bound: one NaN row
  // must not push the scale to 2^64 and overflow the other rows' fp16 tiles.
  auto ent = at::nan_to_num(entropy.abs(), 0.0, 0.0, 0.0);
  auto row = at::nan_to_num(g_lp.abs() + g_ent.abs() * (ent + 1.0), 0.0, 0.0, 0.0);
  auto bound = at::nan_to_num(row.amax() * inv_temp, 0.0, 0.0, 0.0);
  // bound = 0 (no gradient at all) gives log2(inf) = inf, clamped like any extreme.
  return at::exp2(at::floor(at::log2(16384.0 / bound)).clamp(-64.0, 64.0));
}

void check_saved(const char* op, const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n && t.scalar_type() == at::kFloat, op, ": `",
                    name, "` must be float32 [", n, "], got ", t.scalar_type(), " ", t.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_logprobs_forward(
    const at::Tensor& hidden_in, const at::Tensor& weight_in, const at::Tensor& targets,
    const std::optional<at::Tensor>& rows, double temperature, int64_t ignore_index,
    const RowKernels& k) {
  const c10::DeviceGuard guard(hidden_in.device());
  // The GEMMs write into scratch with out=, which autograd forbids on tensors requiring grad.
  const at::Tensor hidden = hidden_in.detach(), weight = weight_in.detach();
  check_hidden_weight(hidden, weight);
  check_temperature(kOp, temperature);
  TORCH_CHECK_VALUE(targets.device() == hidden.device(), kOp, ": `targets` must be on ",
                    hidden.device(), ", got ", targets.device());
  const int64_t N = hidden.size(0), V = weight.size(0);
  const ValueCheck vc = k.value_check(hidden);
  check_targets(kOp, targets, N, V, ignore_index, vc);

  at::Tensor h = hidden, tgt = targets;
  if (rows.has_value() && rows->defined()) {
    auto idx = row_indices(*rows, N, hidden, vc);
    h = hidden.index_select(0, idx);
    tgt = targets.index_select(0, idx);
  }
  const int64_t n = h.size(0);
  const auto cdt = gemm_dtype(hidden);
  h = h.to(cdt).contiguous();
  tgt = tgt.contiguous();
  auto state = init_state(n, hidden.options());
  if (n > 0) {
    const int64_t rc = std::min(k.row_chunk, n), vc = std::min(k.vocab_chunk, V);
    auto logits = at::empty({rc * vc}, hidden.options().dtype(at::kFloat));
    const double inv_temp = 1.0 / temperature;
    for (int64_t v0 = 0; v0 < V; v0 += vc) {
      const int64_t vn = std::min(vc, V - v0);
      auto w = weight.narrow(0, v0, vn).to(cdt).contiguous();
      for (int64_t r0 = 0; r0 < n; r0 += rc) {
        const int64_t rn = std::min(rc, n - r0);
        auto buf = tile(logits, rn, vn);
        gemm_nt(buf, h.narrow(0, r0, rn), w);
        auto st = state.narrow(0, r0, rn);
        k.update(buf, tgt.narrow(0, r0, rn), v0, inv_temp, st);
      }
    }
  }
  return finalize(state, tgt, ignore_index);
}

std::tuple<at::Tensor, at::Tensor> masked_logprobs_backward(
    const std::optional<at::Tensor>& grad_logp, const std::optional<at::Tensor>& grad_entropy,
    const at::Tensor& hidden_in, const at::Tensor& weight_in, const at::Tensor& targets,
    const std::optional<at::Tensor>& rows, const at::Tensor& lse, const at::Tensor& entropy,
    double temperature, int64_t ignore_index, std::array<bool, 2> output_mask,
    const RowKernels& k) {
  const c10::DeviceGuard guard(hidden_in.device());
  const at::Tensor hidden = hidden_in.detach(), weight = weight_in.detach();
  check_hidden_weight(hidden, weight);
  check_temperature(kOp, temperature);
  const int64_t N = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  const ValueCheck vc = k.value_check(hidden);
  check_targets(kOp, targets, N, V, ignore_index, vc);

  at::Tensor h = hidden, tgt = targets, idx;
  if (rows.has_value() && rows->defined()) {
    idx = row_indices(*rows, N, hidden, vc);
    h = hidden.index_select(0, idx);
    tgt = targets.index_select(0, idx);
  }
  const int64_t n = h.size(0);
  check_saved(kOp, lse, "lse", n);
  check_saved(kOp, entropy, "entropy", n);
  const auto cdt = gemm_dtype(hidden);
  h = h.to(cdt).contiguous();
  tgt = tgt.contiguous();
  auto valid = tgt != ignore_index;
  auto tgt_g = grad_targets(tgt, valid);
  auto g_lp = masked_grad(grad_logp, valid).contiguous();
  auto g_ent = masked_grad(grad_entropy, valid).contiguous();
  auto mean_z = (lse - entropy).contiguous();
  auto lse_c = lse.contiguous();

  const bool want_h = output_mask[0], want_w = output_mask[1];
  auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor dh = want_h ? at::zeros({n, H}, f32) : at::Tensor();
  at::Tensor dw = want_w ? at::zeros({V, H}, weight.options()) : at::Tensor();
  if (n > 0 && (want_h || want_w)) {
    const int64_t rc = std::min(k.row_chunk, n), vc = std::min(k.vocab_chunk, V);
    auto logits = at::empty({rc * vc}, f32);
    auto gbuf = at::empty({rc * vc}, hidden.options().dtype(cdt));
    at::Tensor dw_acc = want_w ? at::empty({vc, H}, f32) : at::Tensor();
    const double inv_temp = 1.0 / temperature;
    const auto scale = grad_tile_scale(g_lp, g_ent, entropy, inv_temp);
    g_lp = g_lp * scale;
    g_ent = g_ent * scale;
    for (int64_t v0 = 0; v0 < V; v0 += vc) {
      const int64_t vn = std::min(vc, V - v0);
      auto w = weight.narrow(0, v0, vn).to(cdt).contiguous();
      at::Tensor dwc;
      if (want_w) {
        dwc = dw_acc.narrow(0, 0, vn);
        dwc.zero_();
      }
      for (int64_t r0 = 0; r0 < n; r0 += rc) {
        const int64_t rn = std::min(rc, n - r0);
        auto buf = tile(logits, rn, vn);
        auto hr = h.narrow(0, r0, rn);
        gemm_nt(buf, hr, w);
        auto g = tile(gbuf, rn, vn);
        k.grad(buf, tgt_g.narrow(0, r0, rn), v0, inv_temp, lse_c.narrow(0, r0, rn),
               mean_z.narrow(0, r0, rn), g_lp.narrow(0, r0, rn), g_ent.narrow(0, r0, rn), g);
        if (want_h) {
          auto dhr = dh.narrow(0, r0, rn);
          gemm_acc(dhr, g, w);
        }
        if (want_w) gemm_acc(dwc, g.t(), hr);
      }
      if (want_w) dw.narrow(0, v0, vn).copy_(dwc.div_(scale));
    }
    if (want_h) dh.div_(scale);
  }
  at::Tensor d_hidden;
  if (want_h) {
    if (idx.defined()) {
      d_hidden = at::zeros({N, H}, hidden.options());
      d_hidden.index_add_(0, idx, dh.to(hidden.scalar_type()));
    } else {
      d_hidden = dh.to(hidden.scalar_type());
    }
  } else {
    d_hidden = at::empty({0}, hidden.options());
  }
  if (!want_w) dw = at::empty({0}, weight.options());
  return {d_hidden, dw};
}

namespace {
void check_logits(const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK_VALUE(logits.dim() == 2, kOpLogits, ": `logits` must be 2-D [N, V], got shape ",
                    logits.sizes());
  TORCH_CHECK_TYPE(is_float_type(logits.scalar_type()), kOpLogits,
                   ": `logits` must be float32, float16 or bfloat16, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(logits.size(1) > 0, kOpLogits, ": `logits` must have at least one column");
  TORCH_CHECK_VALUE(targets.device() == logits.device(), kOpLogits, ": `targets` must be on ",
                    logits.device(), ", got ", targets.device());
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_from_logits_forward(
    const at::Tensor& logits, const at::Tensor& targets, double temperature, int64_t ignore_index,
    const RowKernels& k) {
  const c10::DeviceGuard guard(logits.device());
  check_logits(logits, targets);
  check_temperature(kOpLogits, temperature);
  const int64_t N = logits.size(0), V = logits.size(1);
  check_targets(kOpLogits, targets, N, V, ignore_index, k.value_check(logits));
  auto x = logits.stride(1) == 1 ? logits : logits.contiguous();
  auto tgt = targets.contiguous();
  auto state = init_state(N, logits.options());
  if (N > 0) k.update(x, tgt, 0, 1.0 / temperature, state);
  return finalize(state, tgt, ignore_index);
}

at::Tensor logprobs_from_logits_backward(
    const std::optional<at::Tensor>& grad_logp, const std::optional<at::Tensor>& grad_entropy,
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
    const at::Tensor& entropy, double temperature, int64_t ignore_index, const RowKernels& k) {
  const c10::DeviceGuard guard(logits.device());
  check_logits(logits, targets);
  check_temperature(kOpLogits, temperature);
  const int64_t N = logits.size(0), V = logits.size(1);
  check_targets(kOpLogits, targets, N, V, ignore_index, k.value_check(logits));
  check_saved(kOpLogits, lse, "lse", N);
  check_saved(kOpLogits, entropy, "entropy", N);
  auto x = logits.stride(1) == 1 ? logits : logits.contiguous();
  auto tgt = targets.contiguous();
  auto valid = tgt != ignore_index;
  auto out = at::empty({N, V}, logits.options());
  if (N > 0) {
    k.grad(x, grad_targets(tgt, valid), 0, 1.0 / temperature, lse.contiguous(), (lse - entropy).contiguous(),
           masked_grad(grad_logp, valid).contiguous(), masked_grad(grad_entropy, valid).contiguous(),
           out);
  }
  return out;
}

}  // namespace dlmkern
