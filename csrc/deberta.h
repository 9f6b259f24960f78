// What the DeBERTa kernels share (deberta.cu: forward; deberta_backward.cu: dQ, dK/dV, the band, the fold):
// the geometry of one sequence, the masks, dropout, the position window and its products.
#pragma once

#include "tiles.h"

namespace fl {
inline namespace FL_IMPL {

constexpr int kDebThreads = 128, kDebRows = 64;

// What the kernels share: the geometry of one sequence, the masks, dropout, the window and its products.
// Their States have w[8][4] (a half window product), fa[4], fb[4] (operand staging).
template <class T, int D>
struct Deb {
  static constexpr int kStride = D + 8;    // rows of the Q, K, V, dO, PK, PQ tiles
  static constexpr int kW = 128;           // window rows (126 used; the last is a clamped spare)
  static constexpr int kWStride = kW + 8;  // rows of the window products and the un-skewed dS (T)
  struct Seq {
    int b, h, len;
    int64_t row0;
  };

  static FL_HD Seq seq(const DebParams& p, int b, int h) {
    Seq s{b, h, p.max_seqlen, 0};
    if (p.cu_seqlens != nullptr) {
      s.row0 = p.cu_seqlens[b];
      s.len = int(p.cu_seqlens[b + 1] - s.row0);
    }
    return s;
  }
  static FL_HD T* at(const void* base, const int64_t* st, const Seq& s, int64_t row) {
    return static_cast<T*>(const_cast<void*>(base)) + s.b * st[0] + s.h * st[1] + (s.row0 + row) * st[2];
  }
  static FL_HD float* stat(float* base, const int64_t* st, const Seq& s, int64_t row) {
    return base + s.b * st[0] + s.h * st[1] + (s.row0 + row) * st[2];
  }
  static FL_HD bool visible(const Seq& s, const uint8_t* kpm, int i, int j) {
    return i >= 0 && i < s.len && j >= 0 && j < s.len && (kpm == nullptr || kpm[j] != 0);
  }
  static FL_HD bool keep(const DebParams& p, uint64_t seed, const Seq& s, int i, int j) {
    const uint64_t counter = (uint64_t(s.b * int64_t(p.heads) + s.h) * uint64_t(p.max_seqlen) + uint64_t(i)) *
                                 uint64_t(p.max_seqlen) + uint64_t(j);
    return philox_keep(seed, counter, p.dropout_p);
  }
  static FL_HD float round(float v) { return to_float(from_float<T>(v)); }  // (as a product stored in T)
  static FL_HD int table_row(const DebParams& p, int d) {  // distances no pair has are clamped into the table
    int e = d + p.max_seqlen - 1;
    e = e < 0 ? 0 : (e > 2 * p.max_seqlen - 2 ? 2 * p.max_seqlen - 2 : e);
    return p.rel_idx[e];
  }

  // rows x D of a head's rows row0 .. (rows outside [0, len) and columns past head_dim zero-filled).
  template <class Blk>
  static FL_BODY void copy_rows(Blk& b, const Ctx& c, T* dst, const void* base, const int64_t* st, const Seq& s,
                                int row0, int rows, const DebParams& p) {
    constexpr int kChunks = D / 8;
    for (int q = c.tid; q < rows * kChunks; q += kDebThreads) {
      const int r = q / kChunks, col = q % kChunks * 8, row = row0 + r;
      const bool ok = row >= 0 && row < s.len && col < p.head_dim;
      b.cp_async16(dst + r * kStride + col, ok ? static_cast<const void*>(at(base, st, s, row) + col) : base, ok);
    }
  }
  // rows w of pos (one head's (2 span, D)) at idx(d0 + w), w < rows.
  template <class Blk>
  static FL_BODY void copy_pos(Blk& b, const Ctx& c, T* dst, const void* pos, int h, const DebParams& p, int d0,
                               int rows) {
    constexpr int kChunks = D / 8;
    const T* head = static_cast<const T*>(pos) + h * p.pos_stride[0];
    for (int q = c.tid; q < rows * kChunks; q += kDebThreads) {
      const int w = q / kChunks, col = q % kChunks * 8;
      const bool ok = col < p.head_dim;
      const T* src = head + int64_t(table_row(p, d0 + w)) * p.pos_stride[1] + col;
      b.cp_async16(dst + w * kStride + col, ok ? static_cast<const void*>(src) : pos, ok);
    }
  }

  // dst (64 x kW, T, rows of kWStride) = rows (64 x D, the warps' A operands) times win^T (kW x D stored
  // (n, k)), 64 columns at a time through st.w.
  template <class Blk>
  static FL_BODY void window_product(Blk& b, const T* rows, const T* win, T* dst) {
#pragma unroll
    for (int half = 0; half < kW / 64; ++half) {
      product64(b, rows, win + half * 64 * kStride);
      b.each([&](const Ctx& c, auto& st) {
        const int lane = c.tid & 31, a0 = (c.tid >> 5) * 16;
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int r = 0; r < 2; ++r)
            store_pair<T>(dst + (a0 + (lane >> 2) + 8 * r) * kWStride + half * 64 + j * 8 + 2 * (lane & 3),
                          pack2<T>(st.w[j][2 * r], st.w[j][2 * r + 1]));
      });
    }
  }
  // st.w (16 x 64 a warp) = rows (64 x D) times cols^T (64 x D stored (n, k)).
  template <class Blk>
  static FL_BODY void product64(Blk& b, const T* rows, const T* cols) {
    b.each([&](const Ctx&, auto& st) { zero(st.w); });
    mma_abt<T, D, 64, kStride, kStride>(b, rows, cols, [](auto& st) { return st.w; });
  }
  // acc[D / 8] (16 x D a warp) += A (64 x kW, T, rows of kWStride: the un-skewed dS) times win (kW x D, (k, n)).
  template <class Blk, class Acc>
  static FL_BODY void add_window(Blk& b, const T* a, const T* win, Acc acc) {
    mma_ab<T, kW, D, kWStride, kStride>(b, a, win, acc);
  }
  // The two runs' share of dpos, a block's part: the 64 rows' (queries' or keys') dS sums over the first and
  // the last run (quad-reduced st.run: rows g, g + 8 first run, then last) staged in `room` (128 floats of
  // free shared memory), then part[which][col] = sum over the rows of run[which][row] x tile[row][col] (the
  // Q or K tile still in shared memory), a thread a (which, col), rows in order. parts: (B H, row tiles, 2, D)
  // float32, summed over batch and tiles by the op layer (dpos[0] and dpos[2 span - 1]).
  template <class Blk>
  static FL_BODY void stage_runs(Blk& b, float* room) {
    b.each([&](const Ctx& c, auto& st) {
      const int lane = c.tid & 31, row = (c.tid >> 5) * 16 + (lane >> 2);
      if ((lane & 3) == 0)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          room[row + 8 * r] = st.run[r];
          room[64 + row + 8 * r] = st.run[2 + r];
        }
    });
    b.sync();
  }
  template <class Blk>
  static FL_BODY void fold_runs(Blk& b, const DebParams& p, float* parts, const T* tile, const T* room_t) {
    const float* room = reinterpret_cast<const float*>(room_t);
    b.each([&](const Ctx& c, auto&) {
      const int which = c.tid >> 6, col = c.tid & 63;
      if (col >= p.head_dim) return;
      float acc = 0.0f;
      for (int r = 0; r < 64; ++r) acc += room[64 * which + r] * to_float(tile[r * kStride + col]);
      parts[((int64_t(b.ctx.bx) * b.ctx.gy + b.ctx.by) * 2 + which) * p.head_dim + col] = acc;
    });
  }

  // Zero a (64 x kW) T buffer (the block's threads striding over 16-byte words).
  template <class Blk>
  static FL_BODY void zero_window(Blk& b, T* buf) {
    b.each([&](const Ctx& c, auto&) {
      for (int q = c.tid; q < 64 * kWStride / 8; q += kDebThreads) store<8>(buf + q * 8, Vec<T, 8>{});
    });
  }
};


}  // namespace FL_IMPL
}  // namespace fl
