// Raw-pointer launchers of the CUDA attention kernels (no torch types). See attention_kernels.cu.
#pragma once

#include <cstdint>

#include "dlmkern/block_mask.h"
#include "dlmkern/common.h"

namespace dlmkern::cuda {

constexpr int kAttnTile = 64;  // queries / keys per tile

// Tiles are numbered per sequence s from slot cu[s] / 64 + s on (no prefix sum, no host sync):
// this bound on the number of slots always holds.
inline int64_t attn_num_slots(int64_t T, int64_t S) { return T / kAttnTile + S + 1; }

struct TileTable {
  int32_t* cu;         // [S + 1] the sequence bounds the kernels use: cu_seqlens made
                       // non-decreasing (running max) and clamped to [0, T]
  int32_t* slot_seq;   // [slots] sequence of the slot, -1 if unused
  int32_t* slot_tile;  // [slots] tile index inside the sequence
  TileMeta* meta;      // [slots]
  int64_t num_slots;
};

struct AttnArgs {
  DType dtype;
  const void *q, *k, *v;           // [T, Hq, D], [T, Hkv, D] contiguous
  const int32_t *cu_seqlens, *block, *stream;
  int64_t T;
  int num_seqs, Hq, Hkv, D;
  float scale;
  bool full;
  TileTable tiles;
  unsigned* error_flag;  // dlmkern/error_flag.h bits; may be null
  void* stream_ptr;  // cudaStream_t
};

// Fills the tile table (slot_seq must be preset to -1 by the caller), clamping cu_seqlens into
// tiles.cu and flagging impossible values (dlmkern/error_flag.h). Returns a cudaError_t.
int launch_tile_table(const AttnArgs& a);

// out [T, Hq, D] (dtype), lse [Hq, T] fp32.
int launch_block_attention_fwd(const AttnArgs& a, void* out, float* lse);

// dq_accum [T, Hq, D] fp32 (zeroed by the caller), dk / dv [T, Hkv, D] (dtype), from grad_out,
// lse [Hq, T] and delta [Hq, T] = rowsum(grad_out * out).
int launch_block_attention_bwd(const AttnArgs& a, const void* grad_out, const float* lse,
                               const float* delta, float* dq_accum, void* dk, void* dv);

// Cache max_len / kv splits the decode kernel uses (host side, no sync).
int decode_num_splits(int64_t max_len);

struct DecodeArgs {
  DType dtype;
  const void *q, *k_new, *v_new;  // [T, Hq, D], [T, Hkv, D]
  void *k_cache, *v_cache;        // [S, max_len, Hkv, D]
  int32_t* cache_seqlens;         // [S]
  const int32_t* cu_seqlens_q;    // [S + 1]
  int64_t T, max_len;
  int num_seqs, Hq, Hkv, D;
  float scale;
  bool commit;
  float* workspace;  // decode_workspace_floats(...)
  void* out;
  unsigned* error_flag;  // dlmkern/error_flag.h bits; may be null
  void* stream_ptr;
};

int64_t decode_workspace_floats(int64_t T, int Hq, int D, int splits);
int launch_decode_attention(const DecodeArgs& a);

}  // namespace dlmkern::cuda
