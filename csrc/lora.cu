// The fused LoRA linear's GEMM on the tensor cores (mma.sync m16n8k16, ldmatrix, cp.async): a tiled GEMM
// whose output tile, before its one rounding, gets a low-rank pair's product and a bias added:
//
//     Y (M x N) = X (M x K) Wop (K x N)  +  s * (P (M x R) Qop (R x N)) [* keep]  +  bias
//
// forward (transposed = false): X = x, Wop = W^T read from W (N, K) as stored, P = x A^T (the op layer's
//     skinny product, rounded to T as PEFT's layer rounds it), Qop = B^T read from B (N, R); y = x W^T + b +
//     s (x A^T) B^T.
// dx (transposed = true): X = dy, Wop = W read from W (N_out, K_in) as stored, P = dy B, Qop = A (R, K_in);
//     dx = dy W + s (dy B) A * keep (dropout's mask applies to the low-rank branch only).
// Both products accumulate in float32 registers; the epilogue forms acc + s * lr (+ bias) and rounds once.
//
// Tiles: a block of 4 warps computes 64 x 64 outputs (a warp 16 rows x 8 n-tiles); the K loop steps 32 at a
// time with X and Wop tiles double-buffered through cp.async; the rank loop then runs 16 at a time over P
// and Qop tiles in the same shared memory. Operands are read as 16-byte chunks: K, N and the rank are
// multiples of 8 (the binding pads the rank, the op layer K and N, with zeros), rows and strides 16-byte
// aligned (the binding copies a tensor that is not). Grid: (M tiles, N tiles).
#include "tiles.h"

namespace fl {
inline namespace FL_IMPL {

template <class T, bool TRANS>
struct LoraGemm {
  using Params = LoraParams;
  static constexpr int kWarps = 4, kThreads = 32 * kWarps, kMaxThreads = kThreads;
  static constexpr int kBM = 64, kBN = 64, kBK = 32, kBR = 16;
  static constexpr int kXStride = kBK + 8;                   // X tile (64 x 32), padded rows
  static constexpr int kWRows = TRANS ? kBK : kBN;           // Wop tile stored (k, n) or (n, k)
  static constexpr int kWStride = (TRANS ? kBN : kBK) + 8;
  static constexpr int kXTile = kBM * kXStride, kWTile = kWRows * kWStride;
  static constexpr int kSmemFloats = 2 * (kXTile + kWTile) * int(sizeof(T)) / 4;  // double-buffered
  // The rank loop reuses the first buffer: P (64 x 16) and Qop (16 x 64 or 64 x 16).
  static constexpr int kPStride = kBR + 8, kQRows = TRANS ? kBR : kBN, kQStride = (TRANS ? kBN : kBR) + 8;
  static_assert(kBM * kPStride + kQRows * kQStride <= 2 * (kXTile + kWTile), "rank tiles fit the buffers");
  struct State {
    float acc[kBN / 8][4];  // X Wop
    float lr[kBN / 8][4];   // P Qop
    uint32_t fa[4], fb[4];
  };

  template <class Blk>
  static FL_BODY void body(Blk& b, const Params& p) {
    const int64_t m0 = int64_t(b.ctx.bx) * kBM;
    const int n0 = b.ctx.by * kBN;
    const int k_tiles = int((p.k + kBK - 1) / kBK), r_tiles = int((p.r + kBR - 1) / kBR);
    const int rows = int(p.m - m0 < kBM ? p.m - m0 : kBM);
    const T* x = static_cast<const T*>(p.x) + m0 * p.x_stride;
    const T* w = static_cast<const T*>(p.w);
    T* xs = b.template shared_as<T>();
    T* ws = xs + 2 * kXTile;
    auto issue = [&](const Ctx& c, int t) {  // K tile t into buffer t & 1
      const int k0 = t * kBK;
      copy_tile<T, kBK, kXStride, kThreads>(b, c, xs + (t & 1) * kXTile, x + k0, p.x_stride, kBM, rows,
                                            int(p.k - k0), p.x);
      if (TRANS)  // Wop rows k0 .., columns n0 .. of W (K, N) as stored
        copy_tile<T, kBN, kWStride, kThreads>(b, c, ws + (t & 1) * kWTile, w + k0 * p.w_stride + n0, p.w_stride,
                                              kBK, int(p.k - k0), int(p.n - n0), p.w);
      else        // rows n0 .. of W (N, K), columns k0 ..
        copy_tile<T, kBK, kWStride, kThreads>(b, c, ws + (t & 1) * kWTile, w + n0 * p.w_stride + k0, p.w_stride,
                                              kBN, int(p.n - n0), int(p.k - k0), p.w);
    };
    b.each([&](const Ctx& c, State& st) {
      if (k_tiles > 0) issue(c, 0);
      b.cp_async_commit();
      zero(st.acc);
      zero(st.lr);
    });

    for (int t = 0; t < k_tiles; ++t) {
      prefetch_next(b, t, k_tiles, issue);
      b.sync();
      const T* xt = xs + (t & 1) * kXTile;
      const T* wt = ws + (t & 1) * kWTile;
      if constexpr (TRANS) mma_ab<T, kBK, kBN, kXStride, kWStride>(b, xt, wt, [](State& st) { return st.acc; });
      else mma_abt<T, kBK, kBN, kXStride, kWStride>(b, xt, wt, [](State& st) { return st.acc; });
      b.sync();  // every warp is done with this buffer before it is refilled (or reused by the rank loop)
    }

    // The low-rank pair, 16 of the rank at a time (one buffer: r is small next to K).
    const T* pg = static_cast<const T*>(p.p) + m0 * p.p_stride;
    const T* qg = static_cast<const T*>(p.q);
    T* ps = xs;
    T* qs = xs + kBM * kPStride;
    for (int t = 0; t < r_tiles; ++t) {
      const int r0 = t * kBR;
      b.each([&](const Ctx& c, State&) {
        copy_tile<T, kBR, kPStride, kThreads>(b, c, ps, pg + r0, p.p_stride, kBM, rows, int(p.r - r0), p.p);
        if (TRANS)  // Qop rows r0 .., columns n0 .. of Q (R, N)
          copy_tile<T, kBN, kQStride, kThreads>(b, c, qs, qg + r0 * p.q_stride + n0, p.q_stride, kBR,
                                                int(p.r - r0), int(p.n - n0), p.q);
        else        // rows n0 .. of Q (N, R), columns r0 ..
          copy_tile<T, kBR, kQStride, kThreads>(b, c, qs, qg + n0 * p.q_stride + r0, p.q_stride, kBN,
                                                int(p.n - n0), int(p.r - r0), p.q);
        b.cp_async_commit();
        b.template cp_async_wait<0>();
      });
      b.sync();
      if constexpr (TRANS) mma_ab<T, kBR, kBN, kPStride, kQStride>(b, ps, qs, [](State& st) { return st.lr; });
      else mma_abt<T, kBR, kBN, kPStride, kQStride>(b, ps, qs, [](State& st) { return st.lr; });
      b.sync();
    }

    // Epilogue: acc + s * lr [* keep] + bias, rounded once, two columns (4 bytes) a store.
    b.each([&](const Ctx& c, State& st) {
      const int lane = c.tid & 31, row0 = (c.tid >> 5) * 16 + (lane >> 2), col0 = n0 + 2 * (lane & 3);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = m0 + row0 + 8 * h;
        if (row >= p.m) continue;
        T* y = static_cast<T*>(p.y) + row * p.y_stride;
        const uint8_t* keep = p.keep ? p.keep + row * p.keep_stride : nullptr;
#pragma unroll
        for (int j = 0; j < kBN / 8; ++j) {
          const int col = col0 + j * 8;
          if (col >= p.n) continue;
          float v[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float low = p.scaling * st.lr[j][2 * h + e];
            if (keep && !keep[col + e]) low = 0.0f;
            v[e] = st.acc[j][2 * h + e] + low + (p.bias ? p.bias[col + e] : 0.0f);
          }
          const uint32_t packed = pack2<T>(v[0], v[1]);
          store_pair<T>(y + col, packed);
        }
      }
    });
  }
};

template <class T>
void lora_gemm_typed(const LoraParams& p, Stream stream) {
  const int gx = int((p.m + LoraGemm<T, false>::kBM - 1) / LoraGemm<T, false>::kBM);
  const int gy = int((p.n + LoraGemm<T, false>::kBN - 1) / LoraGemm<T, false>::kBN);
  if (p.transposed) launch<LoraGemm<T, true>>(gx, gy, LoraGemm<T, true>::kThreads, p, stream);
  else launch<LoraGemm<T, false>>(gx, gy, LoraGemm<T, false>::kThreads, p, stream);
}

}  // namespace FL_IMPL

#if defined(__CUDACC__)
namespace cuda {
void lora_gemm(const LoraParams& p, cudaStream_t stream) {
  FL_DISPATCH_HALF(p.dtype, T, lora_gemm_typed<T>(p, stream));
}
}  // namespace cuda
#else
namespace cpu {
void lora_gemm(const LoraParams& p) {
  FL_DISPATCH_HALF(p.dtype, T, lora_gemm_typed<T>(p, nullptr));
}
}  // namespace cpu
#endif

}  // namespace fl
