// Flash attention on the tensor cores (mma.sync m16n8k16, ldmatrix, cp.async; sm_80 and later), dense and
// packed: causal, key padding, GQA, windows, dropout, lse. Forward, and a deterministic backward in two
// kernels (dK/dV per key block, dQ per query block: no atomics; attention_backward.cu).
//
// Math (per query row i, over the keys j it sees; s_ij = scale q_i . k_j, in base 2: t_ij = s_ij log2 e):
//   forward:  m = max_j t_ij (running), l = sum_j 2^(t_ij - m), o_i = sum_j 2^(t_ij - m) keep_ij / (1 - p) v_j / l,
//             lse_i = (m + log2 l) ln 2 = ln sum_j e^(s_ij); a row that sees no key gives o = 0, lse = -inf.
//   backward: P_ij = e^(s_ij - lse_i), D_ij = keep_ij / (1 - p) (1 without dropout),
//             dV_j = sum_i P_ij D_ij dO_i,   dP_ij = D_ij dO_i . v_j,   dS_ij = P_ij (dP_ij - delta_i),
//             dQ_i = scale sum_j dS_ij k_j,   dK_j = scale sum_i dS_ij q_i,
//             delta_i = dO_i . o_i - dlse_i (the binding computes it: the lse's own gradient folds in here).
// Dropout is Triton's mask bit for bit (fusedlm/kernels/attention.py): the same seed drops the same
// elements on either backend.
//
// Tiles (one warp = 16 rows of an mma; 4 warps a block): head dims are padded to a bucket D (32, 64, 128,
// 256; cp.async zero-fills the columns past E / Ev), shared-memory rows are D + 8 elements long (16 bytes of
// padding: ldmatrix's 8 rows then fall in different banks).
//   forward  (AttnFwd):   64 query rows a block, key tiles of N = 64 (32 at D = 256), K and V double-buffered;
//                         Q fragments are re-read from shared memory per key tile (registers for O).
//   dK / dV  (AttnBwdKv): 64 keys a block (16 a warp, the mma rows: S^T = K Q^T), query tiles of M = 64 (32 at
//                         D != 64) double-buffered with their lse and delta, over every query head of the K/V head (GQA without
//                         repeating K/V); at D = 256 dV and dK are two launches (both accumulators: 256 floats).
//   dQ       (AttnBwdQ):  64 query rows a block over key tiles of N = 64 (32 at D >= 128: 68 KB at D = 128).
// The grid is (batch x heads, row tiles): x takes 2^31 - 1, y 65535 (4M rows).
#include "attention.h"

namespace fl {
inline namespace FL_IMPL {

// ================================================================================================
// Forward.
template <class T, int D, int N>
struct AttnFwd {
  using Params = AttnParams;
  static constexpr int kMaxThreads = kAttnThreads, kStride = D + 8, kM = kAttnRows;
  static constexpr int kSmemFloats = (kM + 4 * N) * kStride * int(sizeof(T)) / 4;  // Q, K x 2, V x 2
  struct State {
    float o[D / 8][4];       // O, 16 rows x D per warp (C fragments of D / 8 n-tiles)
    float s[N / 8][4];       // scores of the key tile
    uint32_t pa[N / 16][4];  // P as A fragments
    uint32_t fa[4], fb[4];   // operand staging
    float m[2], l[2], tmax[2];  // rows g and g + 8: running max (log2 units), partial sum, tile max
  };

  template <class Blk>
  static FL_BODY void body(Blk& b, const Params& p) {
    const int bh = b.ctx.bx, b_ = bh / p.heads, h = bh % p.heads, hk = h / (p.heads / p.heads_kv);
    const Seq s = seq_of(p, b_, h);
    const int m0 = b.ctx.by * kM;
    if (m0 >= s.q_len) return;  // uniform over the block: past this sequence's end
    int lo = 0;
    const int n_tiles = key_tiles<N>(p, s, m0, kM, &lo);
    const uint8_t* kpm = p.key_padding ? p.key_padding + b_ * p.kpm_stride : nullptr;
    const uint64_t seed = p.seed ? uint64_t(*p.seed) : 0;
    const float scale2 = p.scale * kLog2e;

    T* qs = b.template shared_as<T>();
    T* const ks = qs + kM * kStride;              // buffer t & 1 at ks + (t & 1) N kStride (no pointer arrays:
    T* const vs = qs + (kM + 2 * N) * kStride;    // a runtime index into one puts it on the stack)
    const T* qg = row_at<const T>(p.q, p.q_stride, s.b, h, s.q0 + m0);
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
      copy_tile<T, D, kStride, kAttnThreads>(b, c, qs, qg, p.q_stride[2], kM, s.q_len - m0, p.head_dim, p.q);
      if (n_tiles > 0) issue_kv(c, 0);
      b.cp_async_commit();
#pragma unroll
      for (int d = 0; d < D / 8; ++d)
#pragma unroll
        for (int i = 0; i < 4; ++i) st.o[d][i] = 0.0f;
      st.m[0] = st.m[1] = -INFINITY;
      st.l[0] = st.l[1] = 0.0f;
    });

    for (int t = 0; t < n_tiles; ++t) {
      const int n0 = lo + t * N;
      prefetch_next(b, t, n_tiles, issue_kv);  // the next tile's copies go out before this one is used
      b.sync();
      const T* kt = ks + (t & 1) * N * kStride;
      const T* vt = vs + (t & 1) * N * kStride;
      // S = Q K^T
      b.each([&](const Ctx&, State& st) { zero(st.s); });
      mma_abt<T, D, N, kStride, kStride>(b, qs, kt, [](State& st) { return st.s; });
      // Masks, then the tile's row maxima over the quad.
      b.each([&](const Ctx& c, State& st) {
        const int lane = c.tid & 31, row0 = m0 + (c.tid >> 5) * 16;
        st.tmax[0] = st.tmax[1] = -INFINITY;
#pragma unroll
        for (int j = 0; j < N / 8; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int qi = row0 + mma_c_row(lane, i), kj = n0 + j * 8 + mma_c_col(lane, i);
            const float v = visible(p, s, kpm, qi, kj) ? st.s[j][i] * scale2 : -INFINITY;
            st.s[j][i] = v;
            st.tmax[i >> 1] = fmax_(st.tmax[i >> 1], v);
          }
      });
      b.template quad_reduce<2, true>([](const Ctx&, State& st) { return st.tmax; });
      // Online softmax: rescale O and l by 2^(m_old - m_new), P = 2^(t - m_new), dropout on P only.
      b.each([&](const Ctx& c, State& st) {
        const int lane = c.tid & 31, row0 = m0 + (c.tid >> 5) * 16;
        float base[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float m_new = fmax_(st.m[r], st.tmax[r]);
          base[r] = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing visible yet: 2^(-inf) = 0
          const float alpha = exp2(st.m[r] - base[r]);
          st.m[r] = m_new;
          st.l[r] *= alpha;
#pragma unroll
          for (int d = 0; d < D / 8; ++d) {
            st.o[d][2 * r] *= alpha;
            st.o[d][2 * r + 1] *= alpha;
          }
        }
#pragma unroll
        for (int j = 0; j < N / 8; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            float pv = exp2(st.s[j][i] - base[i >> 1]);
            st.l[i >> 1] += pv;
            if (p.dropout_p > 0.0f) {
              const int qi = row0 + mma_c_row(lane, i), kj = n0 + j * 8 + mma_c_col(lane, i);
              pv = dropout_keep(p, seed, s.b, h, qi, kj) ? pv / (1.0f - p.dropout_p) : 0.0f;
            }
            st.s[j][i] = pv;
          }
        pack_a<T, N>(st.pa, st.s);
      });
      // O += P V
      mma_pb<T, N, D, kStride>(b, vt, [](State& st) { return st.pa; },
                              [](State& st) { return st.o; });
      b.sync();  // every warp is done with this buffer before the next iteration refills it
    }

    // Epilogue: l over the quad, O / l and lse out (rows past the sequence are not written).
    b.each([&](const Ctx&, State&) { b.template cp_async_wait<0>(); });  // (no key tile: Q's copies)
    b.template quad_reduce<2, false>([](const Ctx&, State& st) { return st.l; });
    b.each([&](const Ctx& c, State& st) {
      const int lane = c.tid & 31, g = lane >> 2, tq = lane & 3, row0 = m0 + (c.tid >> 5) * 16;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int qi = row0 + g + 8 * r;
        if (qi >= s.q_len) continue;
        const float inv = st.l[r] > 0.0f ? 1.0f / st.l[r] : 0.0f;
        T* out = row_at<T>(p.o, p.o_stride, s.b, h, s.q0 + qi);
#pragma unroll
        for (int d = 0; d < D / 8; ++d) {
          const int col = d * 8 + 2 * tq;
          if (col < p.head_dim_v) {
            const uint32_t v = pack2<T>(st.o[d][2 * r] * inv, st.o[d][2 * r + 1] * inv);
            store_pair<T>(out + col, v);
          }
        }
        if (tq == 0)
          *row_at<float>(p.lse, p.lse_stride, s.b, h, s.q0 + qi) =
              st.l[r] > 0.0f ? (st.m[r] + log(st.l[r]) * kLog2e) * kLn2 : -INFINITY;
      }
    });
  }

};


template <class T, int D>
void attention_fwd_typed(const AttnParams& p, Stream stream) {
  constexpr int N = D <= 128 ? 64 : 32;
  launch<AttnFwd<T, D, N>>(p.batch * p.heads, (p.len_q + kAttnRows - 1) / kAttnRows, kAttnThreads, p, stream);
}

}  // namespace FL_IMPL

#if defined(__CUDACC__)
namespace cuda {
void attention_fwd(const AttnParams& p, cudaStream_t stream) { FL_ATTN_DISPATCH(p, attention_fwd_typed, stream); }
}  // namespace cuda
#else
namespace cpu {
void attention_fwd(const AttnParams& p) { FL_ATTN_DISPATCH(p, attention_fwd_typed, nullptr); }
}  // namespace cpu
#endif

}  // namespace fl
