// Test-only kernel: the tensor-core primitives of simt.h (cp.async, ldmatrix, mma.m16n8k16) on fixed tiles,
// compiled by nvcc (the device instructions) and by the host compiler (the harness's emulation), so the
// tests check both against a matmul and the PTX ISA's fragment maps (tests/test_cuda_tensor_cores.py).
//
// One block of two warps; warp w owns rows 16 w .. 16 w + 15 of A, C, D, E:
//   1. cp.async: A (32 x 32) and B (32 x 16, or its transpose) from global to shared memory, 16 bytes per
//      copy; rows of A from m_valid on are zero-filled (the src-size form: the tail of a sequence).
//   2. ldmatrix: A fragments with .x4 per 16-wide k-step (matrix j: rows 8 (j % 2), cols 8 (j / 2));
//      B fragments with .x1, .x2 or .x4 (matrix: n-tile, k-half), from B^T (n, k) as stored, or with .trans
//      from B (k, n) as stored (a K tile and a V tile of attention respectively).
//   3. mma: D = A B + C over 2 k-steps x 2 n-tiles (C, D loaded / stored through the C/D fragment map).
//   4. E = round_T(D) B[0:16]: D's accumulators of the two n-tiles repacked (pack2) as one A fragment.
// Static switch: T (half, bfloat16); the B load's form (x1 / x2 / x4, .trans or not) is chosen at run time
// among static instruction forms, so every form is in each of the two kernels.
#include "simt.h"

namespace fl {
inline namespace FL_IMPL {

template <class T>
struct TcSelftest {
  using Params = TcSelftestParams;
  static constexpr int kWarps = 2, kThreads = 32 * kWarps, kMaxThreads = kThreads;
  static constexpr int kM = 16 * kWarps, kK = 32, kN = 16;
  static constexpr int kSmemFloats = (kM * kK + kK * kN) * 2 / 4;  // A then B, 16-bit elements
  struct State {
    uint32_t a[2][4];    // A fragments per k-step
    uint32_t b[2][4];    // B fragments per k-step: n-tile 0 in [0..1], n-tile 1 in [2..3]
    float acc[2][4];     // D per n-tile
    uint32_t p[4];       // round_T(D) as an A fragment
    float e[2][4];       // E per n-tile
  };

  // B's fragments for k-step kk with X matrices per ldmatrix: the matrices of one load are (n-tile, k-half)
  // = (j / 2, j % 2) for x4, (nt, j) for x2, (nt, kh) for x1. Stored as B^T (rows n, 8 columns k per
  // matrix) they are B's fragments as they stand; stored as B (rows k, 8 columns n) they take .trans.
  template <int X, bool TRANS, class B>
  static FL_BODY void load_b(B& b, const T* bs, int kk) {
#pragma unroll
    for (int nt = 0; nt < (X == 4 ? 1 : 2); ++nt)
#pragma unroll
      for (int kh = 0; kh < (X == 1 ? 2 : 1); ++kh)
        b.template ldmatrix<X, TRANS>([&](const Ctx& c, State& st) {
          const int lane = c.tid & 31, j = (lane >> 3) % X, r = lane & 7;  // lanes >= 8 X: not read
          const int tile = X == 4 ? j / 2 : nt, half = X == 4 ? j % 2 : (X == 2 ? j : kh);
          const T* row = TRANS ? bs + (kk * 16 + half * 8 + r) * kN + tile * 8
                               : bs + (tile * 8 + r) * kK + kk * 16 + half * 8;
          return Ldm{row, &st.b[kk][X == 4 ? 0 : nt * 2 + kh]};  // register j of the load: matrix j
        });
  }

  // A's fragments for k-step KK with ldmatrix.x4 (matrix j: rows 8 (j % 2), columns KK * 16 + 8 (j / 2) of
  // the warp's 16 rows), then B's in the form p asks for (static forms, chosen at run time, uniformly).
  template <int KK, class B>
  static FL_BODY void load_step(B& b, const Params& p, const T* as, const T* bs) {
    b.template ldmatrix<4, false>([&](const Ctx& c, State& st) {
      const int lane = c.tid & 31, warp = c.tid >> 5, j = lane >> 3, r = lane & 7;
      const T* row = as + (warp * 16 + (j % 2) * 8 + r) * kK + KK * 16 + (j / 2) * 8;
      return Ldm{row + (p.misalign ? 1 : 0), st.a[KK]};
    });
    if (p.b_trans) {
      if (p.ldm_x == 4) load_b<4, true>(b, bs, KK);
      else if (p.ldm_x == 2) load_b<2, true>(b, bs, KK);
      else load_b<1, true>(b, bs, KK);
    } else {
      if (p.ldm_x == 4) load_b<4, false>(b, bs, KK);
      else if (p.ldm_x == 2) load_b<2, false>(b, bs, KK);
      else load_b<1, false>(b, bs, KK);
    }
  }

  template <class B>
  static FL_BODY void body(B& b, const Params& p) {
    T* as = b.template shared_as<T>();
    T* bs = as + kM * kK;
    const T* ag = static_cast<const T*>(p.a);
    const T* bg = static_cast<const T*>(p.b);

    // 1. Global -> shared, 16 bytes (8 elements) per copy: A 128 copies, B 64, over 64 threads.
    b.each([&](const Ctx& c, State&) {
      for (int q = c.tid; q < kM * kK / 8; q += kThreads) {
        const int row = q / (kK / 8), col = q % (kK / 8) * 8;
        b.cp_async16(as + row * kK + col, ag + row * kK + col, row < p.m_valid);
      }
      for (int q = c.tid; q < kK * kN / 8; q += kThreads) {
        const int cols = p.b_trans ? kN : kK, row = q / (cols / 8), col = q % (cols / 8) * 8;
        b.cp_async16(bs + row * cols + col, bg + row * cols + col);
      }
      b.cp_async_commit();
      if (p.wait) b.template cp_async_wait<0>();
    });
    b.sync();

    // 2. Shared -> fragments (k-steps as template arguments: fragment indices stay static, in registers).
    load_step<0>(b, p, as, bs);
    load_step<1>(b, p, as, bs);

    // 3. D = A B + C.
    b.each([&](const Ctx& c, State& st) {
      const int lane = c.tid & 31, row0 = (c.tid >> 5) * 16;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          st.acc[nt][i] = p.c[(row0 + mma_c_row(lane, i)) * kN + nt * 8 + mma_c_col(lane, i)];
          st.e[nt][i] = 0.0f;
        }
    });
#pragma unroll
    for (int kk = 0; kk < 2; ++kk)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
        b.template mma_m16n8k16<T>([&](const Ctx&, State& st) { return Mma{st.a[kk], &st.b[kk][nt * 2], st.acc[nt]}; });

    // 4. E = round_T(D) B[0:16]: c0 c1 / c2 c3 of n-tile 0 are A's registers 0 / 1, those of n-tile 1 2 / 3.
    b.each([&](const Ctx&, State& st) {
      st.p[0] = pack2<T>(st.acc[0][0], st.acc[0][1]);
      st.p[1] = pack2<T>(st.acc[0][2], st.acc[0][3]);
      st.p[2] = pack2<T>(st.acc[1][0], st.acc[1][1]);
      st.p[3] = pack2<T>(st.acc[1][2], st.acc[1][3]);
    });
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
      b.template mma_m16n8k16<T>([&](const Ctx&, State& st) { return Mma{st.p, &st.b[0][nt * 2], st.e[nt]}; });

    // 5. Out: D and E through the C/D map; every register as it stands.
    b.each([&](const Ctx& c, State& st) {
      const int lane = c.tid & 31, row0 = (c.tid >> 5) * 16;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int at = (row0 + mma_c_row(lane, i)) * kN + nt * 8 + mma_c_col(lane, i);
          p.d[at] = st.acc[nt][i];
          p.e[at] = st.e[nt][i];
          p.acc[c.tid * 8 + nt * 4 + i] = st.acc[nt][i];
        }
      int32_t* f = p.frags + c.tid * 20;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        f[i] = int32_t(st.a[i / 4][i % 4]);
        f[8 + i] = int32_t(st.b[i / 4][i % 4]);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) f[16 + i] = int32_t(st.p[i]);
    });
  }
};

template <class T>
void tc_selftest_typed(const TcSelftestParams& p, Stream stream) {
  launch<TcSelftest<T>>(1, 1, TcSelftest<T>::kThreads, p, stream);
}

}  // namespace FL_IMPL

#if defined(__CUDACC__)
namespace cuda {
void tc_selftest(const TcSelftestParams& p, cudaStream_t stream) {
  FL_DISPATCH_HALF(p.dtype, T, tc_selftest_typed<T>(p, stream));
}
}  // namespace cuda
#else
namespace cpu {
void tc_selftest(const TcSelftestParams& p) {
  FL_DISPATCH_HALF(p.dtype, T, tc_selftest_typed<T>(p, nullptr));
}
}  // namespace cpu
#endif

}  // namespace fl
