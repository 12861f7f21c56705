// CUDA kernels of block_attention (forward / backward, FlashAttention-2 style on mma.sync tensor
// cores, bf16 / fp16, D = 64 or 128) and decode_attention (split-KV over the cached prefix).
//
// Tiles of 64 tokens are summarized (dlmkern/block_mask.h TileMeta); a (query tile, key tile)
// pair with no visible pair is skipped, one whose pairs are all visible skips the per-element
// rule, so the work grows with the visible pairs and no T x T mask exists anywhere.
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4):
//   A (16x16, row major): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B (16x8, k x n):      b0 (k = 2t..2t+1, n = g), b1 (k = 2t+8.., n = g)
//   C (16x8, fp32):       c0 c1 (g, 2t..2t+1), c2 c3 (g+8, 2t..2t+1)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/attention_kernels.h"
#include "cuda/launch.h"
#include "dlmkern/block_mask.h"
#include "dlmkern/error_flag.h"
#include "dlmkern/softmax_nan.h"

namespace dlmkern::cuda {
namespace {

constexpr int kTile = kAttnTile;   // 64 queries x 64 keys
constexpr int kWarps = 4;          // 16 rows each
constexpr int kThreads = kWarps * 32;
constexpr int kPad = 8;            // smem row padding (halves): conflict-free fragment loads
constexpr float kNegInf = -__builtin_huge_valf();

__device__ __forceinline__ int64_t imin64(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float* c, const uint32_t* a, uint32_t b0,
                                             uint32_t b1) {
#ifdef DLMKERN_CUDA_EMU
    ::dlmkern_emu::mma_m16n8k16<__nv_bfloat16>(c, a, b0, b1, __LINE__);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};

template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float* c, const uint32_t* a, uint32_t b0,
                                             uint32_t b1) {
#ifdef DLMKERN_CUDA_EMU
    ::dlmkern_emu::mma_m16n8k16<__half>(c, a, b0, b1, __LINE__);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ __half from(float x) { return __float2half_rn(x); }
};

template <typename T>
__device__ __forceinline__ float to_f(T x);
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }

// Two consecutive 16-bit elements as one 32-bit word.
template <typename T>
__device__ __forceinline__ uint32_t ld32(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}
// Two 16-bit elements from two rows (column access of a row-major tile).
template <typename T>
__device__ __forceinline__ uint32_t ld_pair(const T* lo, const T* hi) {
  const uint16_t a = *reinterpret_cast<const uint16_t*>(lo);
  const uint16_t b = *reinterpret_cast<const uint16_t*>(hi);
  return static_cast<uint32_t>(a) | (static_cast<uint32_t>(b) << 16);
}

// Copies rows [row0, row0 + n) of a [*, H, D] tensor (head h) into a [64][D + kPad] smem tile,
// zero-filling rows n..63. 16-byte vector copies.
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t row0, int n, int H, int h) {
  constexpr int kVec = 8;  // halves per 16 bytes
  constexpr int kPerRow = D / kVec;
  for (int i = threadIdx.x; i < kTile * kPerRow; i += blockDim.x) {
    const int r = i / kPerRow, c = (i % kPerRow) * kVec;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < n) v = *reinterpret_cast<const uint4*>(src + ((row0 + r) * H + h) * D + c);
    *reinterpret_cast<uint4*>(dst + r * (D + kPad) + c) = v;
  }
}

__device__ __forceinline__ void flag_error(unsigned* flag, unsigned bit) {
  if (flag != nullptr) atomicOr(flag, bit);
}

__device__ __forceinline__ int64_t clamp64(int64_t x, int64_t lo, int64_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// max(cu[0..n]) over the whole block (blockDim.x = kTableThreads; every thread gets it).
constexpr int kTableThreads = 128;
__device__ int32_t block_prefix_max(const int32_t* __restrict cu, int n) {
  __shared__ int32_t warp_max[kTableThreads / 32];
  int32_t mx = INT32_MIN;
  for (int i = threadIdx.x; i <= n; i += blockDim.x) mx = cu[i] > mx ? cu[i] : mx;
  for (int off = 16; off > 0; off >>= 1) {
    const int32_t o = __shfl_xor_sync(0xffffffffu, mx, off);
    mx = o > mx ? o : mx;
  }
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = mx;
  __syncthreads();
  mx = warp_max[0];
  for (int w = 1; w < kTableThreads / 32; ++w) mx = warp_max[w] > mx ? warp_max[w] : mx;
  return mx;
}

// One block per sequence s. Whatever cu_seqlens holds (values a trusted layout cannot see may have
// changed), the bounds the kernels use are its running max clamped to [0, T]: non-decreasing, inside
// the tensors, so sequence slots [start / 64 + s, ...) stay below attn_num_slots. Impossible values
// set a bit of the error flag; block / stream values only decide visibility (any int is safe).
__global__ void __launch_bounds__(kTableThreads)
    tile_table_kernel(const int32_t* __restrict cu_in, const int32_t* __restrict block,
                      const int32_t* __restrict stream, bool full, int64_t T, TileTable tt,
                      unsigned* err) {
  const int s = blockIdx.x;
  const int32_t run0 = block_prefix_max(cu_in, s);  // max(cu[0..s])
  const int32_t c0 = cu_in[s], c1 = cu_in[s + 1];
  const int64_t start = clamp64(run0, 0, T);
  const int64_t end = clamp64(c1 > run0 ? c1 : run0, 0, T);
  const int64_t len = end - start;
  if (threadIdx.x == 0) {
    const bool bad = c1 < c0 || c1 < 0 || c1 > T || (s == 0 && c0 != 0) ||
                     (s == static_cast<int>(gridDim.x) - 1 && c1 != T);
    if (bad) flag_error(err, kErrCuSeqlens);
    if (s == 0) tt.cu[0] = static_cast<int32_t>(start);
    tt.cu[s + 1] = static_cast<int32_t>(end);
  }
  const int64_t first = start / kTile + s;
  const int64_t n_tiles = (len + kTile - 1) / kTile;
  bool negative = false;
  for (int64_t t = threadIdx.x; t < n_tiles; t += blockDim.x) {
    TileMeta m = tile_meta_empty();
    const int64_t stop = imin64(len, (t + 1) * kTile);
    for (int64_t i = t * kTile; i < stop; ++i) {
      const int32_t r = full ? 0 : stream[start + i];
      negative |= r < 0;
      tile_meta_add(m, full ? 0 : block[start + i], r);
    }
    tt.slot_seq[first + t] = s;
    tt.slot_tile[first + t] = static_cast<int32_t>(t);
    tt.meta[first + t] = m;
  }
  if (negative) flag_error(err, kErrStream);
}

// ---- forward ------------------------------------------------------------------------------------

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    attn_fwd_kernel(AttnArgs a, T* __restrict out, float* __restrict lse) {
  const int slot = blockIdx.x, h = blockIdx.y;
  const int s = a.tiles.slot_seq[slot];
  if (s < 0) return;
  const int hk = h / (a.Hq / a.Hkv);
  const int64_t seq0 = a.tiles.cu[s], len = a.tiles.cu[s + 1] - seq0;  // clamped bounds
  const int qt = a.tiles.slot_tile[slot];
  const int64_t q0 = seq0 + static_cast<int64_t>(qt) * kTile;
  const int nq = static_cast<int>(imin64(kTile, len - qt * kTile));
  const int64_t first_slot = seq0 / kTile + s;
  const int n_tiles = static_cast<int>((len + kTile - 1) / kTile);
  const TileMeta qmeta = a.tiles.meta[slot];

  DLMKERN_DYNAMIC_SMEM(smem_raw);
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* Ks = Qs + kTile * (D + kPad);
  T* Vs = Ks + kTile * (D + kPad);
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);

  load_tile<T, D>(Qs, q, q0, nq, a.Hq, h);
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int r0 = warp * 16;
  uint32_t qa[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    qa[kk][0] = ld32(Qs + (r0 + g) * (D + kPad) + kk * 16 + 2 * t);
    qa[kk][1] = ld32(Qs + (r0 + g + 8) * (D + kPad) + kk * 16 + 2 * t);
    qa[kk][2] = ld32(Qs + (r0 + g) * (D + kPad) + kk * 16 + 8 + 2 * t);
    qa[kk][3] = ld32(Qs + (r0 + g + 8) * (D + kPad) + kk * 16 + 8 + 2 * t);
  }
  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m[2] = {kNegInf, kNegInf}, l[2] = {0.f, 0.f};
  const int64_t qrow[2] = {q0 + r0 + g, q0 + r0 + g + 8};
  const bool qvalid[2] = {r0 + g < nq, r0 + g + 8 < nq};
  int32_t qb[2] = {0, 0}, qs[2] = {0, 0};
  if (!a.full) {
    for (int i = 0; i < 2; ++i) {
      if (qvalid[i]) {
        qb[i] = a.block[qrow[i]];
        qs[i] = a.stream[qrow[i]];
      }
    }
  }

  for (int kt = 0; kt < n_tiles; ++kt) {
    const int vis = a.full ? kTileFull : tile_visibility(qmeta, a.tiles.meta[first_slot + kt]);
    if (vis == kTileNone) continue;  // uniform over the CTA
    const int64_t k0 = seq0 + static_cast<int64_t>(kt) * kTile;
    const int nk = static_cast<int>(imin64(kTile, len - kt * kTile));
    __syncthreads();
    load_tile<T, D>(Ks, k, k0, nk, a.Hkv, hk);
    load_tile<T, D>(Vs, v, k0, nk, a.Hkv, hk);
    __syncthreads();

    float sc[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const T* kr = Ks + (n * 8 + g) * (D + kPad) + kk * 16 + 2 * t;
        Mma<T>::run(sc[n], qa[kk], ld32(kr), ld32(kr + 8));
      }
    }
    // Scale, mask, online softmax (rows g and g + 8 of this warp's 16; a row lives in 4 lanes).
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int n = 0; n < 8; ++n) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int i = c / 2, col = n * 8 + 2 * t + (c & 1);
        float x = sc[n][c] * a.scale;
        bool ok = col < nk;
        if (ok && vis == kTilePartial) {
          ok = block_visible(qb[i], qs[i], a.block[k0 + col], a.stream[k0 + col]);
        }
        x = ok ? x : kNegInf;  // a masked key's NaN score is overwritten: it never leaks
        sc[n][c] = x;
        mx[i] = nan_max(mx[i], x);
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mx[i] = nan_max(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
      mx[i] = nan_max(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
    }
    float alpha[2], base[2], sum[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      base[i] = softmax_shift(mx[i]);  // rows with nothing visible yet stay at 0
      alpha[i] = __expf(m[i] - base[i]);
      m[i] = mx[i];
    }
    uint32_t pa[4][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const float p = __expf(sc[n][c] - base[c / 2]);
        sc[n][c] = p;
        sum[c / 2] += p;
      }
    }
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      pa[kk][0] = Mma<T>::pack(sc[2 * kk][0], sc[2 * kk][1]);
      pa[kk][1] = Mma<T>::pack(sc[2 * kk][2], sc[2 * kk][3]);
      pa[kk][2] = Mma<T>::pack(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
      pa[kk][3] = Mma<T>::pack(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      sum[i] += __shfl_xor_sync(0xffffffffu, sum[i], 1);
      sum[i] += __shfl_xor_sync(0xffffffffu, sum[i], 2);
      l[i] = l[i] * alpha[i] + sum[i];
    }
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) {
      o[nd][0] *= alpha[0];
      o[nd][1] *= alpha[0];
      o[nd][2] *= alpha[1];
      o[nd][3] *= alpha[1];
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const T* vc = Vs + (kk * 16 + 2 * t) * (D + kPad) + nd * 8 + g;
        const uint32_t b0 = ld_pair(vc, vc + (D + kPad));
        const uint32_t b1 = ld_pair(vc + 8 * (D + kPad), vc + 9 * (D + kPad));
        Mma<T>::run(o[nd], pa[kk], b0, b1);
      }
    }
  }

  T* outp = out;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (!qvalid[i]) continue;
    const float inv = softmax_inv(l[i]);  // 0: saw nothing; NaN: a NaN row
    T* orow = outp + (qrow[i] * a.Hq + h) * D;
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) {
      orow[nd * 8 + 2 * t] = Mma<T>::from(o[nd][2 * i] * inv);
      orow[nd * 8 + 2 * t + 1] = Mma<T>::from(o[nd][2 * i + 1] * inv);
    }
    if (t == 0) lse[static_cast<int64_t>(h) * a.T + qrow[i]] = softmax_lse(m[i], l[i]);
  }
}

// ---- backward -----------------------------------------------------------------------------------
// One CTA per (key tile, kv head): it owns dK / dV of its 64 keys (summed over the query heads of
// the group and every visible query tile) and adds its share of dQ with fp32 atomics.

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    attn_bwd_kernel(AttnArgs a, const T* __restrict dout, const float* __restrict lse,
                    const float* __restrict delta, float* __restrict dq, T* __restrict dk,
                    T* __restrict dv) {
  const int slot = blockIdx.x, hk = blockIdx.y;
  const int s = a.tiles.slot_seq[slot];
  if (s < 0) return;
  const int group = a.Hq / a.Hkv;
  const int64_t seq0 = a.tiles.cu[s], len = a.tiles.cu[s + 1] - seq0;  // clamped bounds
  const int kt = a.tiles.slot_tile[slot];
  const int64_t k0 = seq0 + static_cast<int64_t>(kt) * kTile;
  const int nk = static_cast<int>(imin64(kTile, len - kt * kTile));
  const int64_t first_slot = seq0 / kTile + s;
  const int n_tiles = static_cast<int>((len + kTile - 1) / kTile);
  const TileMeta kmeta = a.tiles.meta[slot];

  DLMKERN_DYNAMIC_SMEM(smem_raw);
  constexpr int kRow = D + kPad;
  T* Ks = reinterpret_cast<T*>(smem_raw);
  T* Vs = Ks + kTile * kRow;
  T* Qs = Vs + kTile * kRow;
  T* Ds = Qs + kTile * kRow;                    // dO tile
  T* St = Ds + kTile * kRow;                    // dS^T tile [key][query], row kTile + kPad
  float* lse_s = reinterpret_cast<float*>(St + kTile * (kTile + kPad));
  float* delta_s = lse_s + kTile;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);

  load_tile<T, D>(Ks, k, k0, nk, a.Hkv, hk);
  load_tile<T, D>(Vs, v, k0, nk, a.Hkv, hk);
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int r0 = warp * 16;  // this warp's 16 keys
  // A fragments of this warp's 16 rows of a [64][kRow] smem tile, k-step kk (re-read from smem
  // where needed rather than held: the D = 128 backward is register bound).
  auto a_frag = [&](const T* tile, int kk, uint32_t* f) {
    f[0] = ld32(tile + (r0 + g) * kRow + kk * 16 + 2 * t);
    f[1] = ld32(tile + (r0 + g + 8) * kRow + kk * 16 + 2 * t);
    f[2] = ld32(tile + (r0 + g) * kRow + kk * 16 + 8 + 2 * t);
    f[3] = ld32(tile + (r0 + g + 8) * kRow + kk * 16 + 8 + 2 * t);
  };
  float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
    dka[i][0] = dka[i][1] = dka[i][2] = dka[i][3] = 0.f;
    dva[i][0] = dva[i][1] = dva[i][2] = dva[i][3] = 0.f;
  }
  const int64_t krow[2] = {k0 + r0 + g, k0 + r0 + g + 8};
  const bool kvalid[2] = {r0 + g < nk, r0 + g + 8 < nk};
  int32_t kb[2] = {0, 0}, ks[2] = {0, 0};
  if (!a.full) {
    for (int i = 0; i < 2; ++i) {
      if (kvalid[i]) {
        kb[i] = a.block[krow[i]];
        ks[i] = a.stream[krow[i]];
      }
    }
  }

  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    for (int qt = 0; qt < n_tiles; ++qt) {
      const int vis = a.full ? kTileFull : tile_visibility(a.tiles.meta[first_slot + qt], kmeta);
      if (vis == kTileNone) continue;
      const int64_t q0 = seq0 + static_cast<int64_t>(qt) * kTile;
      const int nq = static_cast<int>(imin64(kTile, len - qt * kTile));
      __syncthreads();
      load_tile<T, D>(Qs, q, q0, nq, a.Hq, h);
      load_tile<T, D>(Ds, dout, q0, nq, a.Hq, h);
      for (int i = threadIdx.x; i < kTile; i += blockDim.x) {
        lse_s[i] = i < nq ? lse[static_cast<int64_t>(h) * a.T + q0 + i] : kNegInf;
        delta_s[i] = i < nq ? delta[static_cast<int64_t>(h) * a.T + q0 + i] : 0.f;
      }
      __syncthreads();

      // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x 64 queries.
      float st[8][4], dpt[8][4];
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        st[n][0] = st[n][1] = st[n][2] = st[n][3] = 0.f;
        dpt[n][0] = dpt[n][1] = dpt[n][2] = dpt[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          uint32_t fa[4];
          a_frag(Ks, kk, fa);
          const T* qr = Qs + (n * 8 + g) * kRow + kk * 16 + 2 * t;
          Mma<T>::run(st[n], fa, ld32(qr), ld32(qr + 8));
          a_frag(Vs, kk, fa);
          const T* dr = Ds + (n * 8 + g) * kRow + kk * 16 + 2 * t;
          Mma<T>::run(dpt[n], fa, ld32(dr), ld32(dr + 8));
        }
      }
      // P^T = exp(S^T * scale - lse[query]) on visible pairs; dS^T = P^T (dP^T - delta) * scale.
#pragma unroll
      for (int n = 0; n < 8; ++n) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int i = c / 2, col = n * 8 + 2 * t + (c & 1);
          bool ok = kvalid[i] && col < nq && lse_s[col] != kNegInf;
          if (ok && vis == kTilePartial) {
            ok = block_visible(a.block[q0 + col], a.stream[q0 + col], kb[i], ks[i]);
          }
          // Masked pairs give exactly 0, also for a NaN row (NaN lse / delta).
          const float p = ok ? __expf(st[n][c] * a.scale - lse_s[col]) : 0.f;
          st[n][c] = p;
          dpt[n][c] = ok ? p * (dpt[n][c] - delta_s[col]) * a.scale : 0.f;
        }
      }
      uint32_t pa[4][4], dsa[4][4];
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        pa[kk][0] = Mma<T>::pack(st[2 * kk][0], st[2 * kk][1]);
        pa[kk][1] = Mma<T>::pack(st[2 * kk][2], st[2 * kk][3]);
        pa[kk][2] = Mma<T>::pack(st[2 * kk + 1][0], st[2 * kk + 1][1]);
        pa[kk][3] = Mma<T>::pack(st[2 * kk + 1][2], st[2 * kk + 1][3]);
        dsa[kk][0] = Mma<T>::pack(dpt[2 * kk][0], dpt[2 * kk][1]);
        dsa[kk][1] = Mma<T>::pack(dpt[2 * kk][2], dpt[2 * kk][3]);
        dsa[kk][2] = Mma<T>::pack(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
        dsa[kk][3] = Mma<T>::pack(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
      }
      // dV += P^T dO, dK += dS^T Q (B operands: 16 queries x 8 dims, column access).
#pragma unroll
      for (int nd = 0; nd < D / 8; ++nd) {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          const T* dc = Ds + (kk * 16 + 2 * t) * kRow + nd * 8 + g;
          Mma<T>::run(dva[nd], pa[kk], ld_pair(dc, dc + kRow),
                      ld_pair(dc + 8 * kRow, dc + 9 * kRow));
          const T* qc = Qs + (kk * 16 + 2 * t) * kRow + nd * 8 + g;
          Mma<T>::run(dka[nd], dsa[kk], ld_pair(qc, qc + kRow),
                      ld_pair(qc + 8 * kRow, qc + 9 * kRow));
        }
      }
      // dS^T to smem so dQ = dS K can take dS with queries as rows.
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        const int col = n * 8 + 2 * t;
        St[(r0 + g) * (kTile + kPad) + col] = Mma<T>::from(dpt[n][0]);
        St[(r0 + g) * (kTile + kPad) + col + 1] = Mma<T>::from(dpt[n][1]);
        St[(r0 + g + 8) * (kTile + kPad) + col] = Mma<T>::from(dpt[n][2]);
        St[(r0 + g + 8) * (kTile + kPad) + col + 1] = Mma<T>::from(dpt[n][3]);
      }
      __syncthreads();
      // dQ[16 queries of this warp] += dS[queries x 64 keys] K[64 keys x D]; atomics to fp32.
      const int qr0 = warp * 16;
      uint32_t da[4][4];
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {  // A = dS (row = query, col = key) read from dS^T
        const T* base = St + (kk * 16 + 2 * t) * (kTile + kPad) + qr0 + g;
        da[kk][0] = ld_pair(base, base + (kTile + kPad));
        da[kk][1] = ld_pair(base + 8, base + (kTile + kPad) + 8);
        da[kk][2] = ld_pair(base + 8 * (kTile + kPad), base + 9 * (kTile + kPad));
        da[kk][3] = ld_pair(base + 8 * (kTile + kPad) + 8, base + 9 * (kTile + kPad) + 8);
      }
#pragma unroll
      for (int nd = 0; nd < D / 8; ++nd) {
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          const T* kc = Ks + (kk * 16 + 2 * t) * kRow + nd * 8 + g;
          Mma<T>::run(acc, da[kk], ld_pair(kc, kc + kRow), ld_pair(kc + 8 * kRow, kc + 9 * kRow));
        }
        const int qa0 = qr0 + g, qa1 = qr0 + g + 8, col = nd * 8 + 2 * t;
        if (qa0 < nq) {
          float* dst = dq + ((q0 + qa0) * a.Hq + h) * D + col;
          atomicAdd(dst, acc[0]);
          atomicAdd(dst + 1, acc[1]);
        }
        if (qa1 < nq) {
          float* dst = dq + ((q0 + qa1) * a.Hq + h) * D + col;
          atomicAdd(dst, acc[2]);
          atomicAdd(dst + 1, acc[3]);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (!kvalid[i]) continue;
    T* dkr = dk + (krow[i] * a.Hkv + hk) * D;
    T* dvr = dv + (krow[i] * a.Hkv + hk) * D;
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) {
      dkr[nd * 8 + 2 * t] = Mma<T>::from(dka[nd][2 * i]);
      dkr[nd * 8 + 2 * t + 1] = Mma<T>::from(dka[nd][2 * i + 1]);
      dvr[nd * 8 + 2 * t] = Mma<T>::from(dva[nd][2 * i]);
      dvr[nd * 8 + 2 * t + 1] = Mma<T>::from(dva[nd][2 * i + 1]);
    }
  }
}

template <int D>
constexpr int fwd_smem_bytes() { return 3 * kTile * (D + kPad) * 2; }
template <int D>
constexpr int bwd_smem_bytes() {
  return 4 * kTile * (D + kPad) * 2 + kTile * (kTile + kPad) * 2 + 2 * kTile * 4;
}

template <typename T, int D>
int fwd_typed(const AttnArgs& a, void* out, float* lse) {
  auto kernel = attn_fwd_kernel<T, D>;
  constexpr int smem = fwd_smem_bytes<D>();
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  const dim3 grid(static_cast<unsigned>(a.tiles.num_slots), static_cast<unsigned>(a.Hq));
  DLMKERN_LAUNCH(kernel, grid, kThreads, smem, static_cast<cudaStream_t>(a.stream_ptr))(
      a, static_cast<T*>(out), lse);
  return static_cast<int>(cudaGetLastError());
}

template <typename T, int D>
int bwd_typed(const AttnArgs& a, const void* dout, const float* lse, const float* delta,
              float* dq, void* dk, void* dv) {
  auto kernel = attn_bwd_kernel<T, D>;
  constexpr int smem = bwd_smem_bytes<D>();
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  const dim3 grid(static_cast<unsigned>(a.tiles.num_slots), static_cast<unsigned>(a.Hkv));
  DLMKERN_LAUNCH(kernel, grid, kThreads, smem, static_cast<cudaStream_t>(a.stream_ptr))(
      a, static_cast<const T*>(dout), lse, delta, dq, static_cast<T*>(dk), static_cast<T*>(dv));
  return static_cast<int>(cudaGetLastError());
}

template <typename F64, typename F128>
int by_dim(int D, F64 f64, F128 f128) {
  if (D == 64) return f64();
  if (D == 128) return f128();
  return static_cast<int>(cudaErrorInvalidValue);
}

// ---- decode -------------------------------------------------------------------------------------

constexpr int kDecodeKeysPerSplit = 512;
constexpr int kDecodeMaxSplits = 32;
constexpr int kDecodeRowsPerWarp = 4;

// Sequence s's query rows [qb0, qb0 + nq) and cached length L as the decode kernels use them:
// cu_seqlens_q clamped to [0, T] (end >= start) and cache_seqlens to [0, max_len], so no value of
// either (never read by the host: the error flag reports them) reaches outside the tensors.
// Overlapping ranges (a decreasing cu_seqlens_q) are each computed; the error flag says so.
struct DecodeSeq {
  int64_t qb0, L;
  int nq;
};

__device__ __forceinline__ DecodeSeq decode_seq(const DecodeArgs& a, int s) {
  const int64_t qb0 = clamp64(a.cu_seqlens_q[s], 0, a.T);
  const int64_t end = clamp64(a.cu_seqlens_q[s + 1], qb0, a.T);
  return DecodeSeq{qb0, clamp64(a.cache_seqlens[s], 0, a.max_len), static_cast<int>(end - qb0)};
}

// Flags the impossible values decode_seq clamped (one thread per sequence).
__device__ void decode_flag_errors(const DecodeArgs& a, int s) {
  const int32_t c0 = a.cu_seqlens_q[s], c1 = a.cu_seqlens_q[s + 1], L = a.cache_seqlens[s];
  if (c1 < c0 || c1 < 0 || c1 > a.T || (s == 0 && c0 != 0) || (s == a.num_seqs - 1 && c1 != a.T)) {
    flag_error(a.error_flag, kErrCuSeqlensQ);
  }
  if (L < 0 || L > a.max_len) flag_error(a.error_flag, kErrCacheSeqlens);
}

// One CTA per (sequence, kv head, split of the keys [cached prefix | own block]). Rows are
// (query, head of the group) pairs; each warp keeps up to 4 rows' state in registers.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) decode_kernel(DecodeArgs a, int splits) {
  const int s = blockIdx.x, hk = blockIdx.y, split = blockIdx.z;
  const int group = a.Hq / a.Hkv;
  const DecodeSeq sq = decode_seq(a, s);
  const int64_t qb0 = sq.qb0, L = sq.L;
  const int nq = sq.nq;
  if (hk == 0 && split == 0 && threadIdx.x == 0) decode_flag_errors(a, s);
  const int64_t total = L + nq;
  const int64_t chunk = ((total + splits - 1) / splits + kTile - 1) / kTile * kTile;
  const int64_t kbeg = split * chunk, kend = imin64(total, kbeg + chunk);
  const int rows = nq * group;
  constexpr int kRowS = D + 2;  // fp32 smem rows, padded by one word pair
  DLMKERN_DYNAMIC_SMEM(smem_raw);
  float* Kf = reinterpret_cast<float*>(smem_raw);
  float* Vf = Kf + kTile * kRowS;
  float* Pw = Vf + kTile * kRowS;  // [kWarps][64] probabilities
  const T* kc = static_cast<const T*>(a.k_cache);
  const T* vc = static_cast<const T*>(a.v_cache);
  const T* kn = static_cast<const T*>(a.k_new);
  const T* vn = static_cast<const T*>(a.v_new);
  const T* q = static_cast<const T*>(a.q);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  constexpr int kDPerLane = D / 32;
  const int64_t ws_stride = D + 2;

  for (int rbase = 0; rbase < rows; rbase += kWarps * kDecodeRowsPerWarp) {
    float qv[kDecodeRowsPerWarp][kDPerLane], o[kDecodeRowsPerWarp][kDPerLane];
    float m[kDecodeRowsPerWarp], l[kDecodeRowsPerWarp];
    int row_of[kDecodeRowsPerWarp];
#pragma unroll
    for (int j = 0; j < kDecodeRowsPerWarp; ++j) {
      const int r = rbase + warp * kDecodeRowsPerWarp + j;
      row_of[j] = r < rows ? r : -1;
      m[j] = kNegInf;
      l[j] = 0.f;
#pragma unroll
      for (int e = 0; e < kDPerLane; ++e) {
        o[j][e] = 0.f;
        qv[j][e] = 0.f;
        if (r < rows) {
          const int64_t tok = qb0 + r / group;
          const int h = hk * group + r % group;
          qv[j][e] = to_f(q[(tok * a.Hq + h) * D + lane + 32 * e]) * a.scale;
        }
      }
    }
    for (int64_t t0 = kbeg; t0 < kend; t0 += kTile) {
      const int nk = static_cast<int>(imin64(kTile, kend - t0));
      __syncthreads();
      for (int i = threadIdx.x; i < kTile * D; i += blockDim.x) {
        const int r = i / D, c = i % D;
        float kx = 0.f, vx = 0.f;
        if (r < nk) {
          const int64_t j = t0 + r;
          if (j < L) {
            const int64_t off = ((s * a.max_len + j) * a.Hkv + hk) * D + c;
            kx = to_f(kc[off]);
            vx = to_f(vc[off]);
          } else {
            const int64_t off = ((qb0 + j - L) * a.Hkv + hk) * D + c;
            kx = to_f(kn[off]);
            vx = to_f(vn[off]);
          }
        }
        Kf[r * kRowS + c] = kx;
        Vf[r * kRowS + c] = vx;
      }
      __syncthreads();
#pragma unroll
      for (int j = 0; j < kDecodeRowsPerWarp; ++j) {
        if (row_of[j] < 0) continue;  // uniform per warp
        // Scores: lane holds keys lane and lane + 32; the query is spread over lanes (by dim).
        float sc[2] = {0.f, 0.f};
        for (int d = 0; d < D; ++d) {
          const float qd = __shfl_sync(0xffffffffu, qv[j][d / 32], d % 32);
          sc[0] += qd * Kf[lane * kRowS + d];
          sc[1] += qd * Kf[(lane + 32) * kRowS + d];
        }
        sc[0] = lane < nk ? sc[0] : kNegInf;
        sc[1] = lane + 32 < nk ? sc[1] : kNegInf;
        float mx = nan_max(sc[0], sc[1]);
        for (int off = 16; off > 0; off >>= 1) mx = nan_max(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        const float mnew = nan_max(m[j], mx);
        const float base = softmax_shift(mnew);  // all -inf so far: exp(-inf - 0) = 0, no NaN
        const float alpha = __expf(m[j] - base);
        const float p0 = __expf(sc[0] - base), p1 = __expf(sc[1] - base);
        float ps = p0 + p1;
        for (int off = 16; off > 0; off >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, off);
        l[j] = l[j] * alpha + ps;
        m[j] = mnew;
        Pw[warp * kTile + lane] = p0;
        Pw[warp * kTile + lane + 32] = p1;
        __syncwarp();
#pragma unroll
        for (int e = 0; e < kDPerLane; ++e) {
          float acc = o[j][e] * alpha;
          for (int key = 0; key < nk; ++key) acc += Pw[warp * kTile + key] * Vf[key * kRowS + lane + 32 * e];
          o[j][e] = acc;
        }
        __syncwarp();
      }
    }
    // Partial (m, l, o) of each row for the combine kernel.
#pragma unroll
    for (int j = 0; j < kDecodeRowsPerWarp; ++j) {
      if (row_of[j] < 0) continue;
      const int64_t tok = qb0 + row_of[j] / group;
      const int h = hk * group + row_of[j] % group;
      float* w = a.workspace + ((tok * a.Hq + h) * splits + split) * ws_stride;
#pragma unroll
      for (int e = 0; e < kDPerLane; ++e) w[2 + lane + 32 * e] = o[j][e];
      if (lane == 0) {
        w[0] = m[j];
        w[1] = l[j];
      }
    }
  }
}

// One warp per (token, head): merges the splits' partial softmax states.
template <typename T, int D>
__global__ void decode_combine_kernel(DecodeArgs a, int splits) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= a.T * a.Hq) return;
  const float* w = a.workspace + row * splits * (D + 2);
  float mx = kNegInf;
  for (int i = 0; i < splits; ++i) mx = nan_max(mx, w[i * (D + 2)]);  // a NaN split wins
  float l = 0.f, acc[D / 32];
#pragma unroll
  for (int e = 0; e < D / 32; ++e) acc[e] = 0.f;
  for (int i = 0; i < splits; ++i) {
    const float mi = w[i * (D + 2)];
    if (mi == kNegInf) continue;
    const float c = __expf(mi - mx);
    l += c * w[i * (D + 2) + 1];
#pragma unroll
    for (int e = 0; e < D / 32; ++e) acc[e] += c * w[i * (D + 2) + 2 + lane + 32 * e];
  }
  T* out = static_cast<T*>(a.out) + row * D;
#pragma unroll
  for (int e = 0; e < D / 32; ++e) out[lane + 32 * e] = Mma<T>::from(l == 0.f ? 0.f : acc[e] / l);  // NaN l: NaN
}

// Appends each sequence's block to its cache and advances cache_seqlens (after the reads).
template <typename T>
__global__ void decode_commit_kernel(DecodeArgs a) {
  const int s = blockIdx.x;
  const DecodeSeq sq = decode_seq(a, s);
  const int64_t qb0 = sq.qb0, L = sq.L;
  const int nq = sq.nq;
  // A cache row is never overrun: an impossible commit is skipped (and flagged).
  if (a.cache_seqlens[s] != L || L + nq > a.max_len) {
    if (threadIdx.x == 0) {
      flag_error(a.error_flag, a.cache_seqlens[s] != L ? kErrCacheSeqlens : kErrCommitOverflow);
    }
    return;
  }
  const int64_t n = static_cast<int64_t>(nq) * a.Hkv * a.D;
  T* kc = static_cast<T*>(a.k_cache) + (s * a.max_len + L) * a.Hkv * a.D;
  T* vc = static_cast<T*>(a.v_cache) + (s * a.max_len + L) * a.Hkv * a.D;
  const T* kn = static_cast<const T*>(a.k_new) + qb0 * a.Hkv * a.D;
  const T* vn = static_cast<const T*>(a.v_new) + qb0 * a.Hkv * a.D;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    kc[i] = kn[i];
    vc[i] = vn[i];
  }
  __syncthreads();
  if (threadIdx.x == 0) a.cache_seqlens[s] = static_cast<int32_t>(L + nq);
}

template <typename T, int D>
int decode_typed(const DecodeArgs& a) {
  const int splits = decode_num_splits(a.max_len);
  auto s = static_cast<cudaStream_t>(a.stream_ptr);
  if (a.T > 0) {
    constexpr int smem = (2 * kTile * (D + 2) + kWarps * kTile) * 4;
    auto kernel = decode_kernel<T, D>;
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    const dim3 grid(static_cast<unsigned>(a.num_seqs), static_cast<unsigned>(a.Hkv),
                    static_cast<unsigned>(splits));
    DLMKERN_LAUNCH(kernel, grid, kThreads, smem, s)(a, splits);
    const int64_t rows = a.T * a.Hq;
    auto combine = decode_combine_kernel<T, D>;
    DLMKERN_LAUNCH(combine, static_cast<unsigned>((rows + 3) / 4), 128, 0, s)(a, splits);
  }
  if (a.commit && a.num_seqs > 0) {
    auto commit = decode_commit_kernel<T>;
    DLMKERN_LAUNCH(commit, static_cast<unsigned>(a.num_seqs), 256, 0, s)(a);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int launch_tile_table(const AttnArgs& a) {
  if (a.num_seqs == 0) return 0;
  DLMKERN_LAUNCH(tile_table_kernel, static_cast<unsigned>(a.num_seqs), kTableThreads, 0,
                 static_cast<cudaStream_t>(a.stream_ptr))(
      a.cu_seqlens, a.block, a.stream, a.full, a.T, a.tiles, a.error_flag);
  return static_cast<int>(cudaGetLastError());
}

int launch_block_attention_fwd(const AttnArgs& a, void* out, float* lse) {
  if (a.T == 0) return 0;
  if (a.dtype == DType::kBFloat16) {
    return by_dim(a.D, [&] { return fwd_typed<__nv_bfloat16, 64>(a, out, lse); },
                  [&] { return fwd_typed<__nv_bfloat16, 128>(a, out, lse); });
  }
  if (a.dtype == DType::kFloat16) {
    return by_dim(a.D, [&] { return fwd_typed<__half, 64>(a, out, lse); },
                  [&] { return fwd_typed<__half, 128>(a, out, lse); });
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int launch_block_attention_bwd(const AttnArgs& a, const void* grad_out, const float* lse,
                               const float* delta, float* dq_accum, void* dk, void* dv) {
  if (a.T == 0) return 0;
  if (a.dtype == DType::kBFloat16) {
    return by_dim(a.D,
                  [&] { return bwd_typed<__nv_bfloat16, 64>(a, grad_out, lse, delta, dq_accum, dk, dv); },
                  [&] { return bwd_typed<__nv_bfloat16, 128>(a, grad_out, lse, delta, dq_accum, dk, dv); });
  }
  if (a.dtype == DType::kFloat16) {
    return by_dim(a.D, [&] { return bwd_typed<__half, 64>(a, grad_out, lse, delta, dq_accum, dk, dv); },
                  [&] { return bwd_typed<__half, 128>(a, grad_out, lse, delta, dq_accum, dk, dv); });
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int decode_num_splits(int64_t max_len) {
  const int64_t s = (max_len + kDecodeKeysPerSplit - 1) / kDecodeKeysPerSplit;
  return static_cast<int>(s < 1 ? 1 : (s > kDecodeMaxSplits ? kDecodeMaxSplits : s));
}

int64_t decode_workspace_floats(int64_t T, int Hq, int D, int splits) {
  return T * Hq * splits * (D + 2);
}

int launch_decode_attention(const DecodeArgs& a) {
  if (a.dtype == DType::kBFloat16) {
    return by_dim(a.D, [&] { return decode_typed<__nv_bfloat16, 64>(a); },
                  [&] { return decode_typed<__nv_bfloat16, 128>(a); });
  }
  if (a.dtype == DType::kFloat16) {
    return by_dim(a.D, [&] { return decode_typed<__half, 64>(a); },
                  [&] { return decode_typed<__half, 128>(a); });
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace dlmkern::cuda
