// Validation and tile metadata shared by the attention backends (SPEC 2.1 / 2.2).
#include "attention.h"

#include <c10/util/intrusive_ptr.h>

#include <atomic>
#include <cmath>
#include <mutex>
#include <string>
#include <unordered_map>

#include "checks.h"
#include "device_errors.h"

namespace dlmkern {
namespace {

// Layout tensors whose values were validated once (trust_layout). An entry holds a weak
// reference, so the TensorImpl's memory (and address) cannot be reused while it is listed, and
// the version counter at validation time: any in-place change makes the tensor untrusted again.
struct TrustedEntry {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> impl;
  int64_t version;
  int64_t tokens;
  // Where the values live: `t.data = other` or set_() swap these without always bumping the
  // version. (Writes through `.data` or a numpy alias bypass the version counter and are not
  // tracked: do not edit a built layout that way.)
  const void* data;
  int64_t numel, offset;
};

TrustedEntry make_entry(const at::Tensor& t, int64_t tokens) {
  return TrustedEntry{
      c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(t.getIntrusivePtr()),
      static_cast<int64_t>(t._version()), tokens, t.const_data_ptr(), t.numel(),
      t.storage_offset()};
}
std::mutex g_trust_mutex;
std::unordered_map<const c10::TensorImpl*, TrustedEntry> g_trusted;
std::atomic<int64_t> g_value_checks{0};

bool is_trusted(const at::Tensor& t, int64_t tokens) {
  if (t.is_inference()) return false;
  std::lock_guard<std::mutex> lock(g_trust_mutex);
  auto it = g_trusted.find(t.unsafeGetTensorImpl());
  if (it == g_trusted.end()) return false;
  const TrustedEntry& e = it->second;
  return !e.impl.expired() && e.version == static_cast<int64_t>(t._version()) &&
         e.tokens == tokens && e.data == t.const_data_ptr() && e.numel == t.numel() &&
         e.offset == t.storage_offset();
}

constexpr const char* kBlockOp = "dlmkern.block_attention";
constexpr const char* kDecodeOp = "dlmkern.decode_attention";

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const char* kname, const char* vname) {
  TORCH_CHECK_VALUE(q.dim() == 3, op, ": `q` must be [T, Hq, D], got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 3 && v.dim() == 3, op, ": `", kname, "` and `", vname,
                    "` must be [T, Hkv, D], got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK_TYPE(is_float_type(q.scalar_type()), op,
                   ": `q` must be float32, float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
                   ": `", kname, "` and `", vname, "` must have q's dtype ", q.scalar_type());
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), op, ": `", kname, "` and `", vname,
                    "` must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK_VALUE(k.size(0) == q.size(0), op, ": `", kname, "` must have ", q.size(0),
                    " tokens like `q`, got ", k.size(0));
  TORCH_CHECK_VALUE(k.size(2) == q.size(2), op, ": head dim of `", kname, "` (", k.size(2),
                    ") must equal q's (", q.size(2), ")");
  TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) > 0 && q.size(1) % k.size(1) == 0, op,
                    ": query heads (", q.size(1), ") must be a multiple of kv heads (", k.size(1),
                    ")");
  TORCH_CHECK_VALUE(k.device() == q.device() && v.device() == q.device(), op,
                    ": q, k and v must be on one device");
}

double resolve_scale(const char* op, std::optional<double> scale, int64_t D) {
  TORCH_CHECK_VALUE(D >= 1, op, ": `q` must have a head dimension D >= 1 (q is [T, H, D]), ",
                    "got D = ", D);
  const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
  TORCH_CHECK_VALUE(std::isfinite(s) && s > 0, op, ": `scale` must be finite and > 0, got ", s);
  return s;
}

void check_cu_seqlens(const char* op, const char* name, const at::Tensor& cu, int64_t total,
                      const at::Tensor& like, bool check_values) {
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, op, ": `", name, "` must be int32, got ",
                   cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 1, op, ": `", name,
                    "` must be 1-D [S + 1], got ", cu.sizes());
  TORCH_CHECK_VALUE(cu.device() == like.device(), op, ": `", name, "` must be on ",
                    like.device(), ", got ", cu.device());
  // Known from the shapes alone (with no sequence the kernels would see no token at all).
  TORCH_CHECK_VALUE(check_values || cu.size(0) >= 2 || total == 0, op, ": `", name,
                    "` holds no sequence (shape [1]) but there are ", total, " tokens");
  if (!check_values) return;
  auto c = read_to_host(cu, at::kLong);
  const int64_t* p = c.const_data_ptr<int64_t>();
  const int64_t n = c.size(0);
  TORCH_CHECK_VALUE(p[0] == 0, op, ": `", name, "`[0] must be 0, got ", p[0]);
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK_VALUE(p[i] >= p[i - 1], op, ": `", name, "` must be non-decreasing; ", name, "[",
                      i, "] = ", p[i], " < ", name, "[", i - 1, "] = ", p[i - 1]);
  }
  TORCH_CHECK_VALUE(p[n - 1] == total, op, ": `", name, "`[-1] must equal the number of tokens ",
                    total, ", got ", p[n - 1]);
}

void check_token_ids(const char* op, const char* name, const at::Tensor& t, int64_t T,
                     const at::Tensor& like) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, op, ": `", name, "` must be int32, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == T, op, ": `", name, "` must have shape [", T,
                    "] (one entry per token), got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": `", name, "` must be on ", like.device(),
                    ", got ", t.device());
}

}  // namespace

AttnDims check_block_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& cu_seqlens, const at::Tensor& block,
                               const at::Tensor& stream, std::optional<double> scale,
                               bool check_values) {
  check_qkv(kBlockOp, q, k, v, "k", "v");
  const int64_t T = q.size(0);
  // Layout tensors validated once by trust_layout skip the per-call value checks (on a GPU a
  // device -> host copy per call, i.e. per layer and pass in training).
  if (check_values && is_trusted(cu_seqlens, T) && is_trusted(stream, T)) check_values = false;
  if (check_values) ++g_value_checks;
  check_cu_seqlens(kBlockOp, "cu_seqlens", cu_seqlens, T, q, check_values);
  check_token_ids(kBlockOp, "block", block, T, q);
  check_token_ids(kBlockOp, "stream", stream, T, q);
  if (check_values && T > 0) {
    TORCH_CHECK_VALUE(read_item<int32_t>(stream.min()) >= 0, kBlockOp,
                      ": `stream` ids must be >= 0 (0 = clean, r >= 1 = noisy copy r)");
  }
  return AttnDims{T, q.size(1), k.size(1), q.size(2), cu_seqlens.size(0) - 1,
                  resolve_scale(kBlockOp, scale, q.size(2)), check_values};
}

AttnDims check_decode_attention(const at::Tensor& q, const at::Tensor& k_new,
                                const at::Tensor& v_new, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                const at::Tensor& cu_seqlens_q, bool commit,
                                std::optional<double> scale, bool check_values) {
  check_qkv(kDecodeOp, q, k_new, v_new, "k_new", "v_new");
  const int64_t T = q.size(0);
  check_cu_seqlens(kDecodeOp, "cu_seqlens_q", cu_seqlens_q, T, q, check_values);
  const int64_t S = cu_seqlens_q.size(0) - 1;
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), kDecodeOp,
                    ": `k_cache` and `v_cache` must both be [S, max_len, Hkv, D], got ",
                    k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK_VALUE(k_cache.size(0) == S && k_cache.size(2) == k_new.size(1) &&
                        k_cache.size(3) == q.size(2),
                    kDecodeOp, ": `k_cache` must be [", S, ", max_len, ", k_new.size(1), ", ",
                    q.size(2), "], got ", k_cache.sizes());
  TORCH_CHECK_TYPE(k_cache.scalar_type() == q.scalar_type() &&
                       v_cache.scalar_type() == q.scalar_type(),
                   kDecodeOp, ": `k_cache` and `v_cache` must have q's dtype ", q.scalar_type());
  TORCH_CHECK_VALUE(k_cache.device() == q.device() && v_cache.device() == q.device(), kDecodeOp,
                    ": the caches must be on q's device ", q.device());
  TORCH_CHECK_VALUE(k_cache.is_contiguous() && v_cache.is_contiguous(), kDecodeOp,
                    ": `k_cache` and `v_cache` must be contiguous");
  TORCH_CHECK_TYPE(cache_seqlens.scalar_type() == at::kInt, kDecodeOp,
                   ": `cache_seqlens` must be int32, got ", cache_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == S &&
                        cache_seqlens.device() == q.device(),
                    kDecodeOp, ": `cache_seqlens` must be [", S, "] on ", q.device(), ", got ",
                    cache_seqlens.sizes(), " on ", cache_seqlens.device());
  if (check_values && S > 0) {
    auto lens = read_to_host(cache_seqlens, at::kLong).contiguous();
    auto cu = read_to_host(cu_seqlens_q, at::kLong).contiguous();
    const int64_t* lp = lens.const_data_ptr<int64_t>();
    const int64_t* cp = cu.const_data_ptr<int64_t>();
    const int64_t max_len = k_cache.size(1);
    for (int64_t i = 0; i < S; ++i) {
      const int64_t n = lp[i];
      const int64_t blk = cp[i + 1] - cp[i];
      TORCH_CHECK_VALUE(n >= 0 && n <= max_len, kDecodeOp, ": cache_seqlens[", i, "] = ", n,
                        " is outside [0, ", max_len, "]");
      TORCH_CHECK_VALUE(!commit || n + blk <= max_len, kDecodeOp, ": committing ", blk,
                        " tokens to sequence ", i, " would overflow the cache (cache_seqlens[", i,
                        "] = ", n, " + ", blk, " > max_len ", max_len, "); nothing was written");
    }
  }
  return AttnDims{T, q.size(1), k_new.size(1), q.size(2), S,
                  resolve_scale(kDecodeOp, scale, q.size(2)), check_values};
}

void trust_layout(const at::Tensor& cu_seqlens, const at::Tensor& stream) {
  check_token_ids(kBlockOp, "stream", stream, stream.numel(), cu_seqlens);
  TORCH_CHECK_VALUE(stream.dim() == 1, kBlockOp, ": `stream` must be 1-D");
  // Off the CPU the kernels check every call on the device; validating here would be a sync.
  if (!cu_seqlens.is_cpu()) return;
  const int64_t T = stream.numel();
  check_cu_seqlens(kBlockOp, "cu_seqlens", cu_seqlens, T, stream, true);
  if (T > 0) {
    TORCH_CHECK_VALUE(read_item<int32_t>(stream.min()) >= 0, kBlockOp,
                      ": `stream` ids must be >= 0 (0 = clean, r >= 1 = noisy copy r)");
  }
  if (cu_seqlens.is_inference() || stream.is_inference()) return;  // no version counter
  std::lock_guard<std::mutex> lock(g_trust_mutex);
  for (auto it = g_trusted.begin(); it != g_trusted.end();) {  // drop dead entries
    it = it->second.impl.expired() ? g_trusted.erase(it) : std::next(it);
  }
  for (const at::Tensor* t : {&cu_seqlens, &stream}) {
    g_trusted.insert_or_assign(t->unsafeGetTensorImpl(), make_entry(*t, T));
  }
}

int64_t attention_value_checks() { return g_value_checks.load(); }

void check_layout_values(const char* op, const at::Tensor& cu_seqlens, const at::Tensor& stream,
                         int64_t T) {
  try {
    check_cu_seqlens(op, "cu_seqlens", cu_seqlens, T, stream, true);
    TORCH_CHECK_VALUE(T == 0 || read_item<int32_t>(stream.min()) >= 0, op,
                      ": `stream` ids must be >= 0 (0 = clean, r >= 1 = noisy copy r)");
  } catch (const c10::ValueError& e) {
    TORCH_CHECK_VALUE(false, e.msg(), " (this layout was validated when built, so its values "
                      "were changed behind torch's back, e.g. through `.data` or a numpy view)");
  }
}

std::vector<SeqTiles> make_seq_tiles(const int32_t* cu, int64_t num_seqs, const int32_t* block,
                                     const int32_t* stream, int64_t tile) {
  std::vector<SeqTiles> seqs(num_seqs);
  for (int64_t s = 0; s < num_seqs; ++s) {
    SeqTiles& st = seqs[s];
    st.start = cu[s];
    st.len = cu[s + 1] - cu[s];
    const int64_t n_tiles = (st.len + tile - 1) / tile;
    st.tiles.assign(n_tiles, tile_meta_empty());
    for (int64_t i = 0; i < st.len; ++i) {
      const int64_t t = st.start + i;
      tile_meta_add(st.tiles[i / tile], block ? block[t] : 0, stream ? stream[t] : 0);
    }
  }
  return seqs;
}

}  // namespace dlmkern
