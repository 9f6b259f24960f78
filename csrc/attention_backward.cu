// Flash attention's backward on the tensor cores (the design: attention.cu's header and csrc/README.md):
// deterministic, in two passes that need no atomics, dK/dV per key block (AttnBwdKv) and dQ per query block
// (AttnBwdQ), after delta_i = dO_i . O_i - dlse_i (AttnDelta).
#include "attention.h"

namespace fl {
inline namespace FL_IMPL {

// ================================================================================================
// Backward, dQ: 64 query rows a block over the key tiles they see (the forward's range), K and V
// double-buffered; dQ stays in registers (no atomics: the backward is deterministic).
template <class T, int D, int N>
struct AttnBwdQ {
  using Params = AttnParams;
  static constexpr int kMaxThreads = kAttnThreads, kStride = D + 8, kM = kAttnRows;
  static constexpr int kSmemFloats = (2 * kM + 4 * N) * kStride * int(sizeof(T)) / 4;  // Q, dO, K x 2, V x 2
  struct State {
    float dq[D / 8][4];
    float s[N / 8][4];       // S, then P
    float dp[N / 8][4];      // dP, then dS
    uint32_t pa[N / 16][4];  // dS as A fragments
    uint32_t fa[4], fb[4];
    float lse2[2], delta[2];  // rows g, g + 8: lse in log2 units, delta
  };

  template <class Blk>
  static FL_BODY void body(Blk& b, const Params& p) {
    const int bh = b.ctx.bx, b_ = bh / p.heads, h = bh % p.heads, hk = h / (p.heads / p.heads_kv);
    const Seq s = seq_of(p, b_, h);
    const int m0 = b.ctx.by * kM;
    if (m0 >= s.q_len) return;
    int lo = 0;
    const int n_tiles = key_tiles<N>(p, s, m0, kM, &lo);
    const uint8_t* kpm = p.key_padding ? p.key_padding + b_ * p.kpm_stride : nullptr;
    const uint64_t seed = p.seed ? uint64_t(*p.seed) : 0;
    const float scale2 = p.scale * kLog2e;

    T* qs = b.template shared_as<T>();
    T* dos = qs + kM * kStride;
    T* const ks = qs + 2 * kM * kStride;            // double buffers: + (t & 1) N kStride
    T* const vs = qs + (2 * kM + 2 * N) * kStride;
    const T* kg = row_at<const T>(p.k, p.k_stride, s.b, hk, s.k0);
    const T* vg = row_at<const T>(p.v, p.v_stride, s.b, hk, s.k0);
    auto issue_kv = [&](const Ctx& c, int t) {
      const int n0 = lo + t * N;
      copy_tile<T, D, kStride, kAttnThreads>(b, c, ks + (t & 1) * N * kStride, kg + n0 * p.k_stride[2], p.k_stride[2], N, s.k_len - n0,
                               p.head_dim, p.k);
      copy_tile<T, D, kStride, kAttnThreads>(b, c, vs + (t & 1) * N * kStride, vg + n0 * p.v_stride[2], p.v_stride[2], N, s.k_len - n0,
                               p.head_dim_v, p.v);
    };
    b.each([&](const Ctx& c, State& st) {
      copy_tile<T, D, kStride, kAttnThreads>(b, c, qs, row_at<const T>(p.q, p.q_stride, s.b, h, s.q0 + m0), p.q_stride[2], kM,
                               s.q_len - m0, p.head_dim, p.q);
      copy_tile<T, D, kStride, kAttnThreads>(b, c, dos, row_at<const T>(p.dout, p.do_stride, s.b, h, s.q0 + m0), p.do_stride[2],
                               kM, s.q_len - m0, p.head_dim_v, p.dout);
      if (n_tiles > 0) issue_kv(c, 0);
      b.cp_async_commit();
      const int row0 = m0 + (c.tid >> 5) * 16 + ((c.tid & 31) >> 2);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int qi = row0 + 8 * r;
        const bool ok = qi < s.q_len;
        st.lse2[r] = ok ? *row_at<const float>(p.lse, p.lse_stride, s.b, h, s.q0 + qi) * kLog2e : 0.0f;
        st.delta[r] = ok ? *row_at<const float>(p.delta, p.lse_stride, s.b, h, s.q0 + qi) : 0.0f;
      }
#pragma unroll
      for (int d = 0; d < D / 8; ++d)
#pragma unroll
        for (int i = 0; i < 4; ++i) st.dq[d][i] = 0.0f;
    });

    for (int t = 0; t < n_tiles; ++t) {
      const int n0 = lo + t * N;
      prefetch_next(b, t, n_tiles, issue_kv);
      b.sync();
      const T* kt = ks + (t & 1) * N * kStride;
      const T* vt = vs + (t & 1) * N * kStride;
      b.each([&](const Ctx&, State& st) { zero(st.s); zero(st.dp); });
      // S = Q K^T
      mma_abt<T, D, N, kStride, kStride>(b, qs, kt, [](State& st) { return st.s; });
      // dP = dO V^T
      mma_abt<T, D, N, kStride, kStride>(b, dos, vt, [](State& st) { return st.dp; });
      // dS = P (dP D - delta), P = 2^(t - lse2) where visible
      b.each([&](const Ctx& c, State& st) {
        const int lane = c.tid & 31, row0 = m0 + (c.tid >> 5) * 16;
#pragma unroll
        for (int j = 0; j < N / 8; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int qi = row0 + mma_c_row(lane, i), kj = n0 + j * 8 + mma_c_col(lane, i), r = i >> 1;
            float pv = 0.0f, dpv = st.dp[j][i];
            if (visible(p, s, kpm, qi, kj)) pv = exp2(st.s[j][i] * scale2 - st.lse2[r]);
            if (p.dropout_p > 0.0f)
              dpv = dropout_keep(p, seed, s.b, h, qi, kj) ? dpv / (1.0f - p.dropout_p) : 0.0f;
            st.dp[j][i] = pv * (dpv - st.delta[r]);
          }
        pack_a<T, N>(st.pa, st.dp);
      });
      // dQ += dS K
      mma_pb<T, N, D, kStride>(b, kt, [](State& st) { return st.pa; },
                              [](State& st) { return st.dq; });
      b.sync();
    }

    b.each([&](const Ctx& c, State& st) {
      b.template cp_async_wait<0>();
      const int lane = c.tid & 31, g = lane >> 2, tq = lane & 3, row0 = m0 + (c.tid >> 5) * 16;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int qi = row0 + g + 8 * r;
        if (qi >= s.q_len) continue;
        T* out = row_at<T>(p.dq, p.dq_stride, s.b, h, s.q0 + qi);
#pragma unroll
        for (int d = 0; d < D / 8; ++d) {
          const int col = d * 8 + 2 * tq;
          if (col < p.head_dim) {
            const uint32_t v = pack2<T>(st.dq[d][2 * r] * p.scale, st.dq[d][2 * r + 1] * p.scale);
            store_pair<T>(out + col, v);
          }
        }
      }
    });
  }
};

// ================================================================================================
// Backward, dK and dV: 64 keys a block (warp w: keys 16 w ..; the scores transposed, S^T = K Q^T, so that
// dV = P^T dO and dK = dS^T Q accumulate in the mma's rows) over every query tile of every query head
// reading this K/V head that sees one of its keys. kWhat: 1 dV, 2 dK, 3 both.
template <class T, int D, int M, int kWhat>
struct AttnBwdKv {
  using Params = AttnParams;
  static constexpr bool kDV = (kWhat & 1) != 0, kDK = (kWhat & 2) != 0;
  static constexpr int kMaxThreads = kAttnThreads, kStride = D + 8, kN = kAttnRows;
  // K, V, Q x 2, dO x 2 (T); then per query of the tile lse (log2 units) and delta, x 2 (float32)
  static constexpr int kSmemFloats = (2 * kN + 4 * M) * kStride * int(sizeof(T)) / 4 + 2 * 2 * M;
  struct State {
    float dk[kDK ? D / 8 : 1][4];
    float dv[kDV ? D / 8 : 1][4];
    float s[M / 8][4];              // S^T, then P^T dropped (dV's operand)
    float dp[kDK ? M / 8 : 1][4];   // dP^T, then dS^T
    uint32_t pa[M / 16][4];
    uint32_t fa[4], fb[4];
  };

  template <class Blk>
  static FL_BODY void body(Blk& b, const Params& p) {
    const int bh = b.ctx.bx, b_ = bh / p.heads_kv, hk = bh % p.heads_kv, group = p.heads / p.heads_kv;
    const Seq s = seq_of(p, b_, hk);
    const int n0 = b.ctx.by * kN;
    if (n0 >= s.k_len) return;
    // Query rows that see a key of [n0, n0 + kN): causal and the window bound them; whole tiles of M.
    int lo = 0, hi = s.q_len;
    if (p.causal) lo = max_i(lo, n0 - s.shift);
    if (p.window_right >= 0) lo = max_i(lo, n0 - s.shift - p.window_right);
    if (p.window_left >= 0) hi = min_i(hi, n0 + kN - s.shift + p.window_left);
    lo = lo / M * M;
    const int per_head = hi > lo ? (hi - lo + M - 1) / M : 0, n_iters = group * per_head;
    const uint8_t* kpm = p.key_padding ? p.key_padding + b_ * p.kpm_stride : nullptr;
    const uint64_t seed = p.seed ? uint64_t(*p.seed) : 0;
    const float scale2 = p.scale * kLog2e;

    T* ks = b.template shared_as<T>();
    T* vs = ks + kN * kStride;
    T* const qs = ks + 2 * kN * kStride;             // double buffers: + (it & 1) M kStride
    T* const dos = ks + (2 * kN + 2 * M) * kStride;
    float* const stats = b.shared() + (2 * kN + 4 * M) * kStride * int(sizeof(T)) / 4;  // + (it & 1) 2 M
    auto issue_q = [&](const Ctx& c, int it) {
      const int h = hk * group + it / per_head, m0 = lo + it % per_head * M;
      copy_tile<T, D, kStride, kAttnThreads>(b, c, qs + (it & 1) * M * kStride, row_at<const T>(p.q, p.q_stride, s.b, h, s.q0 + m0),
                               p.q_stride[2], M, s.q_len - m0, p.head_dim, p.q);
      copy_tile<T, D, kStride, kAttnThreads>(b, c, dos + (it & 1) * M * kStride, row_at<const T>(p.dout, p.do_stride, s.b, h, s.q0 + m0),
                               p.do_stride[2], M, s.q_len - m0, p.head_dim_v, p.dout);
      // the tile's lse (in log2 units) and delta, read once here instead of per score (plain loads: the
      // barrier before the tile is used publishes them, as it does the copies)
      if (c.tid < M) {
        const int qi = m0 + c.tid;
        const bool ok = qi < s.q_len;
        float* st = stats + (it & 1) * 2 * M;
        st[c.tid] = ok ? *row_at<const float>(p.lse, p.lse_stride, s.b, h, s.q0 + qi) * kLog2e : 0.0f;
        st[M + c.tid] = ok ? *row_at<const float>(p.delta, p.lse_stride, s.b, h, s.q0 + qi) : 0.0f;
      }
    };
    b.each([&](const Ctx& c, State& st) {
      copy_tile<T, D, kStride, kAttnThreads>(b, c, ks, row_at<const T>(p.k, p.k_stride, s.b, hk, s.k0 + n0), p.k_stride[2], kN,
                               s.k_len - n0, p.head_dim, p.k);
      copy_tile<T, D, kStride, kAttnThreads>(b, c, vs, row_at<const T>(p.v, p.v_stride, s.b, hk, s.k0 + n0), p.v_stride[2], kN,
                               s.k_len - n0, p.head_dim_v, p.v);
      if (n_iters > 0) issue_q(c, 0);
      b.cp_async_commit();
#pragma unroll
      for (int d = 0; d < D / 8; ++d)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if constexpr (kDK) st.dk[d][i] = 0.0f;
          if constexpr (kDV) st.dv[d][i] = 0.0f;
        }
    });

    for (int it = 0; it < n_iters; ++it) {
      const int h = hk * group + it / per_head, m0 = lo + it % per_head * M;
      const Seq sq = seq_of(p, b_, h);
      prefetch_next(b, it, n_iters, issue_q);
      b.sync();
      const T* qt = qs + (it & 1) * M * kStride;
      const T* dot = dos + (it & 1) * M * kStride;
      b.each([&](const Ctx&, State& st) {
#pragma unroll
        for (int j = 0; j < M / 8; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            st.s[j][i] = 0.0f;
            if constexpr (kDK) st.dp[j][i] = 0.0f;
          }
      });
      // S^T = K Q^T and dP^T = V dO^T (rows: this warp's keys; columns: the tile's queries)
      mma_abt<T, D, M, kStride, kStride>(b, ks, qt, [](State& st) { return st.s; });
      if constexpr (kDK) mma_abt<T, D, M, kStride, kStride>(b, vs, dot, [](State& st) { return st.dp; });
      // P^T = 2^(t - lse2) where visible; dV's operand P^T D, dK's dS^T = P^T (dP^T D - delta)
      const float* lse2 = stats + (it & 1) * 2 * M;
      const float* delta = lse2 + M;
      b.each([&](const Ctx& c, State& st) {
        const int lane = c.tid & 31, key0 = n0 + (c.tid >> 5) * 16;
#pragma unroll
        for (int j = 0; j < M / 8; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int kj = key0 + mma_c_row(lane, i), col = j * 8 + mma_c_col(lane, i), qi = m0 + col;
            float pv = 0.0f, keep = 1.0f;
            if (visible(p, sq, kpm, qi, kj)) {
              pv = exp2(st.s[j][i] * scale2 - lse2[col]);
              if (p.dropout_p > 0.0f)
                keep = dropout_keep(p, seed, sq.b, h, qi, kj) ? 1.0f / (1.0f - p.dropout_p) : 0.0f;
              if constexpr (kDK)
                st.dp[j][i] = pv * (st.dp[j][i] * keep - delta[col]);
            } else if constexpr (kDK) {
              st.dp[j][i] = 0.0f;
            }
            st.s[j][i] = pv * keep;
          }
        if constexpr (kDV) pack_a<T, M>(st.pa, st.s);
      });
      if constexpr (kDV) {  // dV += (P^T D) dO
        mma_pb<T, M, D, kStride>(b, dot, [](State& st) { return st.pa; },
                                [](State& st) { return st.dv; });
      }
      if constexpr (kDK) {  // dK += dS^T Q
        b.each([&](const Ctx&, State& st) {
          pack_a<T, M>(st.pa, st.dp);
        });
        mma_pb<T, M, D, kStride>(b, qt, [](State& st) { return st.pa; },
                                [](State& st) { return st.dk; });
      }
      b.sync();
    }

    b.each([&](const Ctx& c, State& st) {
      b.template cp_async_wait<0>();
      const int lane = c.tid & 31, g = lane >> 2, tq = lane & 3, key0 = n0 + (c.tid >> 5) * 16;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int kj = key0 + g + 8 * r;
        if (kj >= s.k_len) continue;
#pragma unroll
        for (int d = 0; d < D / 8; ++d) {
          const int col = d * 8 + 2 * tq;
          if constexpr (kDK) {
            if (col < p.head_dim) {
              const uint32_t v = pack2<T>(st.dk[d][2 * r] * p.scale, st.dk[d][2 * r + 1] * p.scale);
              store_pair<T>(row_at<T>(p.dk, p.dk_stride, s.b, hk, s.k0 + kj) + col, v);
            }
          }
          if constexpr (kDV) {
            if (col < p.head_dim_v) {
              const uint32_t v = pack2<T>(st.dv[d][2 * r], st.dv[d][2 * r + 1]);
              store_pair<T>(row_at<T>(p.dv, p.dv_stride, s.b, hk, s.k0 + kj) + col, v);
            }
          }
        }
      }
    });
  }
};

// ================================================================================================
// The backward's delta_i = dO_i . O_i - dlse_i: a thread a row, float32 products summed in order.
template <class T>
struct AttnDelta {
  using Params = DeltaParams;
  static constexpr int kThreads = 128, kMaxThreads = kThreads, kSmemFloats = 0;
  struct State {
    float red[2];
  };
  template <class Blk>
  static FL_BODY void body(Blk& b, const Params& p) {
    const int bh = b.ctx.bx, b_ = bh / p.heads, h = bh % p.heads;
    int64_t row0 = 0;
    int len = p.rows;
    if (p.cu_seqlens != nullptr) {
      row0 = p.cu_seqlens[b_];
      len = int(p.cu_seqlens[b_ + 1] - row0);
    }
    b.each([&](const Ctx& c, State&) {
      const int row = b.ctx.by * kThreads + c.tid;
      if (row >= len) return;
      const T* d = static_cast<const T*>(p.dout) + b_ * p.do_stride[0] + h * p.do_stride[1] + (row0 + row) * p.do_stride[2];
      const T* o = static_cast<const T*>(p.out) + b_ * p.o_stride[0] + h * p.o_stride[1] + (row0 + row) * p.o_stride[2];
      float acc = 0.0f;
      for (int e = 0; e < p.head_dim; ++e) acc += to_float(d[e]) * to_float(o[e]);
      const int64_t at = b_ * p.stat_stride[0] + h * p.stat_stride[1] + (row0 + row) * p.stat_stride[2];
      p.delta[at] = acc - (p.dlse ? p.dlse[at] : 0.0f);
    });
  }
};

template <class T>
void attention_delta_typed(const DeltaParams& p, Stream stream) {
  launch<AttnDelta<T>>(p.batch * p.heads, (p.rows + 127) / 128, AttnDelta<T>::kThreads, p, stream);
}

template <class T, int D>
void attention_bwd_typed(const AttnParams& p, Stream stream) {
  const int kv_x = p.batch * p.heads_kv, kv_y = (p.len_k + kAttnRows - 1) / kAttnRows;
  if constexpr (D == 64) {
    launch<AttnBwdKv<T, D, 64, 3>>(kv_x, kv_y, kAttnThreads, p, stream);
  } else if constexpr (D <= 128) {  // (D = 32 too: at M = 64 ptxas spilled 4-12 bytes there)
    launch<AttnBwdKv<T, D, 32, 3>>(kv_x, kv_y, kAttnThreads, p, stream);
  } else {  // both accumulators would take 256 registers a thread: dV, then dK
    launch<AttnBwdKv<T, D, 32, 1>>(kv_x, kv_y, kAttnThreads, p, stream);
    launch<AttnBwdKv<T, D, 32, 2>>(kv_x, kv_y, kAttnThreads, p, stream);
  }
  // dQ: N = 32 keys a tile from D = 128 (104 KB of shared memory at N = 64; 68 KB fits the 99 KB of sm_86 / 89)
  launch<AttnBwdQ<T, D, D <= 64 ? 64 : 32>>(p.batch * p.heads, (p.len_q + kAttnRows - 1) / kAttnRows,
                                             kAttnThreads, p, stream);
}

}  // namespace FL_IMPL

#if defined(__CUDACC__)
namespace cuda {
void attention_bwd(const AttnParams& p, cudaStream_t stream) { FL_ATTN_DISPATCH(p, attention_bwd_typed, stream); }
void attention_delta(const DeltaParams& p, cudaStream_t stream) {
  FL_DISPATCH_HALF(p.dtype, T, attention_delta_typed<T>(p, stream));
}
}  // namespace cuda
#else
namespace cpu {
void attention_bwd(const AttnParams& p) { FL_ATTN_DISPATCH(p, attention_bwd_typed, nullptr); }
void attention_delta(const DeltaParams& p) {
  FL_DISPATCH_HALF(p.dtype, T, attention_delta_typed<T>(p, nullptr));
}
}  // namespace cpu
#endif

}  // namespace fl
