// CUDA emulator (tests only): the fiber scheduler behind dlmkern_emu/device.h.
//
// A launch runs its blocks one after another. Each thread of a block is a ucontext fiber on the
// calling OS thread; a fiber runs until it reaches a barrier (__syncthreads, a warp-synchronous op)
// and the scheduler resumes fibers whose barrier has been released, in forward, reverse or a
// random order (set_schedule), so results that depend on the order threads run in between
// barriers (a missing __syncthreads) show up as differences between schedules.
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#include "dlmkern_emu/device.h"

// Bounds of the section holding every static __shared__ variable (defined by the linker).
extern "C" unsigned char __start_dlmkern_emu_shared[] __attribute__((weak));
extern "C" unsigned char __stop_dlmkern_emu_shared[] __attribute__((weak));

namespace dlmkern_emu {
namespace {

constexpr std::size_t kStackBytes = 256 * 1024;
constexpr unsigned kMaxThreads = 1024;
constexpr std::size_t kDefaultSmem = 48 * 1024;   // without cudaFuncSetAttribute
constexpr std::size_t kMaxOptinSmem = 227 * 1024;  // sm_90 opt-in limit per block
constexpr std::size_t kGatherBytes = 64;           // per lane

struct Barrier {
  int expected = 0, arrived = 0, site = -1;
  uint64_t gen = 0;
};

struct Fiber {
  ucontext_t ctx;
  dim3 tid;
  unsigned linear = 0;
  bool done = false;
  Barrier* waiting = nullptr;
  uint64_t wait_gen = 0;
};

struct State {
  std::mutex mu;  // one launch at a time
  ucontext_t sched;
  std::vector<Fiber> fibers;
  std::vector<char*> stacks;
  Barrier block_bar;
  std::vector<Barrier> warp_bar;
  std::vector<unsigned char> gather;  // [warps][32][kGatherBytes]
  std::vector<unsigned char> smem;
  Fiber* cur = nullptr;
  const std::function<void()>* body = nullptr;
  std::string error;
  cudaError_t last_error = cudaSuccess;
  std::string last_message;
  std::unordered_map<const void*, int> max_dynamic_smem;
  bool capturing = false;
  int schedule = 0;  // 0 forward, 1 reverse, 2 random
  uint64_t seed = 0;
};

State& st() {
  static State s;
  return s;
}

// Records the first failure of this launch and parks the calling fiber for good.
[[noreturn]] void fail(const std::string& what) {
  State& s = st();
  if (s.error.empty()) s.error = what;
  swapcontext(&s.cur->ctx, &s.sched);
  std::abort();  // never resumed
}

void wait_at(Barrier& b, int site, const char* kind) {
  State& s = st();
  if (b.arrived == 0) {
    b.site = site;
  } else if (b.site != site) {
    fail(std::string("divergent ") + kind + ": threads wait at line " + std::to_string(b.site) +
         " and at line " + std::to_string(site) + " (undefined behaviour on a GPU)");
  }
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.gen;
    return;
  }
  Fiber* f = s.cur;
  f->waiting = &b;
  f->wait_gen = b.gen;
  swapcontext(&f->ctx, &s.sched);
  if (!s.error.empty()) fail(s.error);
}

void fiber_entry() {
  State& s = st();
  (*s.body)();
  Fiber* f = s.cur;
  f->done = true;
  Barrier& w = s.warp_bar[f->linear / 32];
  --w.expected;
  if (w.arrived > 0) {
    fail("a thread exited while lanes of its warp wait in a warp-synchronous op (line " +
         std::to_string(w.site) + ")");
  }
  // Exited threads no longer count towards __syncthreads.
  if (--s.block_bar.expected > 0 && s.block_bar.arrived == s.block_bar.expected) {
    s.block_bar.arrived = 0;
    ++s.block_bar.gen;
  }
  swapcontext(&f->ctx, &s.sched);
  std::abort();
}

void set_error(cudaError_t code, const std::string& msg) {
  State& s = st();
  if (s.last_error == cudaSuccess) {
    s.last_error = code;
    s.last_message = msg;
  }
}

void run_block(State& s, unsigned nthreads, std::mt19937_64& rng) {
  const unsigned warps = (nthreads + 31) / 32;
  s.block_bar = Barrier{static_cast<int>(nthreads)};
  s.warp_bar.assign(warps, Barrier{});
  for (unsigned w = 0; w < warps; ++w) {
    s.warp_bar[w].expected = static_cast<int>(std::min(32u, nthreads - 32 * w));
  }
  // Shared memory content is undefined at block start: all-ones bytes read as NaN (float, bf16,
  // fp16) so a read before a write shows up.
  std::fill(s.smem.begin(), s.smem.end(), 0xff);
  if (__start_dlmkern_emu_shared != nullptr) {
    std::fill(__start_dlmkern_emu_shared, __stop_dlmkern_emu_shared, 0xff);
  }
  for (unsigned i = 0; i < nthreads; ++i) {
    Fiber& f = s.fibers[i];
    f = Fiber{};
    f.linear = i;
    const dim3 bd = g_block_dim;
    f.tid = dim3(i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y));
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = s.stacks[i];
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  std::vector<unsigned> order(nthreads);
  for (unsigned i = 0; i < nthreads; ++i) order[i] = s.schedule == 1 ? nthreads - 1 - i : i;
  while (true) {
    if (s.schedule == 2) std::shuffle(order.begin(), order.end(), rng);
    bool live = false, progress = false;
    for (unsigned i : order) {
      Fiber& f = s.fibers[i];
      if (f.done) continue;
      live = true;
      if (f.waiting != nullptr && f.waiting->gen == f.wait_gen) continue;
      f.waiting = nullptr;
      s.cur = &f;
      g_thread_idx = f.tid;
      swapcontext(&s.sched, &f.ctx);
      progress = true;
      if (!s.error.empty()) return;
    }
    if (!live) return;
    if (!progress) {
      s.error = "deadlock: every live thread waits at a barrier that cannot complete "
                "(a __syncthreads some threads skip?)";
      return;
    }
  }
}

}  // namespace

void set_capturing(bool on) { st().capturing = on; }
bool capturing() { return st().capturing; }
void set_schedule(int schedule, uint64_t seed) {
  st().schedule = schedule;
  st().seed = seed;
}

void record_func_attribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return;
  if (value < 0 || static_cast<std::size_t>(value) > kMaxOptinSmem) {
    set_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: " + std::to_string(value) +
                                         " bytes of dynamic shared memory exceed the sm_90 limit");
    return;
  }
  st().max_dynamic_smem[func] = value;
}

void sync_block(int site) { wait_at(st().block_bar, site, "__syncthreads"); }

void sync_warp(int site) { wait_at(st().warp_bar[st().cur->linear / 32], site, "__syncwarp"); }

unsigned lane_id() { return st().cur->linear % 32; }

unsigned char* dynamic_smem() { return st().smem.data(); }

void warp_gather(const void* mine, std::size_t bytes, void* all, unsigned mask, int site) {
  State& s = st();
  const unsigned warp = s.cur->linear / 32;
  if (mask != 0xffffffffu) fail("warp op with a partial mask (the emulator supports full warps)");
  if (bytes > kGatherBytes) fail("warp exchange larger than the emulator's buffer");
  Barrier& b = s.warp_bar[warp];
  if (b.expected != 32) fail("full-mask warp op with fewer than 32 live lanes (line " +
                             std::to_string(site) + ")");
  unsigned char* buf = s.gather.data() + static_cast<std::size_t>(warp) * 32 * kGatherBytes;
  std::memcpy(buf + lane_id() * kGatherBytes, mine, bytes);
  wait_at(b, site, "warp op");
  for (unsigned l = 0; l < 32; ++l) {
    std::memcpy(static_cast<unsigned char*>(all) + l * bytes, buf + l * kGatherBytes, bytes);
  }
  wait_at(b, site, "warp op");  // nobody overwrites the buffer before every lane has read it
}

void run_grid(const void* kernel, dim3 grid, dim3 block, std::size_t smem,
              const std::function<void()>& body) {
  State& s = st();
  std::lock_guard<std::mutex> lock(s.mu);
  const unsigned long long nthreads = 1ull * block.x * block.y * block.z;
  if (nthreads == 0 || nthreads > kMaxThreads || block.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u) {
    set_error(cudaErrorInvalidConfiguration,
              "invalid launch configuration: grid (" + std::to_string(grid.x) + ", " +
                  std::to_string(grid.y) + ", " + std::to_string(grid.z) + "), block (" +
                  std::to_string(block.x) + ", " + std::to_string(block.y) + ", " +
                  std::to_string(block.z) + ")");
    return;
  }
  const auto it = s.max_dynamic_smem.find(kernel);
  const std::size_t limit = it == s.max_dynamic_smem.end()
                                ? kDefaultSmem
                                : std::max<std::size_t>(kDefaultSmem, it->second);
  if (smem > limit) {
    set_error(cudaErrorInvalidValue, std::to_string(smem) +
                                         " bytes of dynamic shared memory requested, the kernel "
                                         "allows " + std::to_string(limit));
    return;
  }
  while (s.stacks.size() < nthreads) {
    // A PROT_NONE page below each stack: an overflow faults instead of corrupting memory.
    const long page = sysconf(_SC_PAGESIZE);
    void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
      set_error(cudaErrorLaunchFailure, "cannot allocate emulated thread stacks");
      return;
    }
    mprotect(m, page, PROT_NONE);
    s.stacks.push_back(static_cast<char*>(m) + page);
  }
  s.fibers.resize(std::max<std::size_t>(s.fibers.size(), nthreads));
  s.gather.assign(static_cast<std::size_t>((nthreads + 31) / 32) * 32 * kGatherBytes, 0);
  s.smem = std::vector<unsigned char>(smem);  // exactly `smem` bytes: overruns hit ASan redzones
  s.body = &body;
  s.error.clear();
  g_grid_dim = grid;
  g_block_dim = block;
  std::mt19937_64 rng(s.seed);
  // Blocks run in the schedule's order too (which block finishes last, the order of atomics).
  std::vector<dim3> blocks;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) blocks.emplace_back(x, y, z);
    }
  }
  if (s.schedule == 1) std::reverse(blocks.begin(), blocks.end());
  if (s.schedule == 2) std::shuffle(blocks.begin(), blocks.end(), rng);
  for (const dim3& b : blocks) {
    g_block_idx = b;
    run_block(s, static_cast<unsigned>(nthreads), rng);
    if (!s.error.empty()) {
      set_error(cudaErrorLaunchFailure,
                "emulated kernel failed in block (" + std::to_string(b.x) + ", " +
                    std::to_string(b.y) + ", " + std::to_string(b.z) + "): " + s.error);
      return;
    }
  }
}

}  // namespace dlmkern_emu

cudaError_t cudaGetLastError() {
  auto& s = dlmkern_emu::st();
  const cudaError_t e = s.last_error;
  s.last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return dlmkern_emu::st().last_error; }

const char* cudaGetErrorString(cudaError_t err) {
  if (err == cudaSuccess) return "no error";
  // The detailed message of the last failure (the glue turns it into the exception text).
  static thread_local std::string msg;
  msg = "[emulated CUDA error " + std::to_string(static_cast<int>(err)) + "] " +
        dlmkern_emu::st().last_message;
  return msg.c_str();
}

cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  *status = dlmkern_emu::capturing() ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone;
  return cudaSuccess;
}
