// CPU kernels of block_attention (forward / backward) and decode_attention. Flash-style: for each
// query tile, the key tiles that can be visible are merged into runs; each run is one GEMM for
// the scores and one for the output, with an online softmax in between. Tiles with no visible
// pair are never touched, so the work grows with the visible pairs, and no T x T mask exists.
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "attention.h"
#include "cpu/vec_math.h"
#include "dlmkern/block_mask.h"
#include "dlmkern/softmax_nan.h"

namespace dlmkern {
namespace {

constexpr int64_t kQTile = 64;   // query rows per job
constexpr int64_t kKTile = 64;   // key granularity of the visibility metadata
constexpr int64_t kMaxRun = 512;  // keys per GEMM run
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr const char* kOp = "dlmkern.block_attention";

struct Run {
  int64_t k0, nk;  // absolute first key, number of keys
  bool needs_mask;
};

// Tile metadata of one sequence at query-tile and key-tile granularity.
struct SeqMeta {
  SeqTiles q, k;
};

// Runs of consecutive visible key tiles for query tile qt of a sequence.
std::vector<Run> visible_runs(const SeqMeta& sm, int64_t qt, bool full) {
  std::vector<Run> runs;
  const SeqTiles& st = sm.k;
  const int64_t n_k = static_cast<int64_t>(st.tiles.size());
  for (int64_t kt = 0; kt < n_k; ++kt) {
    const int vis = full ? kTileFull : tile_visibility(sm.q.tiles[qt], st.tiles[kt]);
    if (vis == kTileNone) continue;
    const int64_t k0 = st.start + kt * kKTile;
    const int64_t nk = std::min(kKTile, st.start + st.len - k0);
    if (!runs.empty() && runs.back().k0 + runs.back().nk == k0 && runs.back().nk + nk <= kMaxRun) {
      runs.back().nk += nk;
      runs.back().needs_mask |= vis == kTilePartial;
    } else {
      runs.push_back(Run{k0, nk, vis == kTilePartial});
    }
  }
  return runs;
}

// Detached fp32 contiguous copy (or view): the GEMMs below write into scratch with out=, which
// autograd forbids on tensors that require grad; worker threads do not inherit dispatch guards.
at::Tensor f32(const at::Tensor& t) { return t.detach().to(at::kFloat).contiguous(); }

// Rows x cols view at the start of a flat fp32 scratch buffer.
at::Tensor scratch(const at::Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

struct Meta {
  const int32_t* block;
  const int32_t* stream;
  bool full;
  bool visible(int64_t q, int64_t k) const {
    return full || block_visible(block[q], stream[q], block[k], stream[k]);
  }
};

std::vector<SeqMeta> host_tiles(const at::Tensor& cu_seqlens, const at::Tensor& block,
                                const at::Tensor& stream, bool full, int64_t S) {
  auto cu = cu_seqlens.contiguous();
  const int32_t* b = full ? nullptr : block.const_data_ptr<int32_t>();
  const int32_t* r = full ? nullptr : stream.const_data_ptr<int32_t>();
  auto qt = make_seq_tiles(cu.const_data_ptr<int32_t>(), S, b, r, kQTile);
  auto kt = make_seq_tiles(cu.const_data_ptr<int32_t>(), S, b, r, kKTile);
  std::vector<SeqMeta> seqs(S);
  for (int64_t s = 0; s < S; ++s) seqs[s] = SeqMeta{std::move(qt[s]), std::move(kt[s])};
  return seqs;
}

// Per (sequence, query tile) job list.
std::vector<std::pair<int64_t, int64_t>> query_jobs(const std::vector<SeqMeta>& seqs) {
  std::vector<std::pair<int64_t, int64_t>> jobs;
  for (int64_t s = 0; s < static_cast<int64_t>(seqs.size()); ++s)
    for (int64_t t = 0; t < static_cast<int64_t>(seqs[s].q.tiles.size()); ++t)
      jobs.emplace_back(s, t);
  return jobs;
}

std::tuple<at::Tensor, at::Tensor> block_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
    const at::Tensor& block, const at::Tensor& stream, bool full, std::optional<double> scale) {
  const AttnDims d = check_block_attention(q, k, v, cu_seqlens, block, stream, scale, true);
  // Trusted layouts skip the checks above; the values are on the host here, so check them anyway.
  if (!d.values_checked) check_layout_values(kOp, cu_seqlens, stream, d.T);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto qf = f32(q), kf = f32(k), vf = f32(v);
  auto blk = block.contiguous(), str = stream.contiguous();
  const auto seqs = host_tiles(cu_seqlens, blk, str, full, d.S);
  const auto jobs = query_jobs(seqs);
  const Meta meta{blk.const_data_ptr<int32_t>(), str.const_data_ptr<int32_t>(), full};
  const int64_t group = d.Hq / d.Hkv, D = d.D;
  const float sc = static_cast<float>(d.scale);
  auto out = at::zeros({d.T, d.Hq, D}, qf.options());
  auto lse = at::full({d.Hq, d.T}, kNegInf, qf.options());
  float* lse_p = lse.data_ptr<float>();
  const int64_t n_jobs = static_cast<int64_t>(jobs.size()) * d.Hq;

  at::parallel_for(0, n_jobs, 1, [&](int64_t begin, int64_t end) {
    auto sbuf = at::empty({kQTile * kMaxRun}, qf.options());
    auto acc = at::empty({kQTile, D}, qf.options());
    std::vector<float> m(kQTile), l(kQTile);
    for (int64_t job = begin; job < end; ++job) {
      const auto [s, qt] = jobs[job / d.Hq];
      const int64_t h = job % d.Hq, hk = h / group;
      const SeqMeta& sm = seqs[s];
      const SeqTiles& st = sm.q;
      const int64_t q0 = st.start + qt * kQTile, nq = std::min(kQTile, st.start + st.len - q0);
      auto qt_v = qf.narrow(0, q0, nq).select(1, h);
      auto a = acc.narrow(0, 0, nq);
      a.zero_();
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.f);
      float* ap = a.data_ptr<float>();
      for (const Run& r : visible_runs(sm, qt, full)) {
        auto sc_t = scratch(sbuf, nq, r.nk);
        at::mm_out(sc_t, qt_v, kf.narrow(0, r.k0, r.nk).select(1, hk).t());
        float* sp = sc_t.data_ptr<float>();
        for (int64_t i = 0; i < nq; ++i) {
          float* row = sp + i * r.nk;
          if (r.needs_mask) {
            cpu::mask_row(row, r.nk, meta.block[q0 + i], meta.stream[q0 + i], meta.block + r.k0,
                     meta.stream + r.k0);
          }
          const float mx = nan_max(m[i], cpu::scale_and_max(row, r.nk, sc));
          if (mx == kNegInf) {  // nothing visible yet for this row
            std::fill(row, row + r.nk, 0.f);
            continue;
          }
          const float alpha = cpu::fast_exp(m[i] - mx);  // 0 when m[i] = -inf, NaN if mx is
          l[i] = l[i] * alpha + cpu::exp_shift_sum(row, r.nk, mx);
          m[i] = mx;
          cpu::scale_row(ap + i * D, D, alpha);
        }
        a.addmm_(sc_t, vf.narrow(0, r.k0, r.nk).select(1, hk));
      }
      auto o = out.narrow(0, q0, nq).select(1, h);
      for (int64_t i = 0; i < nq; ++i) {
        if (l[i] != 0.f) {  // a row that saw nothing keeps 0 / -inf; a NaN row gives NaN
          const float inv = softmax_inv(l[i]);
          float* orow = o[i].data_ptr<float>();
          for (int64_t c = 0; c < D; ++c) orow[c] = ap[i * D + c] * inv;
          lse_p[h * d.T + q0 + i] = softmax_lse(m[i], l[i]);
        }
      }
    }
  });
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens,
    const at::Tensor& block, const at::Tensor& stream, bool full, std::optional<double> scale) {
  const AttnDims d = check_block_attention(q, k, v, cu_seqlens, block, stream, scale, true);
  // Trusted layouts skip the checks above; the values are on the host here, so check them anyway.
  if (!d.values_checked) check_layout_values(kOp, cu_seqlens, stream, d.T);
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
                    "dlmkern.block_attention_backward: `grad_out` and `out` must match q's shape");
  TORCH_CHECK_VALUE(lse.dim() == 2 && lse.size(0) == d.Hq && lse.size(1) == d.T &&
                        lse.scalar_type() == at::kFloat,
                    "dlmkern.block_attention_backward: `lse` must be float32 [Hq, T]");
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto qf = f32(q), kf = f32(k), vf = f32(v), dof = f32(grad_out);
  auto delta = (dof * f32(out)).sum(-1).t().contiguous();  // [Hq, T]
  auto lse_c = lse.contiguous();
  auto blk = block.contiguous(), str = stream.contiguous();
  const auto seqs = host_tiles(cu_seqlens, blk, str, full, d.S);
  const Meta meta{blk.const_data_ptr<int32_t>(), str.const_data_ptr<int32_t>(), full};
  const int64_t group = d.Hq / d.Hkv;
  const float sc = static_cast<float>(d.scale);
  auto dq = at::zeros_like(qf), dk = at::zeros_like(kf), dv = at::zeros_like(vf);
  const float* lse_p = lse_c.const_data_ptr<float>();
  const float* delta_p = delta.const_data_ptr<float>();

  // One job per (sequence, kv head): it owns dk / dv of that head and dq of its query heads.
  at::parallel_for(0, d.S * d.Hkv, 1, [&](int64_t begin, int64_t end) {
    auto pbuf = at::empty({kQTile * kMaxRun}, qf.options());
    auto dpbuf = at::empty({kQTile * kMaxRun}, qf.options());
    for (int64_t job = begin; job < end; ++job) {
      const int64_t s = job / d.Hkv, hk = job % d.Hkv;
      const SeqMeta& sm = seqs[s];
      const SeqTiles& st = sm.q;
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t qt = 0; qt < static_cast<int64_t>(st.tiles.size()); ++qt) {
          const int64_t q0 = st.start + qt * kQTile;
          const int64_t nq = std::min(kQTile, st.start + st.len - q0);
          auto q_t = qf.narrow(0, q0, nq).select(1, h);
          auto do_t = dof.narrow(0, q0, nq).select(1, h);
          auto dq_t = dq.narrow(0, q0, nq).select(1, h);
          for (const Run& r : visible_runs(sm, qt, full)) {
            auto k_r = kf.narrow(0, r.k0, r.nk).select(1, hk);
            auto v_r = vf.narrow(0, r.k0, r.nk).select(1, hk);
            auto p = scratch(pbuf, nq, r.nk), dp = scratch(dpbuf, nq, r.nk);
            at::mm_out(p, q_t, k_r.t());
            at::mm_out(dp, do_t, v_r.t());
            float* pp = p.data_ptr<float>();
            float* dpp = dp.data_ptr<float>();
            for (int64_t i = 0; i < nq; ++i) {
              const float li = lse_p[h * d.T + q0 + i], di = delta_p[h * d.T + q0 + i];
              float* prow = pp + i * r.nk;
              float* dprow = dpp + i * r.nk;
              if (li == kNegInf) {  // the row saw nothing: no gradient
                std::fill(prow, prow + r.nk, 0.f);
                std::fill(dprow, dprow + r.nk, 0.f);
                continue;
              }
              if (r.needs_mask) {
                cpu::softmax_grad_row_masked(prow, dprow, r.nk, sc, li, di, meta.block[q0 + i],
                                             meta.stream[q0 + i], meta.block + r.k0,
                                             meta.stream + r.k0);
              } else {
                cpu::softmax_grad_row(prow, dprow, r.nk, sc, li, di);
              }
            }
            dv.narrow(0, r.k0, r.nk).select(1, hk).addmm_(p.t(), do_t);
            dq_t.addmm_(dp, k_r);
            dk.narrow(0, r.k0, r.nk).select(1, hk).addmm_(dp.t(), q_t);
          }
        }
      }
    }
  });
  const auto dt = q.scalar_type();
  return {dq.to(dt), dk.to(dt), dv.to(dt)};
}

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_new,
                                const at::Tensor& v_new, at::Tensor& k_cache, at::Tensor& v_cache,
                                at::Tensor& cache_seqlens, const at::Tensor& cu_seqlens_q,
                                bool commit, std::optional<double> scale) {
  const AttnDims d = check_decode_attention(q, k_new, v_new, k_cache, v_cache, cache_seqlens,
                                            cu_seqlens_q, commit, scale, true);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t group = d.Hq / d.Hkv, D = d.D;
  const float sc = static_cast<float>(d.scale);
  auto qf = f32(q), knf = f32(k_new), vnf = f32(v_new);
  auto cu = cu_seqlens_q.to(at::kLong).contiguous();
  auto lens = cache_seqlens.to(at::kLong).contiguous();
  const int64_t* cup = cu.const_data_ptr<int64_t>();
  const int64_t* lp = lens.const_data_ptr<int64_t>();
  auto out = at::zeros({d.T, d.Hq, D}, qf.options());

  // One job per (sequence, query head): scores against [cached prefix | own block] in two GEMMs.
  at::parallel_for(0, d.S * d.Hq, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t i = job / d.Hq, h = job % d.Hq, hk = h / group;
      const int64_t q0 = cup[i], nq = cup[i + 1] - cup[i], nc = lp[i];
      if (nq == 0) continue;
      auto q_t = qf.narrow(0, q0, nq).select(1, h);
      auto kc = k_cache[i].narrow(0, 0, nc).select(1, hk).to(at::kFloat);
      auto vc = v_cache[i].narrow(0, 0, nc).select(1, hk).to(at::kFloat);
      auto keys = at::cat({kc, knf.narrow(0, q0, nq).select(1, hk)});
      auto vals = at::cat({vc, vnf.narrow(0, q0, nq).select(1, hk)});
      auto s = at::mm(q_t, keys.t()).mul_(sc);
      // NaN / +inf scores give NaN rows (torch.softmax); a row whose scores are all -inf (inf
      // inputs) sees nothing and gives 0, like the CUDA kernel (dlmkern/softmax_nan.h).
      auto p = at::softmax(s, -1).masked_fill_(s.amax(-1, true) == kNegInf, 0.0);
      out.narrow(0, q0, nq).select(1, h).copy_(at::mm(p, vals));
    }
  });
  if (commit) {
    for (int64_t i = 0; i < d.S; ++i) {
      const int64_t q0 = cup[i], nq = cup[i + 1] - cup[i], nc = lp[i];
      if (nq == 0) continue;
      k_cache[i].narrow(0, nc, nq).copy_(k_new.narrow(0, q0, nq));
      v_cache[i].narrow(0, nc, nq).copy_(v_new.narrow(0, q0, nq));
    }
    cache_seqlens.add_((cu.narrow(0, 1, d.S) - cu.narrow(0, 0, d.S)).to(at::kInt));
  }
  return out.to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(dlmkern, CPU, m) {
  m.impl("block_attention", &block_attention_cpu);
  m.impl("block_attention_backward", &block_attention_backward_cpu);
  m.impl("decode_attention", &decode_attention_cpu);
}

}  // namespace dlmkern
