// The one place op schemas are declared (TORCH_LIBRARY). Backends register kernels with
// TORCH_LIBRARY_IMPL in their own files; fake (meta) and autograd live in python/dlmkern/ops/.
// Also the process-wide state every op shares (device_errors.h): this file is in every build.
#include <atomic>
#include <mutex>
#include <string>
#include <unordered_map>

#include "attention.h"
#include "device_errors.h"
#include "dlmkern/error_flag.h"
#include "library.h"

namespace dlmkern {
namespace {

std::atomic<int64_t> g_host_reads{0};
std::mutex g_flag_mutex;
std::unordered_map<std::string, at::Tensor> g_error_flags;  // by device

at::Tensor find_flag(const std::string& key) {
  std::lock_guard<std::mutex> lock(g_flag_mutex);
  auto it = g_error_flags.find(key);
  return it == g_error_flags.end() ? at::Tensor() : it->second;
}

}  // namespace

void note_host_read() { ++g_host_reads; }
int64_t host_reads() { return g_host_reads.load(); }

at::Tensor device_error_flag(const at::Tensor& like, bool may_allocate) {
  std::lock_guard<std::mutex> lock(g_flag_mutex);
  const std::string key = like.device().str();
  auto it = g_error_flags.find(key);
  if (it != g_error_flags.end()) return it->second;
  if (!may_allocate) return at::Tensor();
  return g_error_flags.emplace(key, at::zeros({1}, like.options().dtype(at::kInt))).first->second;
}

void flag_if_any(const at::Tensor& flag, const at::Tensor& bad, unsigned bit) {
  if (!flag.defined() || bad.numel() == 0) return;
  flag.bitwise_or_(bad.any().to(at::kInt).mul_(static_cast<int64_t>(bit)));
}

int64_t take_device_errors(at::Device device) {
  at::Tensor flag = find_flag(device.str());
  if (!flag.defined()) return 0;
  const int64_t bits = read_item<int32_t>(flag);
  if (bits != 0) flag.zero_();
  return bits;
}

void raise_device_errors(const char* op, at::Device device) {
  const int64_t bits = take_device_errors(device);
  if (bits == 0) return;
  std::string what;
  auto add = [&](unsigned bit, const char* text) {
    if (bits & bit) what += std::string(what.empty() ? "" : "; ") + text;
  };
  add(kErrCuSeqlens, "block_attention: `cu_seqlens` was not 0 = c0 <= c1 <= ... <= cS = T");
  add(kErrStream, "block_attention: a `stream` id was negative");
  add(kErrCuSeqlensQ, "decode_attention: `cu_seqlens_q` was not 0 = c0 <= ... <= cS = T");
  add(kErrCacheSeqlens, "decode_attention: a `cache_seqlens` entry was outside [0, max_len]");
  add(kErrCommitOverflow, "decode_attention: `cache_seqlens` + the block length exceeded max_len "
      "(that sequence's commit was skipped)");
  add(kErrTargets, "masked_logprobs / logprobs_from_logits: a `targets` entry was outside [0, V) "
      "and not ignore_index");
  add(kErrRows, "masked_logprobs: a `rows` index was outside [0, N) (clamped)");
  add(kErrSeqIds, "policy_value_loss: an unmasked token's `seq_ids` entry was outside "
      "[0, num_seqs) (the loss was NaN)");
  const std::string msg = std::string(op) + ": an earlier call on " + device.str() +
                          " met impossible argument values, checked on the device (no host "
                          "sync per call): " + what + ". The kernels kept every access inside "
                          "the tensors, but those calls' outputs are not meaningful.";
  TORCH_CHECK_INDEX((bits & ~kIndexErrorBits) != 0, msg);
  TORCH_CHECK_VALUE(false, msg);
}

}  // namespace dlmkern

DLMKERN_LIBRARY(m) {
  // SPEC 2.3. Returns (logp, entropy, lse), each fp32 [n] for the selected rows.
  m.def(
      "masked_logprobs(Tensor hidden, Tensor weight, Tensor targets, Tensor? rows, "
      "float temperature, int ignore_index) -> (Tensor, Tensor, Tensor)");
  m.def(
      "masked_logprobs_backward(Tensor? grad_logp, Tensor? grad_entropy, Tensor hidden, "
      "Tensor weight, Tensor targets, Tensor? rows, Tensor lse, Tensor entropy, "
      "float temperature, int ignore_index, bool[2] output_mask) -> (Tensor, Tensor)");
  m.def(
      "logprobs_from_logits(Tensor logits, Tensor targets, float temperature, int ignore_index) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "logprobs_from_logits_backward(Tensor? grad_logp, Tensor? grad_entropy, Tensor logits, "
      "Tensor targets, Tensor lse, Tensor entropy, float temperature, int ignore_index) -> Tensor");
  // SPEC 2.4. Returns (loss, stats, u_logp, u_values, seq_scale): the loss, the statistics
  // vector, the per-token gradients before the reduction weight, and that weight.
  // reduction: 0 token_mean, 1 seq_mean, 2 sum; kl_kind: 0 k1, 1 k3, 2 quadratic. The objective's
  // per-token inputs: weights (multiply pg and kl), log_ratio (a sequence / block ratio's group
  // log-ratio; None: logp - old_logp); has_ratio false: pg = -A * logp.
  m.def(
      "policy_value_loss(Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, "
      "Tensor? ref_logp, Tensor? values, Tensor? old_values, Tensor? returns, Tensor? seq_ids, "
      "Tensor? weights, Tensor? log_ratio, float eps_low, float eps_high, float? dual_clip, "
      "float kl_coef, float vf_coef, float vf_clip, int reduction, int num_seqs, "
      "float normalizer, int kl_kind, bool has_ratio) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "policy_value_loss_backward(Tensor grad_loss, Tensor u_logp, Tensor u_values, "
      "Tensor? seq_ids, Tensor seq_scale, int reduction) -> (Tensor, Tensor)");
  // SPEC 2.1. out [T, Hq, D], lse [Hq, T] fp32 (natural log of the softmax normalizer of the
  // scaled scores). `full` ignores block / stream (bidirectional per sequence).
  m.def(
      "block_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, Tensor block, "
      "Tensor stream, bool full, float? scale) -> (Tensor, Tensor)");
  // A layout's cu_seqlens / stream validated once (host sync here) so block_attention can skip
  // its per-call value checks for these exact, unmodified tensors (dlmkern.ops.layouts calls it).
  m.def("_trust_layout(Tensor cu_seqlens, Tensor stream) -> ()", &dlmkern::trust_layout);
  m.def("_attention_value_checks() -> int", &dlmkern::attention_value_checks);
  // Reads and clears the device-side error flag of a device (dlmkern/error_flag.h): its bits,
  // or an exception naming the arguments at fault.
  m.def("_device_errors(Device device) -> int", &dlmkern::take_device_errors);
  m.def("_check_device_errors(Device device) -> ()", [](c10::Device device) {
    dlmkern::raise_device_errors("dlmkern.check_device_errors", device);
  });
  // Host reads of tensor values by the op drivers and glue so far (device_errors.h; for tests).
  m.def("_host_reads() -> int", &dlmkern::host_reads);
  m.def(
      "block_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor cu_seqlens, Tensor block, Tensor stream, bool full, float? scale) "
      "-> (Tensor, Tensor, Tensor)");
  // SPEC 2.2. With commit=True the block's k/v are appended to the caches and cache_seqlens
  // advances, in the same call.
  m.def(
      "decode_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, "
      "Tensor(b!) v_cache, Tensor(c!) cache_seqlens, Tensor cu_seqlens_q, bool commit, "
      "float? scale) -> Tensor");
}
