// What the attention kernels share (attention.cu: forward; attention_backward.cu: dQ, dK/dV, delta): the
// block shape, one (batch, head)'s rows and masks, dropout's keep test, and the head-dim dispatch.
#pragma once

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

// The key tiles of N that rows m0 .. m0 + kM - 1 of a sequence see: the causal mask and the window bound
// them (whole tiles from *lo on; the per-element masks handle the partial ones).
template <int N>
FL_HD int key_tiles(const AttnParams& p, const Seq& s, int m0, int rows, int* lo) {
  int first = 0, hi = s.k_len;
  if (p.causal) hi = min_i(hi, m0 + rows + s.shift);
  if (p.window_right >= 0) hi = min_i(hi, m0 + rows + s.shift + p.window_right);
  if (p.window_left >= 0) first = max_i(0, m0 + s.shift - p.window_left) / N * N;
  *lo = first;
  return hi > first ? (hi - first + N - 1) / N : 0;
}

// Dropout's keep test, as Triton computes it (philox_keep, tiles.h), at the element's 64-bit counter
// ((b H + h) max_q + i) max_k + j.
FL_HD bool dropout_keep(const AttnParams& p, uint64_t seed, int b, int h, int i, int j) {
  const uint64_t counter = (uint64_t(b * int64_t(p.heads) + h) * uint64_t(p.len_q) + uint64_t(i)) *
                               uint64_t(p.len_k) + uint64_t(j);
  return philox_keep(seed, counter, p.dropout_p);
}

// The launchers' static switch: the head-dim bucket (max(E, Ev) padded to 32, 64, 128 or 256) and the dtype.
#define FL_ATTN_DISPATCH(p, fn, stream)                                              \
  do {                                                                               \
    const int d_ = (p).head_dim > (p).head_dim_v ? (p).head_dim : (p).head_dim_v;    \
    FL_DISPATCH_HALF((p).dtype, T_,                                                  \
                     if (d_ <= 32) fn<T_, 32>(p, stream);                            \
                     else if (d_ <= 64) fn<T_, 64>(p, stream);                       \
                     else if (d_ <= 128) fn<T_, 128>(p, stream);                     \
                     else fn<T_, 256>(p, stream));                                   \
  } while (0)

}  // namespace FL_IMPL
}  // namespace fl
