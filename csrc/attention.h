// Shared pieces of the attention ops: input validation and the per-sequence tile metadata used
// to skip (query tile, key tile) pairs with no visible pair.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "dlmkern/block_mask.h"

namespace dlmkern {

struct AttnDims {
  int64_t T, Hq, Hkv, D, S;  // tokens, query heads, kv heads, head dim, sequences
  double scale;
  bool values_checked = false;  // whether the host-side value checks ran in this call
};

// Validates q/k/v/cu_seqlens/block/stream of block_attention and returns the sizes. check_values:
// also read cu_seqlens / stream on the host (CPU backend; the CUDA glue passes false: its kernels
// check the values on the device into the error flag, device_errors.h).
AttnDims check_block_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& cu_seqlens, const at::Tensor& block,
                               const at::Tensor& stream, std::optional<double> scale,
                               bool check_values);

// Validates a layout's cu_seqlens / stream values once and remembers these exact CPU tensors:
// while unmodified they skip check_block_attention's per-call value checks. Tensors off the CPU
// are not read (their kernels check on the device).
void trust_layout(const at::Tensor& cu_seqlens, const at::Tensor& stream);

// How many block_attention calls ran the host-side value checks (for tests).
int64_t attention_value_checks();

// The host-side value checks of a layout (cu_seqlens from 0 to T, non-decreasing; stream >= 0).
// The CPU kernels read these values on the host anyway, so they run this on every call that
// skipped check_block_attention's checks (a trusted layout): a value changed behind the version
// counter (a write through `.data` or a numpy view) then raises here instead of reading out of
// bounds.
void check_layout_values(const char* op, const at::Tensor& cu_seqlens, const at::Tensor& stream,
                         int64_t T);

// Validates the decode_attention arguments and returns the sizes (S = number of sequences).
AttnDims check_decode_attention(const at::Tensor& q, const at::Tensor& k_new,
                                const at::Tensor& v_new, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                const at::Tensor& cu_seqlens_q, bool commit,
                                std::optional<double> scale, bool check_values);

// Tiles of `tile` consecutive tokens of one sequence [start, start + len).
struct SeqTiles {
  int64_t start = 0, len = 0;
  std::vector<TileMeta> tiles;
};

// Tile metadata of every sequence (block / stream read on the host; null pointers = full
// attention, every token clean in block 0).
std::vector<SeqTiles> make_seq_tiles(const int32_t* cu, int64_t num_seqs, const int32_t* block,
                                     const int32_t* stream, int64_t tile);

}  // namespace dlmkern
