// DeBERTa's attention backward on the tensor cores (the math and the design: deberta.cu's header and
// csrc/README.md): dQ and the per-query run sums (DebBwdQ), dK / dV and the per-key run sums (DebBwdKv), the
// band distances' position gradients (DebBand) and their fold by bucket (DebFold). Deterministic: no atomics.
#include "deberta.h"

namespace fl {
inline namespace FL_IMPL {

// ---- Backward, dQ (and the run sums per query): 64 query rows a block over the sequence's key tiles (one
// buffer: the windows and their products take the room of a second).
template <class T, int D>
struct DebBwdQ {
  using Params = DebParams;
  using G = Deb<T, D>;
  static constexpr int N = 64, kM = kDebRows, kMaxThreads = kDebThreads, kStride = G::kStride, kW = G::kW;
  static constexpr int kWStride = G::kWStride;
  // Q, dO, K, V, PKw, PQw; C2P (then X, the un-skewed dS), P2C
  static constexpr int kSmemFloats = ((2 * kM + 2 * N + 2 * kW) * kStride + 2 * kM * kWStride) * int(sizeof(T)) / 4;
  struct State {
    float dq[D / 8][4];
    float s[N / 8][4];   // S, then P
    float dp[N / 8][4];  // dP, then dS
    float w[8][4];
    uint32_t pa[N / 16][4];
    uint32_t fa[4], fb[4];
    float lse2[2], delta[2];
    float run[4];        // dS summed over the first run (rows g, g + 8), then over the last
  };

  template <class Blk>
  static FL_BODY void body(Blk& b, const Params& p) {
    const int b_ = b.ctx.bx / p.heads, h = b.ctx.bx % p.heads;
    const typename G::Seq s = G::seq(p, b_, h);
    const int i0 = b.ctx.by * kM;
    if (i0 >= s.len) return;
    const int n_tiles = (s.len + N - 1) / N;
    const uint8_t* kpm = p.key_padding ? p.key_padding + b_ * p.kpm_stride : nullptr;
    const uint64_t seed = p.seed ? uint64_t(*p.seed) : 0;
    const float scale2 = p.scale * kLog2e;
    const bool has_pk = p.pos_key != nullptr, has_pq = p.pos_query != nullptr;

    T* qs = b.template shared_as<T>();
    T* const dos = qs + kM * kStride;
    T* const kt = dos + kM * kStride;
    T* const vt = kt + N * kStride;
    T* const pks = vt + N * kStride;
    T* const pqs = pks + kW * kStride;
    T* const c2p = pqs + kW * kStride;  // then X
    T* const p2c = c2p + kM * kWStride;
    b.each([&](const Ctx& c, State& st) {
      G::copy_rows(b, c, qs, p.q, p.q_stride, s, i0, kM, p);
      G::copy_rows(b, c, dos, p.dout, p.do_stride, s, i0, kM, p);
      const int lane = c.tid & 31, row = i0 + (c.tid >> 5) * 16 + (lane >> 2);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const bool ok = row + 8 * r < s.len;
        st.lse2[r] = ok ? *G::stat(p.lse, p.lse_stride, s, row + 8 * r) * kLog2e : 0.0f;
        st.delta[r] = ok ? *G::stat(const_cast<float*>(p.delta), p.lse_stride, s, row + 8 * r) : 0.0f;
      }
#pragma unroll
      for (int d = 0; d < D / 8; ++d)
#pragma unroll
        for (int i = 0; i < 4; ++i) st.dq[d][i] = 0.0f;
#pragma unroll
      for (int r = 0; r < 4; ++r) st.run[r] = 0.0f;
    });

    for (int t = 0; t < n_tiles; ++t) {
      const int j0 = t * N;
      b.each([&](const Ctx& c, State&) {
        G::copy_rows(b, c, kt, p.k, p.k_stride, s, j0, N, p);
        G::copy_rows(b, c, vt, p.v, p.v_stride, s, j0, N, p);
        if (has_pk) G::copy_pos(b, c, pks, p.pos_key, h, p, i0 - j0 - 63, kW);
        if (has_pq) G::copy_pos(b, c, pqs, p.pos_query, h, p, i0 - j0 - 63, kW);
        b.cp_async_commit();
        b.template cp_async_wait<0>();
      });
      b.sync();
      if (has_pk) G::window_product(b, qs, pks, c2p);
      if (has_pq) G::window_product(b, kt, pqs, p2c);
      b.sync();
      b.each([&](const Ctx&, State& st) { zero(st.s); zero(st.dp); });
      // S = Q K^T
      mma_abt<T, D, N, kStride, kStride>(b, qs, kt, [](State& st) { return st.s; });
      // dP = dO V^T
      mma_abt<T, D, N, kStride, kStride>(b, dos, vt, [](State& st) { return st.dp; });
      // dS = P (dP D - delta); the runs' sums
      b.each([&](const Ctx& c, State& st) {
        const int lane = c.tid & 31, a0 = (c.tid >> 5) * 16;
#pragma unroll
        for (int j = 0; j < N / 8; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int a = a0 + mma_c_row(lane, i), cc = j * 8 + mma_c_col(lane, i), w = a - cc + 63, r = i >> 1;
            const int qi = i0 + a, kj = j0 + cc;
            float ds = 0.0f;
            if (G::visible(s, kpm, qi, kj)) {
              float z = st.s[j][i];
              if (has_pk) z += to_float(c2p[a * kWStride + w]);
              if (has_pq) z += to_float(p2c[cc * kWStride + w]);
              const float pv = exp2(z * scale2 - st.lse2[r]);
              float dpv = st.dp[j][i];
              if (p.dropout_p > 0.0f) dpv = G::keep(p, seed, s, qi, kj) ? dpv / (1.0f - p.dropout_p) : 0.0f;
              ds = pv * (dpv - st.delta[r]);
              const int d = qi - kj;
              if (d <= p.d_first) st.run[r] += ds;
              if (d >= p.d_last) st.run[2 + r] += ds;
            }
            st.dp[j][i] = ds;
          }
        pack_a<T, N>(st.pa, st.dp);
      });
      // dQ += dS K
      mma_pb<T, N, D, kStride>(b, kt, [](State& st) { return st.pa; },
                              [](State& st) { return st.dq; });
      if (has_pk) {  // dQ += X PKw, X[a][w] = dS[a][a - w + 63] (in C2P's place, read above)
        b.sync();
        G::zero_window(b, c2p);
        b.sync();
        b.each([&](const Ctx& c, State& st) {
          const int lane = c.tid & 31, a0 = (c.tid >> 5) * 16;
#pragma unroll
          for (int j = 0; j < N / 8; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const int a = a0 + mma_c_row(lane, i), cc = j * 8 + mma_c_col(lane, i);
              c2p[a * kWStride + a - cc + 63] = from_float<T>(st.dp[j][i]);
            }
        });
        b.sync();
        G::add_window(b, c2p, pks, [](State& st) { return st.dq; });
      }
      b.sync();  // before the next tile's copies and products overwrite what this one read
    }

    b.template quad_reduce<4, false>([](const Ctx&, State& st) { return st.run; });
    G::stage_runs(b, reinterpret_cast<float*>(c2p));  // (C2P's room is free now)
    b.each([&](const Ctx& c, State& st) {
      const int lane = c.tid & 31, tq = lane & 3, a0 = (c.tid >> 5) * 16 + (lane >> 2);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int qi = i0 + a0 + 8 * r;
        if (qi >= s.len) continue;
        T* out = G::at(p.dq, p.dq_stride, s, qi);
#pragma unroll
        for (int d = 0; d < D / 8; ++d) {
          const int col = d * 8 + 2 * tq;
          if (col < p.head_dim)
            store_pair<T>(out + col, pack2<T>(st.dq[d][2 * r] * p.scale, st.dq[d][2 * r + 1] * p.scale));
        }
      }
    });
    G::fold_runs(b, p, p.run_query_parts, qs, c2p);
  }
};

// ---- Backward, dK and dV (and the run sums per key): 64 keys a block (16 a warp: S^T = K Q^T, so that
// dV += P^T dO and dK += dS^T Q accumulate in the mma rows) over the sequence's query tiles.
template <class T, int D>
struct DebBwdKv {
  using Params = DebParams;
  using G = Deb<T, D>;
  static constexpr int M = 64, kN = kDebRows, kMaxThreads = kDebThreads, kStride = G::kStride, kW = G::kW;
  static constexpr int kWStride = G::kWStride;
  // K, V, Q, dO, PKw, PQw; C2P, P2C (then Y, the un-skewed dS^T); the tile's lse (log2) and delta
  static constexpr int kSmemFloats =
      ((2 * kN + 2 * M + 2 * kW) * kStride + 2 * M * kWStride) * int(sizeof(T)) / 4 + 2 * M;
  struct State {
    float dk[D / 8][4];
    float dv[D / 8][4];
    float s[M / 8][4];   // S^T, then P^T D (dV's operand)
    float dp[M / 8][4];  // dP^T, then dS^T
    float w[8][4];
    uint32_t pa[M / 16][4];
    uint32_t fa[4], fb[4];
    float run[4];        // dS summed over the first run (keys g, g + 8), then over the last
  };

  template <class Blk>
  static FL_BODY void body(Blk& b, const Params& p) {
    const int b_ = b.ctx.bx / p.heads, h = b.ctx.bx % p.heads;
    const typename G::Seq s = G::seq(p, b_, h);
    const int j0 = b.ctx.by * kN;
    if (j0 >= s.len) return;
    const int n_tiles = (s.len + M - 1) / M;
    const uint8_t* kpm = p.key_padding ? p.key_padding + b_ * p.kpm_stride : nullptr;
    const uint64_t seed = p.seed ? uint64_t(*p.seed) : 0;
    const float scale2 = p.scale * kLog2e;
    const bool has_pk = p.pos_key != nullptr, has_pq = p.pos_query != nullptr;

    T* ks = b.template shared_as<T>();
    T* const vs = ks + kN * kStride;
    T* const qt = vs + kN * kStride;
    T* const dot = qt + M * kStride;
    T* const pks = dot + M * kStride;
    T* const pqs = pks + kW * kStride;
    T* const c2p = pqs + kW * kStride;
    T* const p2c = c2p + M * kWStride;  // then Y
    float* const lse2 = b.shared() + ((2 * kN + 2 * M + 2 * kW) * kStride + 2 * M * kWStride) * int(sizeof(T)) / 4;
    float* const delta = lse2 + M;
    b.each([&](const Ctx& c, State& st) {
      G::copy_rows(b, c, ks, p.k, p.k_stride, s, j0, kN, p);
      G::copy_rows(b, c, vs, p.v, p.v_stride, s, j0, kN, p);
#pragma unroll
      for (int d = 0; d < D / 8; ++d)
#pragma unroll
        for (int i = 0; i < 4; ++i) st.dk[d][i] = st.dv[d][i] = 0.0f;
#pragma unroll
      for (int r = 0; r < 4; ++r) st.run[r] = 0.0f;
    });

    for (int t = 0; t < n_tiles; ++t) {
      const int i0 = t * M;
      b.each([&](const Ctx& c, State&) {
        G::copy_rows(b, c, qt, p.q, p.q_stride, s, i0, M, p);
        G::copy_rows(b, c, dot, p.dout, p.do_stride, s, i0, M, p);
        if (has_pk) G::copy_pos(b, c, pks, p.pos_key, h, p, i0 - j0 - 63, kW);
        if (has_pq) G::copy_pos(b, c, pqs, p.pos_query, h, p, i0 - j0 - 63, kW);
        if (c.tid < M) {
          const bool ok = i0 + c.tid < s.len;
          lse2[c.tid] = ok ? *G::stat(p.lse, p.lse_stride, s, i0 + c.tid) * kLog2e : 0.0f;
          delta[c.tid] = ok ? *G::stat(const_cast<float*>(p.delta), p.lse_stride, s, i0 + c.tid) : 0.0f;
        }
        b.cp_async_commit();
        b.template cp_async_wait<0>();
      });
      b.sync();
      if (has_pk) G::window_product(b, qt, pks, c2p);  // rows: the tile's queries
      if (has_pq) G::window_product(b, ks, pqs, p2c);  // rows: this block's keys
      b.sync();
      b.each([&](const Ctx&, State& st) { zero(st.s); zero(st.dp); });
      // S^T = K Q^T, dP^T = V dO^T
      mma_abt<T, D, M, kStride, kStride>(b, ks, qt, [](State& st) { return st.s; });
      mma_abt<T, D, M, kStride, kStride>(b, vs, dot, [](State& st) { return st.dp; });
      b.each([&](const Ctx& c, State& st) {
        const int lane = c.tid & 31, c0 = (c.tid >> 5) * 16;
#pragma unroll
        for (int j = 0; j < M / 8; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int cc = c0 + mma_c_row(lane, i), a = j * 8 + mma_c_col(lane, i), w = a - cc + 63, r = i >> 1;
            const int qi = i0 + a, kj = j0 + cc;
            float pd = 0.0f, ds = 0.0f;
            if (G::visible(s, kpm, qi, kj)) {
              float z = st.s[j][i];
              if (has_pk) z += to_float(c2p[a * kWStride + w]);
              if (has_pq) z += to_float(p2c[cc * kWStride + w]);
              const float pv = exp2(z * scale2 - lse2[a]);
              float keep = 1.0f;
              if (p.dropout_p > 0.0f) keep = G::keep(p, seed, s, qi, kj) ? 1.0f / (1.0f - p.dropout_p) : 0.0f;
              pd = pv * keep;
              ds = pv * (st.dp[j][i] * keep - delta[a]);
              const int d = qi - kj;
              if (d <= p.d_first) st.run[r] += ds;
              if (d >= p.d_last) st.run[2 + r] += ds;
            }
            st.s[j][i] = pd;
            st.dp[j][i] = ds;
          }
        pack_a<T, M>(st.pa, st.s);
      });
      // dV += (P^T D) dO
      mma_pb<T, M, D, kStride>(b, dot, [](State& st) { return st.pa; },
                              [](State& st) { return st.dv; });
      b.each([&](const Ctx&, State& st) {
        pack_a<T, M>(st.pa, st.dp);
      });
      // dK += dS^T Q
      mma_pb<T, M, D, kStride>(b, qt, [](State& st) { return st.pa; },
                              [](State& st) { return st.dk; });
      if (has_pq) {  // dK += Y PQw, Y[c][w] = dS^T[c][c + w - 63] (in P2C's place, read above)
        b.sync();
        G::zero_window(b, p2c);
        b.sync();
        b.each([&](const Ctx& c, State& st) {
          const int lane = c.tid & 31, c0 = (c.tid >> 5) * 16;
#pragma unroll
          for (int j = 0; j < M / 8; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const int cc = c0 + mma_c_row(lane, i), a = j * 8 + mma_c_col(lane, i);
              p2c[cc * kWStride + a - cc + 63] = from_float<T>(st.dp[j][i]);
            }
        });
        b.sync();
        G::add_window(b, p2c, pqs, [](State& st) { return st.dk; });
      }
      b.sync();
    }

    b.template quad_reduce<4, false>([](const Ctx&, State& st) { return st.run; });
    G::stage_runs(b, reinterpret_cast<float*>(p2c));  // (P2C's room is free now)
    b.each([&](const Ctx& c, State& st) {
      const int lane = c.tid & 31, tq = lane & 3, c0 = (c.tid >> 5) * 16 + (lane >> 2);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int kj = j0 + c0 + 8 * r;
        if (kj >= s.len) continue;
        T* dk = G::at(p.dk, p.dk_stride, s, kj);
        T* dv = G::at(p.dv, p.dv_stride, s, kj);
#pragma unroll
        for (int d = 0; d < D / 8; ++d) {
          const int col = d * 8 + 2 * tq;
          if (col < p.head_dim) {
            store_pair<T>(dk + col, pack2<T>(st.dk[d][2 * r] * p.scale, st.dk[d][2 * r + 1] * p.scale));
            store_pair<T>(dv + col, pack2<T>(st.dv[d][2 * r], st.dv[d][2 * r + 1]));
          }
        }
      }
    });
    G::fold_runs(b, p, p.run_key_parts, ks, p2c);
  }
};

// ---- Backward, the band's position gradients: one block per head and 64 distances d0 + w of the band, over
// every (sequence, query tile). Per tile (queries i0 + a) the diagonals j = i - d touch the 128 keys from
// jw = i0 - d0 - 63 (key c' = a - w + 63): S and dP over those keys and P2C_d = Kw PQ_d^T go through shared
// memory 64 columns at a time, and each lane gathers its (a, w) elements; C2P_d = Q PK_d^T is already laid
// out by (a, w). Then band_key[w] += dS^T Q and band_query[w] += G Kw with G[w][c'] = dS[a][w].
template <class T, int D>
struct DebBand {
  using Params = DebParams;
  using G = Deb<T, D>;
  static constexpr int kM = kDebRows, kMaxThreads = kDebThreads, kStride = G::kStride, kW = G::kW;
  static constexpr int kWStride = G::kWStride, kTStride = 64 + 8, kBufStride = 64 + 4;
  // Q, dO, Kw, Vw, PK_d, PQ_d; dS^T (64 x 64), G (64 x kW) (T); a 64 x 64 float staging buffer
  static constexpr int kTBytes = ((2 * kM + 2 * kW + 2 * 64) * kStride + 64 * kTStride + 64 * kWStride) * int(sizeof(T));
  // + band_query's rows (64 x D float32): accumulated in shared memory, through st.w (registers: both sums
  // in registers spilled 8-24 bytes at D = 64)
  static constexpr int kSmemFloats = kTBytes / 4 + 64 * kBufStride + 64 * D;
  struct State {
    float fk[D / 8][4];   // band_key rows w (16 a warp)
    float z[8][4];        // (a, w): the scores, summed term by term, then P
    float w[8][4];
    uint32_t fa[4], fb[4];
    float lse2[2], delta[2];
  };

  template <class Blk>
  static FL_BODY void body(Blk& b, const Params& p) {
    const int h = b.ctx.bx, d0 = p.band_lo + b.ctx.by * 64;
    const int nd = p.band_n - b.ctx.by * 64 < 64 ? p.band_n - b.ctx.by * 64 : 64;
    const uint64_t seed = p.seed ? uint64_t(*p.seed) : 0;
    const float scale2 = p.scale * kLog2e;
    const bool has_pk = p.pos_key != nullptr, has_pq = p.pos_query != nullptr;

    T* qs = b.template shared_as<T>();
    T* const dos = qs + kM * kStride;
    T* const kw = dos + kM * kStride;
    T* const vw = kw + kW * kStride;
    T* const pkd = vw + kW * kStride;
    T* const pqd = pkd + 64 * kStride;
    T* const dst = pqd + 64 * kStride;   // dS^T (w, a)
    T* const gt = dst + 64 * kTStride;   // G (w, c')
    float* const buf = b.shared() + kTBytes / 4;
    float* const fq = buf + 64 * kBufStride;  // (64 w x D)
    b.each([&](const Ctx& c, State& st) {
      if (has_pk) G::copy_pos(b, c, pkd, p.pos_key, h, p, d0, 64);
      if (has_pq) G::copy_pos(b, c, pqd, p.pos_query, h, p, d0, 64);
      b.cp_async_commit();
#pragma unroll
      for (int d = 0; d < D / 8; ++d)
#pragma unroll
        for (int i = 0; i < 4; ++i) st.fk[d][i] = 0.0f;
      for (int q = c.tid; q < 64 * D; q += kDebThreads) fq[q] = 0.0f;
    });
    b.sync();  // fq zeroed by every thread before any reads it (a block may skip every tile below)

    for (int bi = 0; bi < p.batch; ++bi) {
      const typename G::Seq s = G::seq(p, bi, h);
      const uint8_t* kpm = p.key_padding ? p.key_padding + bi * p.kpm_stride : nullptr;
      for (int i0 = 0; i0 < s.len; i0 += kM) {
        const int i1 = (i0 + kM < s.len ? i0 + kM : s.len) - 1;
        if (i1 - d0 < 0 || i0 - (d0 + nd - 1) >= s.len) continue;  // no key at these distances (uniform)
        const int jw = i0 - d0 - 63;
        G::zero_window(b, gt);
        b.each([&](const Ctx& c, State& st) {
          G::copy_rows(b, c, qs, p.q, p.q_stride, s, i0, kM, p);
          G::copy_rows(b, c, dos, p.dout, p.do_stride, s, i0, kM, p);
          G::copy_rows(b, c, kw, p.k, p.k_stride, s, jw, kW, p);
          G::copy_rows(b, c, vw, p.v, p.v_stride, s, jw, kW, p);
          b.cp_async_commit();
          b.template cp_async_wait<0>();
          const int row = i0 + (c.tid >> 5) * 16 + ((c.tid & 31) >> 2);
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const bool ok = row + 8 * r < s.len;
            st.lse2[r] = ok ? *G::stat(p.lse, p.lse_stride, s, row + 8 * r) * kLog2e : 0.0f;
            st.delta[r] = ok ? *G::stat(const_cast<float*>(p.delta), p.lse_stride, s, row + 8 * r) : 0.0f;
          }
        });
        b.sync();
        // z = C2P_d (a, w), then + S and P2C_d gathered along the diagonals
        if (has_pk) G::product64(b, qs, pkd);
        b.each([&](const Ctx&, State& st) {
#pragma unroll
          for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) st.z[j][i] = has_pk ? G::round(st.w[j][i]) : 0.0f;
        });
        // the scores summed as the other kernels sum them: S + c2p + p2c, the position terms rounded to T
        auto add = [](State& st, int j, int i, float v, int, int) { st.z[j][i] += v; };
        auto add_rounded = [](State& st, int j, int i, float v, int, int) { st.z[j][i] += G::round(v); };
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          gather(b, half, false, [&] { G::product64(b, qs, kw + half * 64 * kStride); }, buf, add);
          if (has_pq)
            gather(b, half, true, [&] { G::product64(b, kw + half * 64 * kStride, pqd); }, buf, add_rounded);
        }
        // P = 2^(z s log2 e - lse2) on the visible pairs of the band's distances (0 elsewhere)
        b.each([&](const Ctx& c, State& st) {
          const int lane = c.tid & 31, a0 = (c.tid >> 5) * 16;
#pragma unroll
          for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const int a = a0 + mma_c_row(lane, i), w = j * 8 + mma_c_col(lane, i), qi = i0 + a;
              const bool ok = w < nd && G::visible(s, kpm, qi, qi - (d0 + w));
              st.z[j][i] = ok ? exp2(st.z[j][i] * scale2 - st.lse2[i >> 1]) : 0.0f;
            }
        });
        // dP gathered half by half (each (a, w) gets its key's dP from one half): dS = P (dP D - delta) into
        // dS^T (w, a) and G (w, c')
        auto ds_out = [&](State& st, int j, int i, float dpv, int a, int w) {
          const int qi = i0 + a, kj = qi - (d0 + w);
          if (p.dropout_p > 0.0f) dpv = G::keep(p, seed, s, qi, kj) ? dpv / (1.0f - p.dropout_p) : 0.0f;
          const T v = from_float<T>(st.z[j][i] * (dpv - st.delta[i >> 1]));
          dst[w * kTStride + a] = v;
          gt[w * kWStride + a - w + 63] = v;
        };
#pragma unroll
        for (int half = 0; half < 2; ++half)
          gather(b, half, false, [&] { G::product64(b, dos, vw + half * 64 * kStride); }, buf, ds_out);
        // band_key[w] += sum_a dS^T[w][a] q_a;  band_query[w] += sum_c' G[w][c'] k_c'
        if (p.band_key != nullptr) mma_ab<T, 64, D, kTStride, kStride>(b, dst, qs, [](State& st) { return st.fk; });
        if (p.band_query != nullptr) {
          b.each([&](const Ctx&, State& st) { zero(st.w); });
          G::add_window(b, gt, kw, [](State& st) { return st.w; });
          b.each([&](const Ctx& c, State& st) {  // each lane its own elements of the warp's rows: no race
            const int lane = c.tid & 31, w0 = (c.tid >> 5) * 16;
#pragma unroll
            for (int j = 0; j < D / 8; ++j)
#pragma unroll
              for (int i = 0; i < 4; ++i) fq[(w0 + mma_c_row(lane, i)) * D + j * 8 + mma_c_col(lane, i)] += st.w[j][i];
          });
        }
        b.sync();
      }
    }

    b.each([&](const Ctx& c, State& st) {
      b.template cp_async_wait<0>();
      const int lane = c.tid & 31, tq = lane & 3, w0 = (c.tid >> 5) * 16 + (lane >> 2);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int w = w0 + 8 * r;
        if (w >= nd) continue;
        const int64_t row = (int64_t(h) * p.band_n + b.ctx.by * 64 + w) * p.head_dim;
#pragma unroll
        for (int d = 0; d < D / 8; ++d) {
          const int col = d * 8 + 2 * tq;
          if (col < p.head_dim) {
            if (p.band_key != nullptr) {
              p.band_key[row + col] = st.fk[d][2 * r];
              p.band_key[row + col + 1] = st.fk[d][2 * r + 1];
            }
            if (p.band_query != nullptr) {
              p.band_query[row + col] = fq[w * D + d * 8 + 2 * tq];
              p.band_query[row + col + 1] = fq[w * D + d * 8 + 2 * tq + 1];
            }
          }
        }
      }
    });
  }

  // use(st, j, i, value, a, w) for each of the lane's (a, w) elements whose key c' = a - w + 63 falls in
  // `half`, value the product's element there: the product (64 rows x the 64 columns of `half`) staged
  // through buf. by_key: its rows are keys c' (P2C_d: element (c', w)), else queries a (element (a, c')).
  template <class Blk, class Product, class Use>
  static FL_BODY void gather(Blk& b, int half, bool by_key, Product product, float* buf, Use use) {
    product();
    b.each([&](const Ctx& c, State& st) {
      const int lane = c.tid & 31, r0 = (c.tid >> 5) * 16;
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) buf[(r0 + mma_c_row(lane, i)) * kBufStride + j * 8 + mma_c_col(lane, i)] = st.w[j][i];
    });
    b.sync();
    b.each([&](const Ctx& c, State& st) {
      const int lane = c.tid & 31, a0 = (c.tid >> 5) * 16;
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int a = a0 + mma_c_row(lane, i), w = j * 8 + mma_c_col(lane, i), cp = a - w + 63 - half * 64;
          if (cp >= 0 && cp < 64) use(st, j, i, by_key ? buf[cp * kBufStride + w] : buf[a * kBufStride + cp], a, w);
        }
    });
    b.sync();
  }
};

// ---- The band's fold: dpos[h][r] = sum of the band sums at the distances d with idx(d) = r, in distance
// order (idx is non-decreasing in d: those distances are one run, found by binary search). One block of 64
// threads (a column each) per (head, r).
struct DebFold {
  using Params = DebParams;
  static constexpr int kMaxThreads = 64, kSmemFloats = 0;
  struct State {
    float red[2];
  };
  // The first band row t in [0, n) with idx(band_lo + t) >= r (n if none).
  static FL_HD int first_at_least(const Params& p, int r) {
    int lo = 0, hi = p.band_n;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (p.rel_idx[p.band_lo + mid + p.max_seqlen - 1] < r) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }
  template <class Blk>
  static FL_BODY void body(Blk& b, const Params& p) {
    const int h = b.ctx.bx, r = b.ctx.by;
    const int t0 = first_at_least(p, r), t1 = first_at_least(p, r + 1);
    b.each([&](const Ctx& c, State&) {
      if (c.tid >= p.head_dim) return;
      for (int which = 0; which < 2; ++which) {
        const float* band = which == 0 ? p.band_key : p.band_query;
        float* out = which == 0 ? p.dpos_key : p.dpos_query;
        if (band == nullptr) continue;
        float acc = 0.0f;
        for (int t = t0; t < t1; ++t) acc += band[(int64_t(h) * p.band_n + t) * p.head_dim + c.tid];
        out[(int64_t(h) * p.pos_rows + r) * p.head_dim + c.tid] = acc;
      }
    });
  }
};

// ---- Launcher: the head-dim bucket (32 or 64) and the dtype are static.
template <class T, int D>
void deberta_bwd_typed(const DebParams& p, Stream stream) {
  const int bh = p.batch * p.heads, tiles = (p.max_seqlen + kDebRows - 1) / kDebRows;
  launch<DebBwdQ<T, D>>(bh, tiles, kDebThreads, p, stream);
  launch<DebBwdKv<T, D>>(bh, tiles, kDebThreads, p, stream);
  if ((p.band_key != nullptr || p.band_query != nullptr) && p.band_n > 0) {
    launch<DebBand<T, D>>(p.heads, (p.band_n + 63) / 64, kDebThreads, p, stream);
    launch<DebFold>(p.heads, p.pos_rows, 64, p, stream);
  }
}

template <class T>
void deberta_bwd_dtype(const DebParams& p, Stream stream) {
  if (p.head_dim <= 32) deberta_bwd_typed<T, 32>(p, stream);
  else deberta_bwd_typed<T, 64>(p, stream);
}

}  // namespace FL_IMPL

#if defined(__CUDACC__)
namespace cuda {
void deberta_bwd(const DebParams& p, cudaStream_t stream) {
  FL_DISPATCH_HALF(p.dtype, T, deberta_bwd_dtype<T>(p, stream));
}
}  // namespace cuda
#else
namespace cpu {
void deberta_bwd(const DebParams& p) {
  FL_DISPATCH_HALF(p.dtype, T, deberta_bwd_dtype<T>(p, nullptr));
}
}  // namespace cpu
#endif

}  // namespace fl
