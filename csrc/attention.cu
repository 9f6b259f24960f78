// Flash attention on the tensor cores (mma.sync m16n8k16, ldmatrix, cp.async; sm_80 and later), dense and
// packed: causal, key padding, GQA, windows, dropout, lse. Forward, and a deterministic backward in two
// kernels (dK/dV per key block, dQ per query block: no atomics).
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
#include "tiles.h"

namespace fl {
inline namespace FL_IMPL {

constexpr int kAttnWarps = 4, kAttnThreads = 32 * kAttnWarps, kAttnRows = 16 * kAttnWarps;

// ---- One (batch, head)'s rows and the (query, key) pairs that take part.
struct Seq {
  int b, h;         // batch (or packed sequence) and head (query head; the K/V head in AttnBwdKv)
  int64_t q0, k0;   // first row of the sequence in a packed tensor, 0 when dense
  int q_len, k_len;
  int shift;        // bottom-right alignment: Lk_b - Lq_b, else 0
};

FL_HD Seq seq_of(const AttnParams& p, int b, int h) {
  Seq s{b, h, 0, 0, p.len_q, p.len_k, 0};
  if (p.cu_q != nullptr) {
    s.q0 = p.cu_q[b];
    s.q_len = int(p.cu_q[b + 1] - s.q0);
    s.k0 = p.cu_k[b];
    s.k_len = int(p.cu_k[b + 1] - s.k0);
  }
  s.shift = p.bottom_right ? s.k_len - s.q_len : 0;
  return s;
}

FL_HD int min_i(int a, int b) { return a < b ? a : b; }
FL_HD int max_i(int a, int b) { return a > b ? a : b; }
FL_HD float fmax_(float a, float b) { return a > b ? a : b; }

template <class T>
FL_HD T* row_at(const void* base, const int64_t* stride, int b, int h, int64_t row) {
  return static_cast<T*>(const_cast<void*>(base)) + b * stride[0] + h * stride[1] + row * stride[2];
}

// Query i sees key j (positions inside the sequence).
FL_HD bool visible(const AttnParams& p, const Seq& s, const uint8_t* kpm, int i, int j) {
  if (i >= s.q_len || j >= s.k_len) return false;
  const int d = j - i - s.shift;  // the key's offset from the (shifted) diagonal
  if (p.causal && d > 0) return false;
  if (p.window_left >= 0 && d < -p.window_left) return false;
  if (p.window_right >= 0 && d > p.window_right) return false;
  return kpm == nullptr || kpm[j] != 0;
}

// Dropout's keep test, as Triton computes it (philox_keep, tiles.h), at the element's 64-bit counter
// ((b H + h) max_q + i) max_k + j.
FL_HD bool dropout_keep(const AttnParams& p, uint64_t seed, int b, int h, int i, int j) {
  const uint64_t counter = (uint64_t(b * int64_t(p.heads) + h) * uint64_t(p.len_q) + uint64_t(i)) *
                               uint64_t(p.len_k) + uint64_t(j);
  return philox_keep(seed, counter, p.dropout_p);
}

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
    // Key range of the tile's rows: causal and the window bound it; whole tiles of N.
    int lo = 0, hi = s.k_len;
    if (p.causal) hi = min_i(hi, m0 + kM + s.shift);
    if (p.window_right >= 0) hi = min_i(hi, m0 + kM + s.shift + p.window_right);
    if (p.window_left >= 0) lo = max_i(0, m0 + s.shift - p.window_left) / N * N;
    const int n_tiles = hi > lo ? (hi - lo + N - 1) / N : 0;
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
      b.each([&](const Ctx& c, State&) {  // the next tile's copies go out before this one is used
        if (t + 1 < n_tiles) {
          issue_kv(c, t + 1);
          b.cp_async_commit();
          b.template cp_async_wait<1>();
        } else {
          b.template cp_async_wait<0>();
        }
      });
      b.sync();
      const T* kt = ks + (t & 1) * N * kStride;
      const T* vt = vs + (t & 1) * N * kStride;
      // S = Q K^T
      b.each([&](const Ctx&, State& st) {
#pragma unroll
        for (int j = 0; j < N / 8; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) st.s[j][i] = 0.0f;
      });
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        load_a<T, kStride>(b, qs, kk * 16, [](State& st) { return st.fa; });
#pragma unroll
        for (int np = 0; np < N / 16; ++np) {
          load_b_nk<T, kStride>(b, kt, np * 16, kk * 16, [](State& st) { return st.fb; });
          b.template mma_m16n8k16<T>([&](const Ctx&, State& st) { return Mma{st.fa, st.fb, st.s[2 * np]}; });
          b.template mma_m16n8k16<T>([&](const Ctx&, State& st) { return Mma{st.fa, st.fb + 2, st.s[2 * np + 1]}; });
        }
      }
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
#pragma unroll
        for (int kq = 0; kq < N / 16; ++kq) {
          st.pa[kq][0] = pack_c<T>(&st.s[2 * kq][0]);
          st.pa[kq][1] = pack_c<T>(&st.s[2 * kq][2]);
          st.pa[kq][2] = pack_c<T>(&st.s[2 * kq + 1][0]);
          st.pa[kq][3] = pack_c<T>(&st.s[2 * kq + 1][2]);
        }
      });
      // O += P V
#pragma unroll
      for (int kq = 0; kq < N / 16; ++kq)
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          load_b_kn<T, kStride>(b, vt, kq * 16, dp * 16, [](State& st) { return st.fb; });
          b.template mma_m16n8k16<T>([&](const Ctx&, State& st) { return Mma{st.pa[kq], st.fb, st.o[2 * dp]}; });
          b.template mma_m16n8k16<T>([&](const Ctx&, State& st) { return Mma{st.pa[kq], st.fb + 2, st.o[2 * dp + 1]}; });
        }
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
    int lo = 0, hi = s.k_len;
    if (p.causal) hi = min_i(hi, m0 + kM + s.shift);
    if (p.window_right >= 0) hi = min_i(hi, m0 + kM + s.shift + p.window_right);
    if (p.window_left >= 0) lo = max_i(0, m0 + s.shift - p.window_left) / N * N;
    const int n_tiles = hi > lo ? (hi - lo + N - 1) / N : 0;
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
      b.each([&](const Ctx& c, State&) {
        if (t + 1 < n_tiles) {
          issue_kv(c, t + 1);
          b.cp_async_commit();
          b.template cp_async_wait<1>();
        } else {
          b.template cp_async_wait<0>();
        }
      });
      b.sync();
      const T* kt = ks + (t & 1) * N * kStride;
      const T* vt = vs + (t & 1) * N * kStride;
      b.each([&](const Ctx&, State& st) {
#pragma unroll
        for (int j = 0; j < N / 8; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) st.s[j][i] = st.dp[j][i] = 0.0f;
      });
      // S = Q K^T
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        load_a<T, kStride>(b, qs, kk * 16, [](State& st) { return st.fa; });
#pragma unroll
        for (int np = 0; np < N / 16; ++np) {
          load_b_nk<T, kStride>(b, kt, np * 16, kk * 16, [](State& st) { return st.fb; });
          b.template mma_m16n8k16<T>([&](const Ctx&, State& st) { return Mma{st.fa, st.fb, st.s[2 * np]}; });
          b.template mma_m16n8k16<T>([&](const Ctx&, State& st) { return Mma{st.fa, st.fb + 2, st.s[2 * np + 1]}; });
        }
      }
      // dP = dO V^T
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        load_a<T, kStride>(b, dos, kk * 16, [](State& st) { return st.fa; });
#pragma unroll
        for (int np = 0; np < N / 16; ++np) {
          load_b_nk<T, kStride>(b, vt, np * 16, kk * 16, [](State& st) { return st.fb; });
          b.template mma_m16n8k16<T>([&](const Ctx&, State& st) { return Mma{st.fa, st.fb, st.dp[2 * np]}; });
          b.template mma_m16n8k16<T>([&](const Ctx&, State& st) { return Mma{st.fa, st.fb + 2, st.dp[2 * np + 1]}; });
        }
      }
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
#pragma unroll
        for (int kq = 0; kq < N / 16; ++kq) {
          st.pa[kq][0] = pack_c<T>(&st.dp[2 * kq][0]);
          st.pa[kq][1] = pack_c<T>(&st.dp[2 * kq][2]);
          st.pa[kq][2] = pack_c<T>(&st.dp[2 * kq + 1][0]);
          st.pa[kq][3] = pack_c<T>(&st.dp[2 * kq + 1][2]);
        }
      });
      // dQ += dS K
#pragma unroll
      for (int kq = 0; kq < N / 16; ++kq)
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          load_b_kn<T, kStride>(b, kt, kq * 16, dp * 16, [](State& st) { return st.fb; });
          b.template mma_m16n8k16<T>([&](const Ctx&, State& st) { return Mma{st.pa[kq], st.fb, st.dq[2 * dp]}; });
          b.template mma_m16n8k16<T>([&](const Ctx&, State& st) { return Mma{st.pa[kq], st.fb + 2, st.dq[2 * dp + 1]}; });
        }
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
      b.each([&](const Ctx& c, State&) {
        if (it + 1 < n_iters) {
          issue_q(c, it + 1);
          b.cp_async_commit();
          b.template cp_async_wait<1>();
        } else {
          b.template cp_async_wait<0>();
        }
      });
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
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        load_a<T, kStride>(b, ks, kk * 16, [](State& st) { return st.fa; });
#pragma unroll
        for (int np = 0; np < M / 16; ++np) {
          load_b_nk<T, kStride>(b, qt, np * 16, kk * 16, [](State& st) { return st.fb; });
          b.template mma_m16n8k16<T>([&](const Ctx&, State& st) { return Mma{st.fa, st.fb, st.s[2 * np]}; });
          b.template mma_m16n8k16<T>([&](const Ctx&, State& st) { return Mma{st.fa, st.fb + 2, st.s[2 * np + 1]}; });
        }
        if constexpr (kDK) {
          load_a<T, kStride>(b, vs, kk * 16, [](State& st) { return st.fa; });
#pragma unroll
          for (int np = 0; np < M / 16; ++np) {
            load_b_nk<T, kStride>(b, dot, np * 16, kk * 16, [](State& st) { return st.fb; });
            b.template mma_m16n8k16<T>([&](const Ctx&, State& st) { return Mma{st.fa, st.fb, st.dp[2 * np]}; });
            b.template mma_m16n8k16<T>([&](const Ctx&, State& st) { return Mma{st.fa, st.fb + 2, st.dp[2 * np + 1]}; });
          }
        }
      }
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
#pragma unroll
        for (int kq = 0; kq < M / 16; ++kq) {
          if constexpr (kDV) {
            st.pa[kq][0] = pack_c<T>(&st.s[2 * kq][0]);
            st.pa[kq][1] = pack_c<T>(&st.s[2 * kq][2]);
            st.pa[kq][2] = pack_c<T>(&st.s[2 * kq + 1][0]);
            st.pa[kq][3] = pack_c<T>(&st.s[2 * kq + 1][2]);
          }
        }
      });
      if constexpr (kDV) {  // dV += (P^T D) dO
#pragma unroll
        for (int kq = 0; kq < M / 16; ++kq)
#pragma unroll
          for (int dp = 0; dp < D / 16; ++dp) {
            load_b_kn<T, kStride>(b, dot, kq * 16, dp * 16, [](State& st) { return st.fb; });
            b.template mma_m16n8k16<T>([&](const Ctx&, State& st) { return Mma{st.pa[kq], st.fb, st.dv[2 * dp]}; });
            b.template mma_m16n8k16<T>([&](const Ctx&, State& st) { return Mma{st.pa[kq], st.fb + 2, st.dv[2 * dp + 1]}; });
          }
      }
      if constexpr (kDK) {  // dK += dS^T Q
        b.each([&](const Ctx&, State& st) {
#pragma unroll
          for (int kq = 0; kq < M / 16; ++kq) {
            st.pa[kq][0] = pack_c<T>(&st.dp[2 * kq][0]);
            st.pa[kq][1] = pack_c<T>(&st.dp[2 * kq][2]);
            st.pa[kq][2] = pack_c<T>(&st.dp[2 * kq + 1][0]);
            st.pa[kq][3] = pack_c<T>(&st.dp[2 * kq + 1][2]);
          }
        });
#pragma unroll
        for (int kq = 0; kq < M / 16; ++kq)
#pragma unroll
          for (int dp = 0; dp < D / 16; ++dp) {
            load_b_kn<T, kStride>(b, qt, kq * 16, dp * 16, [](State& st) { return st.fb; });
            b.template mma_m16n8k16<T>([&](const Ctx&, State& st) { return Mma{st.pa[kq], st.fb, st.dk[2 * dp]}; });
            b.template mma_m16n8k16<T>([&](const Ctx&, State& st) { return Mma{st.pa[kq], st.fb + 2, st.dk[2 * dp + 1]}; });
          }
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

// ================================================================================================
// Launchers: the head-dim bucket (max(E, Ev) padded to 32, 64, 128 or 256) and the dtype are static.
template <class T, int D>
void attention_fwd_typed(const AttnParams& p, Stream stream) {
  constexpr int N = D <= 128 ? 64 : 32;
  launch<AttnFwd<T, D, N>>(p.batch * p.heads, (p.len_q + kAttnRows - 1) / kAttnRows, kAttnThreads, p, stream);
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

#define FL_ATTN_DISPATCH(p, fn, stream)                                              \
  do {                                                                               \
    const int d_ = (p).head_dim > (p).head_dim_v ? (p).head_dim : (p).head_dim_v;    \
    if ((p).dtype == DType::F16) {                                                   \
      if (d_ <= 32) fn<half, 32>(p, stream);                                         \
      else if (d_ <= 64) fn<half, 64>(p, stream);                                    \
      else if (d_ <= 128) fn<half, 128>(p, stream);                                  \
      else fn<half, 256>(p, stream);                                                 \
    } else {                                                                         \
      if (d_ <= 32) fn<bfloat16, 32>(p, stream);                                     \
      else if (d_ <= 64) fn<bfloat16, 64>(p, stream);                                \
      else if (d_ <= 128) fn<bfloat16, 128>(p, stream);                              \
      else fn<bfloat16, 256>(p, stream);                                             \
    }                                                                                \
  } while (0)

}  // namespace FL_IMPL

#if defined(__CUDACC__)
namespace cuda {
void attention_fwd(const AttnParams& p, cudaStream_t stream) { FL_ATTN_DISPATCH(p, attention_fwd_typed, stream); }
void attention_bwd(const AttnParams& p, cudaStream_t stream) { FL_ATTN_DISPATCH(p, attention_bwd_typed, stream); }
void attention_delta(const DeltaParams& p, cudaStream_t stream) {
  if (p.dtype == DType::F16) attention_delta_typed<half>(p, stream);
  else attention_delta_typed<bfloat16>(p, stream);
}
}  // namespace cuda
#else
namespace cpu {
void attention_fwd(const AttnParams& p) { FL_ATTN_DISPATCH(p, attention_fwd_typed, nullptr); }
void attention_bwd(const AttnParams& p) { FL_ATTN_DISPATCH(p, attention_bwd_typed, nullptr); }
void attention_delta(const DeltaParams& p) {
  if (p.dtype == DType::F16) attention_delta_typed<half>(p, nullptr);
  else attention_delta_typed<bfloat16>(p, nullptr);
}
}  // namespace cpu
#endif

}  // namespace fl
