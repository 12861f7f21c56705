// CUDA backend glue of block_attention / decode_attention: torch tensors in, raw pointers out.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "attention.h"
#include "cuda/attention_kernels.h"
#include "cuda/glue.h"
#include "library.h"

namespace dlmkern {
namespace {

constexpr const char* kBlockOp = "dlmkern.block_attention";

void check_launch(int err) {
  TORCH_CHECK(err == 0, "dlmkern: CUDA kernel launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

// The glue reads no layout value on the host (check_values = false): the tile-table and decode
// kernels clamp impossible values and set the device's error flag (device_errors.h).
constexpr bool kHostValueChecks = false;

DType half_dtype(const char* op, const at::Tensor& q) {
  if (q.scalar_type() == at::kBFloat16) return DType::kBFloat16;
  if (q.scalar_type() == at::kHalf) return DType::kFloat16;
  TORCH_CHECK_TYPE(false, op, ": the CUDA kernels take bfloat16 or float16 (got ", q.scalar_type(),
                   "); cast the inputs, or run float32 on the CPU");
}

void check_head_dim(const char* op, int64_t D) {
  TORCH_CHECK_VALUE(D == 64 || D == 128, op, ": the CUDA kernels support head dim 64 or 128, got ",
                    D);
}

// Contiguous with a 16-byte aligned base (the kernels copy tiles with 16-byte vector loads).
at::Tensor aligned(const at::Tensor& t) {
  auto c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 == 0 ? c : c.clone();
}

// Tile table tensors kept alive for the duration of a launch.
struct Tiles {
  at::Tensor cu, slot_seq, slot_tile, meta;
  cuda::TileTable table;
};

Tiles make_tiles(const at::Tensor& q, int64_t T, int64_t S) {
  Tiles t;
  const int64_t slots = cuda::attn_num_slots(T, S);
  auto i32 = q.options().dtype(at::kInt);
  t.cu = at::empty({S + 1}, i32);
  t.slot_seq = at::full({slots}, -1, i32);
  t.slot_tile = at::empty({slots}, i32);
  static_assert(sizeof(TileMeta) % sizeof(int32_t) == 0, "TileMeta is a plain int32 record");
  t.meta = at::empty({slots, static_cast<int64_t>(sizeof(TileMeta) / sizeof(int32_t))}, i32);
  t.table = cuda::TileTable{t.cu.data_ptr<int32_t>(), t.slot_seq.data_ptr<int32_t>(),
                            t.slot_tile.data_ptr<int32_t>(),
                            reinterpret_cast<TileMeta*>(t.meta.data_ptr<int32_t>()), slots};
  return t;
}

cuda::AttnArgs attn_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& cu, const at::Tensor& block, const at::Tensor& stream,
                         bool full, const AttnDims& d, const Tiles& tiles) {
  cuda::AttnArgs a{};
  a.dtype = half_dtype(kBlockOp, q);
  a.q = q.const_data_ptr();
  a.k = k.const_data_ptr();
  a.v = v.const_data_ptr();
  a.cu_seqlens = cu.const_data_ptr<int32_t>();
  a.block = block.const_data_ptr<int32_t>();
  a.stream = stream.const_data_ptr<int32_t>();
  a.T = d.T;
  a.num_seqs = static_cast<int>(d.S);
  a.Hq = static_cast<int>(d.Hq);
  a.Hkv = static_cast<int>(d.Hkv);
  a.D = static_cast<int>(d.D);
  a.scale = static_cast<float>(d.scale);
  a.full = full;
  a.tiles = tiles.table;
  a.error_flag = flag_ptr(glue_error_flag(q));
  a.stream_ptr = c10::cuda::getCurrentCUDAStream().stream();
  return a;
}

std::tuple<at::Tensor, at::Tensor> block_attention_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& cu_in, const at::Tensor& block_in, const at::Tensor& stream_in, bool full,
    std::optional<double> scale) {
  const c10::cuda::CUDAGuard guard(q_in.device());  // streams and launches on q's device
  const AttnDims d = check_block_attention(q_in, k_in, v_in, cu_in, block_in, stream_in, scale,
                                           kHostValueChecks);
  check_head_dim(kBlockOp, d.D);
  half_dtype(kBlockOp, q_in);
  auto q = aligned(q_in), k = aligned(k_in), v = aligned(v_in);
  auto cu = cu_in.contiguous(), block = block_in.contiguous(), stream = stream_in.contiguous();
  Tiles tiles = make_tiles(q, d.T, d.S);
  auto a = attn_args(q, k, v, cu, block, stream, full, d, tiles);
  check_launch(cuda::launch_tile_table(a));
  auto out = at::empty_like(q);
  auto lse = at::empty({d.Hq, d.T}, q.options().dtype(at::kFloat));
  check_launch(cuda::launch_block_attention_fwd(a, out.data_ptr(), lse.data_ptr<float>()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& cu_in, const at::Tensor& block_in, const at::Tensor& stream_in, bool full,
    std::optional<double> scale) {
  const c10::cuda::CUDAGuard guard(q_in.device());  // streams and launches on q's device
  const AttnDims d = check_block_attention(q_in, k_in, v_in, cu_in, block_in, stream_in, scale,
                                           kHostValueChecks);
  check_head_dim(kBlockOp, d.D);
  TORCH_CHECK_VALUE(grad_out.sizes() == q_in.sizes() && out.sizes() == q_in.sizes(),
                    "dlmkern.block_attention_backward: `grad_out` and `out` must match q's shape");
  TORCH_CHECK_VALUE(lse.dim() == 2 && lse.size(0) == d.Hq && lse.size(1) == d.T &&
                        lse.scalar_type() == at::kFloat,
                    "dlmkern.block_attention_backward: `lse` must be float32 [Hq, T]");
  auto q = aligned(q_in), k = aligned(k_in), v = aligned(v_in);
  auto dout = aligned(grad_out.to(q.scalar_type()));
  auto cu = cu_in.contiguous(), block = block_in.contiguous(), stream = stream_in.contiguous();
  auto delta = (dout.to(at::kFloat) * out.to(at::kFloat)).sum(-1).t().contiguous();
  Tiles tiles = make_tiles(q, d.T, d.S);
  auto a = attn_args(q, k, v, cu, block, stream, full, d, tiles);
  check_launch(cuda::launch_tile_table(a));
  auto dq = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
  auto dk = at::empty_like(k), dv = at::empty_like(v);
  check_launch(cuda::launch_block_attention_bwd(a, dout.const_data_ptr(),
                                                lse.contiguous().const_data_ptr<float>(),
                                                delta.const_data_ptr<float>(),
                                                dq.data_ptr<float>(), dk.data_ptr(),
                                                dv.data_ptr()));
  return {dq.to(q.scalar_type()), dk, dv};
}

at::Tensor decode_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_new_in,
                                 const at::Tensor& v_new_in, at::Tensor& k_cache,
                                 at::Tensor& v_cache, at::Tensor& cache_seqlens,
                                 const at::Tensor& cu_in, bool commit,
                                 std::optional<double> scale) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  constexpr const char* op = "dlmkern.decode_attention";
  const AttnDims d = check_decode_attention(q_in, k_new_in, v_new_in, k_cache, v_cache,
                                            cache_seqlens, cu_in, commit, scale,
                                            kHostValueChecks);
  check_head_dim(op, d.D);
  TORCH_CHECK_VALUE(cache_seqlens.is_contiguous(), op, ": `cache_seqlens` must be contiguous");
  auto q = q_in.contiguous(), kn = k_new_in.contiguous(), vn = v_new_in.contiguous();
  auto cu = cu_in.contiguous();
  const int splits = cuda::decode_num_splits(k_cache.size(1));
  auto ws = at::empty({cuda::decode_workspace_floats(d.T, static_cast<int>(d.Hq),
                                                     static_cast<int>(d.D), splits)},
                      q.options().dtype(at::kFloat));
  auto out = at::empty_like(q);
  cuda::DecodeArgs a{};
  a.dtype = half_dtype(op, q);
  a.q = q.const_data_ptr();
  a.k_new = kn.const_data_ptr();
  a.v_new = vn.const_data_ptr();
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  a.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  a.cu_seqlens_q = cu.const_data_ptr<int32_t>();
  a.T = d.T;
  a.max_len = k_cache.size(1);
  a.num_seqs = static_cast<int>(d.S);
  a.Hq = static_cast<int>(d.Hq);
  a.Hkv = static_cast<int>(d.Hkv);
  a.D = static_cast<int>(d.D);
  a.scale = static_cast<float>(d.scale);
  a.commit = commit;
  a.workspace = ws.data_ptr<float>();
  a.out = out.data_ptr();
  a.error_flag = flag_ptr(glue_error_flag(q));
  a.stream_ptr = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(cuda::launch_decode_attention(a));
  return out;
}

}  // namespace

DLMKERN_CUDA_IMPL(m) {
  m.impl("block_attention", &block_attention_cuda);
  m.impl("block_attention_backward", &block_attention_backward_cuda);
  m.impl("decode_attention", &decode_attention_cuda);
}

}  // namespace dlmkern
