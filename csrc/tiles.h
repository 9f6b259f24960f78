// Tile-level helpers over simt.h's tensor-core primitives, shared by the tensor-core kernels (attention.cu,
// lora.cu): fragments from shared-memory tiles by ldmatrix, and global -> shared tile copies by cp.async.
// A warp w owns rows 16 w .. 16 w + 15 of every A operand (the mma's rows).
#pragma once

#include "simt.h"

namespace fl {
inline namespace FL_IMPL {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Dropout's keep test, as Triton computes it (tl.rand / tl.philox): Philox4x32-10 keyed by the 64-bit seed
// at the 64-bit counter (low word c0, high word c1, c2 = c3 = 0), the first output as a uniform in [0, 1)
// (triton.language.uint_to_uniform_float: int32 bits, negatives folded to -x - 1, times 4.6566127342e-10),
// kept when >= p. The same seed and counter drop the same element on the triton and cuda backends.
FL_HD bool philox_keep(uint64_t seed, uint64_t counter, float p) {
  uint32_t c0 = uint32_t(counter), c1 = uint32_t(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t a = c0, c = c2;
    c0 = umulhi(0xCD9E8D57u, c) ^ c1 ^ k0;
    c2 = umulhi(0xD2511F53u, a) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * c;
    c3 = 0xD2511F53u * a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  int32_t x;
  memcpy(&x, &c0, 4);
  x = x < 0 ? ~x : x;  // -x - 1 without the overflow at INT32_MIN
  return float(x) * 4.6566127342e-10f >= p;
}

// ---- Fragments from a tile in shared memory (rows of kStride elements). `get(st)` names the registers.
// A (16 x 16) of the warp's rows 16 w .. 16 w + 15, columns col0 .. col0 + 15: matrix j of ldmatrix.x4 is
// rows 8 (j % 2), columns 8 (j / 2), i.e. A's registers a0a1, a2a3, a4a5, a6a7 in order.
template <class T, int kStride, class Blk, class Get>
FL_BODY void load_a(Blk& b, const T* tile, int col0, Get get) {
  b.template ldmatrix<4, false>([&](const Ctx& c, auto& st) {
    const int lane = c.tid & 31, j = lane >> 3, r = lane & 7;
    return Ldm{tile + ((c.tid >> 5) * 16 + (j & 1) * 8 + r) * kStride + col0 + (j >> 1) * 8, get(st)};
  });
}
// B (16 x 8) of two n-tiles n0, n0 + 8 over k = k0 .. k0 + 15 from a tile stored (n, k) (K for S = Q K^T):
// registers 0-1 the first n-tile's, 2-3 the second's.
template <class T, int kStride, class Blk, class Get>
FL_BODY void load_b_nk(Blk& b, const T* tile, int n0, int k0, Get get) {
  b.template ldmatrix<4, false>([&](const Ctx& c, auto& st) {
    const int lane = c.tid & 31, j = lane >> 3, r = lane & 7;
    return Ldm{tile + (n0 + (j >> 1) * 8 + r) * kStride + k0 + (j & 1) * 8, get(st)};
  });
}
// The same from a tile stored (k, n) (V for O = P V): ldmatrix .trans.
template <class T, int kStride, class Blk, class Get>
FL_BODY void load_b_kn(Blk& b, const T* tile, int k0, int n0, Get get) {
  b.template ldmatrix<4, true>([&](const Ctx& c, auto& st) {
    const int lane = c.tid & 31, j = lane >> 3, r = lane & 7;
    return Ldm{tile + (k0 + (j & 1) * 8 + r) * kStride + n0 + (j >> 1) * 8, get(st)};
  });
}

// rows x D of a row-major tile into shared memory (rows of kStride elements), 16 bytes a copy, the block's
// kThreads threads striding over the copies; rows past `valid_rows` and columns past `cols` are zero-filled
// (nothing is read: the source is then `base`, an aligned pointer).
template <class T, int D, int kStride, int kThreads, class Blk>
FL_BODY void copy_tile(Blk& b, const Ctx& c, T* dst, const T* src, int64_t src_stride, int rows, int valid_rows,
                       int cols, const void* base) {
  constexpr int kChunks = D / 8;
  for (int q = c.tid; q < rows * kChunks; q += kThreads) {
    const int row = q / kChunks, col = q % kChunks * 8;
    const bool ok = row < valid_rows && col < cols;
    b.cp_async16(dst + row * kStride + col, ok ? static_cast<const void*>(src + row * src_stride + col) : base, ok);
  }
}

// A .b32 register of two T (pack2) stored at dst (4-byte aligned): one 32-bit store on the device (a memcpy
// into a T* compiles to four byte stores there), a memcpy on the host.
template <class T>
FL_HD void store_pair(T* dst, uint32_t v) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint32_t*>(dst) = v;
#else
  memcpy(dst, &v, 4);
#endif
}

// Two accumulators (C elements i, i + 1 of an n-tile) as one register of T (an A operand).
template <class T>
FL_HD uint32_t pack_c(const float* c) { return pack2<T>(c[0], c[1]); }

// ---- The double buffer's step at tile t of n_tiles: tile t + 1's copies issued (issue(c, t + 1), into the
// other buffer) and committed, then each thread waits for its own copies of tile t (every group but the
// newest; all of them on the last tile). A b.sync() must follow before any thread reads tile t, and the
// previous tile's readers must have passed a b.sync() before this refills their buffer.
template <class Blk, class Issue>
FL_BODY void prefetch_next(Blk& b, int t, int n_tiles, Issue issue) {
  b.each([&](const Ctx& c, auto&) {
    if (t + 1 < n_tiles) {
      issue(c, t + 1);
      b.cp_async_commit();
      b.template cp_async_wait<1>();
    } else {
      b.template cp_async_wait<0>();
    }
  });
}

// ---- The tile products every tensor-core kernel is made of. States name their operand staging registers
// fa[4] (A) and fb[4] (B); `acc(st)` names an accumulator array of C fragments (n-tiles of 8 columns).

// acc[0 .. N / 8) += A B^T over k = 0 .. K: A the warp's 16 rows of a_tile (rows of AS elements), B^T N rows of
// b_tile (stored (n, k), rows of BS elements): a score tile S = Q K^T, or any product against rows.
template <class T, int K, int N, int AS, int BS, class Blk, class Acc>
FL_BODY void mma_abt(Blk& b, const T* a_tile, const T* b_tile, Acc acc) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    load_a<T, AS>(b, a_tile, kk * 16, [](auto& st) { return st.fa; });
#pragma unroll
    for (int np = 0; np < N / 16; ++np) {
      load_b_nk<T, BS>(b, b_tile, np * 16, kk * 16, [](auto& st) { return st.fb; });
      b.template mma_m16n8k16<T>([&](const Ctx&, auto& st) { return Mma{st.fa, st.fb, acc(st)[2 * np]}; });
      b.template mma_m16n8k16<T>([&](const Ctx&, auto& st) { return Mma{st.fa, st.fb + 2, acc(st)[2 * np + 1]}; });
    }
  }
}

// acc[0 .. N / 8) += A B over k = 0 .. K: A the warp's 16 rows of a_tile (rows of AS elements), B K rows of
// b_tile stored (k, n) (rows of BS elements, ldmatrix .trans).
template <class T, int K, int N, int AS, int BS, class Blk, class Acc>
FL_BODY void mma_ab(Blk& b, const T* a_tile, const T* b_tile, Acc acc) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    load_a<T, AS>(b, a_tile, kk * 16, [](auto& st) { return st.fa; });
#pragma unroll
    for (int np = 0; np < N / 16; ++np) {
      load_b_kn<T, BS>(b, b_tile, kk * 16, np * 16, [](auto& st) { return st.fb; });
      b.template mma_m16n8k16<T>([&](const Ctx&, auto& st) { return Mma{st.fa, st.fb, acc(st)[2 * np]}; });
      b.template mma_m16n8k16<T>([&](const Ctx&, auto& st) { return Mma{st.fa, st.fb + 2, acc(st)[2 * np + 1]}; });
    }
  }
}

// acc[0 .. N / 8) += P B: P (16 x K a warp) as A fragments pa(st)[K / 16][4] (pack_a), B K rows of b_tile
// stored (k, n) (rows of BS elements, ldmatrix .trans): O += P V, dQ += dS K, dV += P^T dO, dK += dS^T Q.
template <class T, int K, int N, int BS, class Blk, class PA, class Acc>
FL_BODY void mma_pb(Blk& b, const T* b_tile, PA pa, Acc acc) {
#pragma unroll
  for (int kq = 0; kq < K / 16; ++kq)
#pragma unroll
    for (int np = 0; np < N / 16; ++np) {
      load_b_kn<T, BS>(b, b_tile, kq * 16, np * 16, [](auto& st) { return st.fb; });
      b.template mma_m16n8k16<T>([&](const Ctx&, auto& st) { return Mma{pa(st)[kq], st.fb, acc(st)[2 * np]}; });
      b.template mma_m16n8k16<T>([&](const Ctx&, auto& st) { return Mma{pa(st)[kq], st.fb + 2, acc(st)[2 * np + 1]}; });
    }
}

// C fragments of N / 8 adjacent n-tiles (16 x N floats a warp) rounded to T as the A fragments of the
// 16 x N operand: n-tiles 2 kq and 2 kq + 1 are A's k-halves (tc_selftest's E, FlashAttention's P).
template <class T, int N>
FL_HD void pack_a(uint32_t (&pa)[N / 16][4], const float (&c)[N / 8][4]) {
#pragma unroll
  for (int kq = 0; kq < N / 16; ++kq) {
    pa[kq][0] = pack_c<T>(&c[2 * kq][0]);
    pa[kq][1] = pack_c<T>(&c[2 * kq][2]);
    pa[kq][2] = pack_c<T>(&c[2 * kq + 1][0]);
    pa[kq][3] = pack_c<T>(&c[2 * kq + 1][2]);
  }
}

template <int R, int C>
FL_HD void zero(float (&x)[R][C]) {
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < C; ++c) x[r][c] = 0.0f;
}

}  // namespace FL_IMPL
}  // namespace fl
