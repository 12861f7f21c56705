// Bits of the device-side error flag (one int per device). On a GPU the ops never read argument
// values on the host (a device sync per call): the kernels and the drivers' device-side checks
// keep every access inside the tensors whatever cu_seqlens / stream / cache_seqlens / targets /
// rows / seq_ids hold (sequence bounds clamped to [0, T] and non-decreasing, cache lengths to
// [0, max_len], row indices to [0, N)), and OR one of these bits into the flag when a value was
// impossible. The host reads (and clears) the flag once, where the caller chooses:
// dlmkern.ops.check_device_errors(). The CPU kernels check on the host and raise at once.
#pragma once

namespace dlmkern {

enum ErrorBit : unsigned {
  kErrCuSeqlens = 1u,        // block_attention: cu_seqlens not 0 = c0 <= c1 <= ... <= cS = T
  kErrStream = 2u,           // block_attention: a negative stream id
  kErrCuSeqlensQ = 4u,       // decode_attention: cu_seqlens_q not 0 = c0 <= ... <= cS = T
  kErrCacheSeqlens = 8u,     // decode_attention: cache_seqlens outside [0, max_len]
  kErrCommitOverflow = 16u,  // decode_attention: a commit would overflow the cache (skipped)
  kErrTargets = 32u,         // log-prob ops: a target outside [0, V) and not ignore_index
  kErrRows = 64u,            // masked_logprobs: a `rows` index outside [0, N) (clamped)
  kErrSeqIds = 128u,         // policy_value_loss: an unmasked token's seq_id outside [0, num_seqs)
};

// The bits of out-of-range indices (raised as IndexError; the others as ValueError).
constexpr unsigned kIndexErrorBits = kErrTargets | kErrRows | kErrSeqIds;

}  // namespace dlmkern
