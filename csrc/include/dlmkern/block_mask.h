// The block-diffusion visibility rule (SPEC 2.1), shared by the CPU and CUDA attention kernels.
//
// Every token carries `block` (absolute block index: position // block_size, positions counted
// from the start of the sequence including the prompt) and `stream` (0 = clean copy, r >= 1 =
// noisy copy r). Within one sequence, query q may attend key k iff
//   stream[q] == 0:       stream[k] == 0 and block[k] <= block[q]
//   stream[q] == r >= 1: (stream[k] == 0 and block[k] < block[q]) or
//                        (stream[k] == r and block[k] == block[q])
// `full` attention (LLaDA / Dream) ignores both and lets every query see its whole sequence.
#pragma once

#include <cstdint>

#include "dlmkern/common.h"

namespace dlmkern {

DLMKERN_HD bool block_visible(int32_t q_block, int32_t q_stream, int32_t k_block,
                              int32_t k_stream) {
  if (k_stream == 0) return q_stream == 0 ? k_block <= q_block : k_block < q_block;
  return k_stream == q_stream && k_block == q_block;
}

// Summary of a tile of consecutive tokens, enough to decide conservatively whether a (query
// tile, key tile) pair has no visible pair (skip it), only visible pairs (no per-element test),
// or some of each.
struct TileMeta {
  int32_t clean_min, clean_max;  // block range of the tile's clean tokens (min > max: none)
  int32_t noisy_min, noisy_max;  // block range of its noisy tokens (min > max: none)
  int32_t stream_min, stream_max;  // range of its noisy stream ids
};

DLMKERN_HD TileMeta tile_meta_empty() {
  return TileMeta{INT32_MAX, INT32_MIN, INT32_MAX, INT32_MIN, INT32_MAX, INT32_MIN};
}

DLMKERN_HD void tile_meta_add(TileMeta& m, int32_t block, int32_t stream) {
  if (stream == 0) {
    m.clean_min = block < m.clean_min ? block : m.clean_min;
    m.clean_max = block > m.clean_max ? block : m.clean_max;
  } else {
    m.noisy_min = block < m.noisy_min ? block : m.noisy_min;
    m.noisy_max = block > m.noisy_max ? block : m.noisy_max;
    m.stream_min = stream < m.stream_min ? stream : m.stream_min;
    m.stream_max = stream > m.stream_max ? stream : m.stream_max;
  }
}

enum TileVisibility : int { kTileNone = 0, kTilePartial = 1, kTileFull = 2 };

DLMKERN_HD int tile_visibility(const TileMeta& q, const TileMeta& k) {
  const bool q_clean = q.clean_min <= q.clean_max, q_noisy = q.noisy_min <= q.noisy_max;
  const bool k_clean = k.clean_min <= k.clean_max, k_noisy = k.noisy_min <= k.noisy_max;
  // Could any pair be visible?
  bool any = false;
  if (k_clean) {
    any = (q_clean && k.clean_min <= q.clean_max) || (q_noisy && k.clean_min < q.noisy_max);
  }
  if (!any && k_noisy && q_noisy) {
    any = k.noisy_min <= q.noisy_max && q.noisy_min <= k.noisy_max &&
          k.stream_min <= q.stream_max && q.stream_min <= k.stream_max;
  }
  if (!any) return kTileNone;
  // Is every pair visible?
  if (k_noisy) {
    const bool single = !k_clean && !q_clean && k.stream_min == k.stream_max &&
                        q.stream_min == q.stream_max && k.stream_min == q.stream_min &&
                        k.noisy_min == k.noisy_max && q.noisy_min == q.noisy_max &&
                        k.noisy_min == q.noisy_min;
    return single ? kTileFull : kTilePartial;
  }
  const bool clean_ok = !q_clean || k.clean_max <= q.clean_min;
  const bool noisy_ok = !q_noisy || k.clean_max < q.noisy_min;
  return clean_ok && noisy_ok ? kTileFull : kTilePartial;
}

}  // namespace dlmkern
