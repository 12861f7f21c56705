// The one place op schemas are declared (TORCH_LIBRARY). Backends register kernels with
// TORCH_LIBRARY_IMPL in their own files; fake (meta) and autograd live in python/dlmkern/ops/.
#include <torch/library.h>

TORCH_LIBRARY(dlmkern, m) {
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
}
