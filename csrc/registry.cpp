// The one place op schemas are declared (TORCH_LIBRARY). Backends register kernels with
// TORCH_LIBRARY_IMPL in their own files; fake (meta) and autograd live in python/dlmkern/ops/.
#include "attention.h"
#include "library.h"

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
  // reduction: 0 token_mean, 1 seq_mean, 2 sum.
  m.def(
      "policy_value_loss(Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, "
      "Tensor? ref_logp, Tensor? values, Tensor? old_values, Tensor? returns, Tensor? seq_ids, "
      "float eps_low, float eps_high, float? dual_clip, float kl_coef, float vf_coef, "
      "float vf_clip, int reduction, int num_seqs, float normalizer) "
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
  // Reads and clears the device-side layout error flag of a device (dlmkern/layout_errors.h).
  m.def("_layout_errors(Device device) -> int", &dlmkern::take_layout_errors);
  m.def("_check_layout_errors(Device device) -> ()", [](c10::Device device) {
    dlmkern::raise_layout_errors("dlmkern.check_layout_errors", device);
  });
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
