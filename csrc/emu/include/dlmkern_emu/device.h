// CUDA emulator (tests only): what a .cu file of csrc/cuda/ needs to compile as plain C++ and run
// on the CPU. Every CUDA thread of a block is a fiber; blocks run one after another; barriers,
// warp shuffles / votes and the mma.sync tensor-core instruction are emulated with the documented
// semantics, and misuse that is undefined on a GPU (a barrier reached from different places, a
// full-mask warp op with a lane missing, a deadlock) fails the launch with a message instead.
// See csrc/emu/README.md for what this does and does not verify.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#include "dlmkern_emu/runtime_api.h"

// ---- qualifiers -----------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Static shared memory: blocks run one at a time on one OS thread, so a function-local static is
// exactly one copy per block. Those of non-template functions live in one section, which the
// scheduler fills with 0xff bytes at each block start (undefined content on a GPU: a read before
// a write shows as NaN); GCC drops the section of a template's statics, which keep stale values.
#define __shared__ __attribute__((section("dlmkern_emu_shared"), used)) static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {  // as in CUDA: a misaligned 16-byte access is a bug (UBSan traps)
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

namespace dlmkern_emu {

// Set by the scheduler before it resumes a fiber (one runs at a time).
inline dim3 g_thread_idx, g_block_idx, g_block_dim, g_grid_dim;

// Barrier of the whole block / of the calling thread's warp. `site` names the call site (a line):
// all threads must meet at the same one.
void sync_block(int site);
void sync_warp(int site);
// Warp-synchronous exchange: every lane of the warp contributes `bytes` bytes and receives all
// 32 contributions in `all` (lane-major). Requires the full warp (mask 0xffffffff).
void warp_gather(const void* mine, std::size_t bytes, void* all, unsigned mask, int site);
unsigned lane_id();
unsigned char* dynamic_smem();

}  // namespace dlmkern_emu

#define threadIdx (::dlmkern_emu::g_thread_idx)
#define blockIdx (::dlmkern_emu::g_block_idx)
#define blockDim (::dlmkern_emu::g_block_dim)
#define gridDim (::dlmkern_emu::g_grid_dim)
#define __syncthreads() ::dlmkern_emu::sync_block(__LINE__)
#define __syncwarp(...) ::dlmkern_emu::sync_warp(__LINE__)
#define __shfl_sync(mask, v, src, ...) ::dlmkern_emu::shfl(mask, v, -1, src, __LINE__)
#define __shfl_xor_sync(mask, v, lm, ...) ::dlmkern_emu::shfl(mask, v, lm, 0, __LINE__)
#define __ballot_sync(mask, p) ::dlmkern_emu::ballot(mask, p, __LINE__)
#define __all_sync(mask, p) (::dlmkern_emu::ballot(mask, p, __LINE__) == 0xffffffffu)
#define __any_sync(mask, p) (::dlmkern_emu::ballot(mask, p, __LINE__) != 0u)

namespace dlmkern_emu {

template <typename T>
T shfl(unsigned mask, T v, int xor_mask, int src, int site) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of a <= 8 byte value");
  T all[32];
  warp_gather(&v, sizeof(T), all, mask, site);
  const unsigned lane = lane_id();
  const unsigned from = xor_mask >= 0 ? (lane ^ static_cast<unsigned>(xor_mask)) & 31u
                                      : static_cast<unsigned>(src) & 31u;
  return all[from];
}

inline unsigned ballot(unsigned mask, bool p, int site) {
  bool all[32];
  warp_gather(&p, sizeof(bool), all, mask, site);
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= static_cast<unsigned>(all[i]) << i;
  return r;
}

}  // namespace dlmkern_emu

// ---- math and memory intrinsics -------------------------------------------------------------------
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
template <typename T>
inline T __ldcg(const T* p) { return *p; }
inline void __threadfence() {}
// Fibers share one OS thread and never switch inside these, so plain read-modify-writes are atomic.
template <typename T>
inline T atomicAdd(T* p, T v) { const T old = *p; *p = old + v; return old; }
inline unsigned atomicOr(unsigned* p, unsigned v) { const unsigned old = *p; *p = old | v; return old; }

// ---- 16-bit floats (storage + round-to-nearest-even conversions) ----------------------------------
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
struct __half {
  uint16_t bits;
};
struct __half2 {
  __half x, y;
};

namespace dlmkern_emu {
inline uint16_t f32_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_bits_to_f32(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_f16_bits(float f) {
  const _Float16 h = static_cast<_Float16>(f);  // round to nearest even
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
inline float f16_bits_to_f32(uint16_t b) {
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return static_cast<float>(h);
}
}  // namespace dlmkern_emu

inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {dlmkern_emu::f32_to_bf16_bits(f)}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return dlmkern_emu::bf16_bits_to_f32(h.bits); }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline __half __float2half_rn(float f) { return {dlmkern_emu::f32_to_f16_bits(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) { return dlmkern_emu::f16_bits_to_f32(h.bits); }
inline __half2 __floats2half2_rn(float lo, float hi) {
  return {__float2half_rn(lo), __float2half_rn(hi)};
}

// ---- mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 -------------------------------
// Fragment layouts from the PTX ISA (g = lane / 4, t = lane % 4; low 16 bits = lower column/row):
//   A 16x16: reg 0 (row g, k 2t..2t+1), 1 (row g+8, k 2t..), 2 (row g, k 2t+8..), 3 (row g+8, k 2t+8..)
//   B 16x8:  reg 0 (k 2t..2t+1, col g), reg 1 (k 2t+8..2t+9, col g)
//   C 16x8:  c0 c1 (row g, col 2t..2t+1), c2 c3 (row g+8, col 2t..2t+1)
// The products of 16-bit values are exact; this accumulates them in double and rounds once.
namespace dlmkern_emu {
template <typename T>
void mma_m16n8k16(float* c, const uint32_t* a, uint32_t b0, uint32_t b1, int site) {
  struct Frag {
    uint32_t a[4], b[2];
  };
  const Frag mine{{a[0], a[1], a[2], a[3]}, {b0, b1}};
  Frag all[32];
  warp_gather(&mine, sizeof(Frag), all, 0xffffffffu, site);
  auto half = [](uint32_t reg, int hi) {
    const uint16_t bits = static_cast<uint16_t>(reg >> (16 * hi));
    return std::is_same_v<T, __half> ? f16_bits_to_f32(bits) : bf16_bits_to_f32(bits);
  };
  auto A = [&](int r, int k) {
    const Frag& f = all[(r % 8) * 4 + (k % 8) / 2];
    return half(f.a[(r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k % 2);
  };
  auto B = [&](int k, int n) { return half(all[n * 4 + (k % 8) / 2].b[k >= 8 ? 1 : 0], k % 2); };
  const int lane = static_cast<int>(lane_id()), g = lane / 4, t = lane % 4;
  for (int j = 0; j < 4; ++j) {
    const int row = g + (j >= 2 ? 8 : 0), col = 2 * t + (j & 1);
    double acc = c[j];
    for (int k = 0; k < 16; ++k) acc += static_cast<double>(A(row, k)) * B(k, col);
    c[j] = static_cast<float>(acc);
  }
}
}  // namespace dlmkern_emu

// ---- launches -------------------------------------------------------------------------------------
namespace dlmkern_emu {

// Runs body() once per thread of every block of the grid; a bad configuration or a failure inside
// the kernel is reported by cudaGetLastError(), like an asynchronous launch failure.
void run_grid(const void* kernel, dim3 grid, dim3 block, std::size_t smem,
              const std::function<void()>& body);

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  std::size_t smem;
  Launch(void (*k)(P...), dim3 g, dim3 b, std::size_t m, cudaStream_t)
      : kernel(k), grid(g), block(b), smem(m) {}
  template <typename... A>
  void operator()(A&&... args) const {
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);  // by value, like CUDA
    run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem,
             [&] { std::apply(kernel, params); });
  }
};

}  // namespace dlmkern_emu
