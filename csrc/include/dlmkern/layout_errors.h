// Bits of the device-side layout error flag (one int per device). The CUDA attention kernels never
// read or write outside their tensors whatever cu_seqlens / stream / cache_seqlens hold: they clamp
// sequence bounds to [0, T] (non-decreasing) and cache lengths to [0, max_len], and OR one of these
// bits into the flag when a value was impossible. The host reads (and clears) the flag where it
// synchronizes anyway: the next call that runs its host-side value checks, or
// dlmkern.ops.check_layout_errors(). The CPU kernels raise at once instead (no sync to save).
#pragma once

namespace dlmkern {

enum LayoutError : unsigned {
  kErrCuSeqlens = 1u,      // block_attention: cu_seqlens not 0 = c0 <= c1 <= ... <= cS = T
  kErrStream = 2u,         // block_attention: a negative stream id
  kErrCuSeqlensQ = 4u,     // decode_attention: cu_seqlens_q not 0 = c0 <= ... <= cS = T
  kErrCacheSeqlens = 8u,   // decode_attention: cache_seqlens outside [0, max_len]
  kErrCommitOverflow = 16u,  // decode_attention: a commit would overflow the cache (skipped)
};

}  // namespace dlmkern
