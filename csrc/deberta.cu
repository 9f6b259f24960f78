// DeBERTa's disentangled attention on the tensor cores: forward, and a deterministic backward (dQ per query
// block, dK/dV per key block, the position embeddings' gradients per block of distances); dense with key
// padding, packed with cu_seqlens; float16 / bfloat16, head dims up to 64 (every DeBERTa model's).
//
//   z_ij = s (q_i . k_j + q_i . PK[idx(i - j)] + k_j . PQ[idx(i - j)]),   s = 1 / sqrt(D (1 + #terms))
//
// (PK = pos_key, PQ = pos_query of the head.) idx(d) is read from the op layer's int32 table
// rel_idx[d + Smax - 1] (Hugging Face's log buckets, built on the CPU: no logarithm here).
//
// Position terms of a tile (64 queries i0 + a, 64 keys j0 + c): its distances are d = dmin + w with
// dmin = i0 - j0 - 63 and w = a - c + 63 in 0 .. 126. With the window rows PKw[w] = PK[idx(dmin + w)] and
// PQw[w] = PQ[idx(dmin + w)] (gathered into shared memory by cp.async):
//     C2P = Q PKw^T (64 x 128): c2p_ij = C2P[a][w],      P2C = K PQw^T (64 x 128): p2c_ij = P2C[c][w]
// two tensor-core products a tile, kept in shared memory rounded to T (as Hugging Face computes c2p / p2c
// in the inputs' dtype), read back along the tile's diagonals.
//
// Backward, with P recomputed from lse, delta_i = dO_i . o_i - dlse_i (the binding) and dS = P (dP D - delta):
//     dV = P^T D dO;   dQ_i = s (sum_j dS_ij k_j + sum_j dS_ij PK[idx(i - j)]);   dK_j likewise with q_i and PQ;
//     dPK[r] = s sum_{idx(i - j) = r} dS_ij q_i;   dPQ[r] = s sum_{idx(i - j) = r} dS_ij k_j.
// dQ's position part un-skews dS into X[a][w] = dS[a][c] (c = a - w + 63) and adds X PKw; dK's the same on
// the transposed tile with PQw. dPK / dPQ: the distances outside the band (d <= d_first: idx 0; d >= d_last:
// idx 2 span - 1) reduce to per-row and per-key sums of dS, multiplied by the block's Q / K tile in its
// epilogue (run parts, summed over blocks by the op layer); a band distance's sums over every (batch, query) come from DebBand, one block per head and 64
// distances, which recomputes dS on those diagonals only: per query tile, S = Q Kw^T and dP = dO Vw^T over
// the 128 keys the diagonals touch, C2P_d = Q PK_d^T, P2C_d = Kw PQ_d^T, then
//     band_key[w] += sum_a dS[a][w] q_a  (dS^T Q),   band_query[w] += sum_c G[w][c] k_c  (G: dS by key).
// Every sum has a fixed order: no atomics. Extra memory: the run parts (4 D floats a 64-row block) and the
// band sums (2 x H x band x D floats). Dropout is the triton backend's mask (Philox at ((b H + h) Smax + i) Smax + j).
#include "deberta.h"

namespace fl {
inline namespace FL_IMPL {

// ---- Forward: 64 query rows a block over the sequence's key tiles (N = 64), K, V and the windows
// double-buffered.
template <class T, int D>
struct DebFwd {
  using Params = DebParams;
  using G = Deb<T, D>;
  static constexpr int N = 64, kM = kDebRows, kMaxThreads = kDebThreads, kStride = G::kStride, kW = G::kW;
  static constexpr int kWStride = G::kWStride;
  static constexpr int kSmemFloats = ((kM + 2 * (2 * N + 2 * kW)) * kStride + 2 * kM * kWStride) * int(sizeof(T)) / 4;
  struct State {
    float o[D / 8][4];
    float s[N / 8][4];
    float w[8][4];
    uint32_t pa[N / 16][4];
    uint32_t fa[4], fb[4];
    float m[2], l[2], tmax[2];
  };

  template <class Blk>
  static FL_BODY void body(Blk& b, const Params& p) {
    const int b_ = b.ctx.bx / p.heads, h = b.ctx.bx % p.heads;
    const typename G::Seq s = G::seq(p, b_, h);
    const int i0 = b.ctx.by * kM;
    if (i0 >= s.len) return;  // uniform over the block
    const int n_tiles = (s.len + N - 1) / N;
    const uint8_t* kpm = p.key_padding ? p.key_padding + b_ * p.kpm_stride : nullptr;
    const uint64_t seed = p.seed ? uint64_t(*p.seed) : 0;
    const float scale2 = p.scale * kLog2e;
    const bool has_pk = p.pos_key != nullptr, has_pq = p.pos_query != nullptr;

    T* qs = b.template shared_as<T>();
    T* const ks = qs + kM * kStride;        // double buffers: + (t & 1) N kStride
    T* const vs = ks + 2 * N * kStride;
    T* const pks = vs + 2 * N * kStride;    // + (t & 1) kW kStride
    T* const pqs = pks + 2 * kW * kStride;
    T* const c2p = pqs + 2 * kW * kStride;  // (64 x kW)
    T* const p2c = c2p + kM * kWStride;
    auto issue = [&](const Ctx& c, int t) {
      const int j0 = t * N;
      G::copy_rows(b, c, ks + (t & 1) * N * kStride, p.k, p.k_stride, s, j0, N, p);
      G::copy_rows(b, c, vs + (t & 1) * N * kStride, p.v, p.v_stride, s, j0, N, p);
      if (has_pk) G::copy_pos(b, c, pks + (t & 1) * kW * kStride, p.pos_key, h, p, i0 - j0 - 63, kW);
      if (has_pq) G::copy_pos(b, c, pqs + (t & 1) * kW * kStride, p.pos_query, h, p, i0 - j0 - 63, kW);
    };
    b.each([&](const Ctx& c, State& st) {
      G::copy_rows(b, c, qs, p.q, p.q_stride, s, i0, kM, p);
      issue(c, 0);
      b.cp_async_commit();
#pragma unroll
      for (int d = 0; d < D / 8; ++d)
#pragma unroll
        for (int i = 0; i < 4; ++i) st.o[d][i] = 0.0f;
      st.m[0] = st.m[1] = -INFINITY;
      st.l[0] = st.l[1] = 0.0f;
    });

    for (int t = 0; t < n_tiles; ++t) {
      const int j0 = t * N;
      prefetch_next(b, t, n_tiles, issue);
      b.sync();
      const T* kt = ks + (t & 1) * N * kStride;
      const T* vt = vs + (t & 1) * N * kStride;
      if (has_pk) G::window_product(b, qs, pks + (t & 1) * kW * kStride, c2p);
      if (has_pq) G::window_product(b, kt, pqs + (t & 1) * kW * kStride, p2c);
      b.sync();
      b.each([&](const Ctx&, State& st) { zero(st.s); });
      mma_abt<T, D, N, kStride, kStride>(b, qs, kt, [](State& st) { return st.s; });
      // + the position terms along the diagonals, masks, the tile's row maxima
      b.each([&](const Ctx& c, State& st) {
        const int lane = c.tid & 31, a0 = (c.tid >> 5) * 16;
        st.tmax[0] = st.tmax[1] = -INFINITY;
#pragma unroll
        for (int j = 0; j < N / 8; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int a = a0 + mma_c_row(lane, i), cc = j * 8 + mma_c_col(lane, i), w = a - cc + 63;
            float z = st.s[j][i];
            if (has_pk) z += to_float(c2p[a * kWStride + w]);
            if (has_pq) z += to_float(p2c[cc * kWStride + w]);
            z = G::visible(s, kpm, i0 + a, j0 + cc) ? z * scale2 : -INFINITY;
            st.s[j][i] = z;
            st.tmax[i >> 1] = st.tmax[i >> 1] > z ? st.tmax[i >> 1] : z;
          }
      });
      b.template quad_reduce<2, true>([](const Ctx&, State& st) { return st.tmax; });
      b.each([&](const Ctx& c, State& st) {
        const int lane = c.tid & 31, a0 = (c.tid >> 5) * 16;
        float base[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float m_new = st.m[r] > st.tmax[r] ? st.m[r] : st.tmax[r];
          base[r] = m_new == -INFINITY ? 0.0f : m_new;
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
              const int qi = i0 + a0 + mma_c_row(lane, i), kj = j0 + j * 8 + mma_c_col(lane, i);
              pv = G::keep(p, seed, s, qi, kj) ? pv / (1.0f - p.dropout_p) : 0.0f;
            }
            st.s[j][i] = pv;
          }
        pack_a<T, N>(st.pa, st.s);
      });
      mma_pb<T, N, D, kStride>(b, vt, [](State& st) { return st.pa; },
                              [](State& st) { return st.o; });
      b.sync();  // before the next iteration refills this tile's buffers and rewrites C2P / P2C
    }

    b.each([&](const Ctx&, State&) { b.template cp_async_wait<0>(); });
    b.template quad_reduce<2, false>([](const Ctx&, State& st) { return st.l; });
    b.each([&](const Ctx& c, State& st) {
      const int lane = c.tid & 31, tq = lane & 3, a0 = (c.tid >> 5) * 16 + (lane >> 2);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int qi = i0 + a0 + 8 * r;
        if (qi >= s.len) continue;
        const float inv = st.l[r] > 0.0f ? 1.0f / st.l[r] : 0.0f;
        T* out = G::at(p.o, p.o_stride, s, qi);
#pragma unroll
        for (int d = 0; d < D / 8; ++d) {
          const int col = d * 8 + 2 * tq;
          if (col < p.head_dim) store_pair<T>(out + col, pack2<T>(st.o[d][2 * r] * inv, st.o[d][2 * r + 1] * inv));
        }
        if (tq == 0)
          *G::stat(p.lse, p.lse_stride, s, qi) = st.l[r] > 0.0f ? (st.m[r] + log(st.l[r]) * kLog2e) * kLn2 : -INFINITY;
      }
    });
  }
};


template <class T>
void deberta_fwd_dtype(const DebParams& p, Stream stream) {  // the head-dim bucket (32 or 64) is static
  const int bh = p.batch * p.heads, tiles = (p.max_seqlen + kDebRows - 1) / kDebRows;
  if (p.head_dim <= 32) launch<DebFwd<T, 32>>(bh, tiles, kDebThreads, p, stream);
  else launch<DebFwd<T, 64>>(bh, tiles, kDebThreads, p, stream);
}

}  // namespace FL_IMPL

#if defined(__CUDACC__)
namespace cuda {
void deberta_fwd(const DebParams& p, cudaStream_t stream) {
  FL_DISPATCH_HALF(p.dtype, T, deberta_fwd_dtype<T>(p, stream));
}
}  // namespace cuda
#else
namespace cpu {
void deberta_fwd(const DebParams& p) {
  FL_DISPATCH_HALF(p.dtype, T, deberta_fwd_dtype<T>(p, nullptr));
}
}  // namespace cpu
#endif

}  // namespace fl
