// The launch interface of the kernels in csrc/: plain parameter structs and one launcher per kernel
// family, shared by the .cu files and the binding layer (bindings.cpp). No torch and no CUDA header:
// the launchers for the device take a cudaStream_t (declared only where the CUDA runtime is included),
// the CPU harness launchers (fl::cpu) run the same kernel bodies on the host.
//
// Conventions: pointers to the first element; row strides in elements (the last dimension is
// contiguous); float32 for statistics, weights, biases and cos/sin tables.
#pragma once

#include <stdint.h>

namespace fl {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// RMSNorm / LayerNorm forward over rows of n features: s = x (+ residual), y = xhat * w + b.
struct NormFwdParams {
  const void* x;         // (rows, n) in dtype
  const void* residual;  // (rows, n) or null (no fused add)
  const float* weight;   // (n,) or null; the RMS offset is added to it
  const float* bias;     // (n,) or null (LayerNorm only)
  void* y;               // (rows, n) out
  void* s;               // (rows, n) out: x + residual (null without residual)
  float* mean;           // (rows,) out (LayerNorm; null for RMSNorm)
  float* rstd;           // (rows,) out
  int64_t rows, n;
  int64_t x_stride, res_stride, y_stride, s_stride;
  float eps, offset;
  bool is_rms;
  DType dtype;
};

// Backward: ds = rstd * (g - <g> - xhat <g xhat>) (+ dsum), g = dy * w; and per row-chunk partial
// sums of dy * xhat (dweight) and dy (dbias) over rows, reduced over the chunks by the caller.
struct NormBwdParams {
  const void* dy;         // (rows, n)
  const void* s;          // (rows, n): the normalised input (x, or x + residual)
  const float* weight;    // (n,) or null
  const void* dsum;       // (rows, n) gradient reaching the returned sum, or null
  const float* mean;      // (rows,) (LayerNorm) or null
  const float* rstd;      // (rows,)
  void* ds;               // (rows, n) out
  float* dw_part;         // (chunks, n) out or null
  float* db_part;         // (chunks, n) out or null
  int64_t rows, n, rows_per_chunk;
  int64_t dy_stride, s_stride, dsum_stride, ds_stride;
  float offset;
  bool is_rms;
  DType dtype;
};

// SwiGLU: out = silu(gate) * up; backward dgate, dup from dy.
struct SwigluParams {
  const void* gate;  // (rows, n)
  const void* up;    // (rows, n)
  const void* dy;    // (rows, n), backward only
  void* out;         // forward: (rows, n)
  void* dgate;       // backward: (rows, n)
  void* dup;         // backward: (rows, n)
  int64_t rows, n;
  int64_t gate_stride, up_stride, dy_stride, out_stride, dgate_stride, dup_stride;
  bool backward;
  DType dtype;
};

// Rotary embedding of q and k (or, with `backward`, its transpose) at every (batch, position).
// Strides are (batch, head, position) in elements; the head dim is contiguous.
struct RopeParams {
  const void* q;
  const void* k;
  const float* cos;  // (batch or 1, seqlen, rotary), float32
  const float* sin;
  void* q_out;
  void* k_out;
  int64_t batch, seqlen, heads_q, heads_k, head_dim, rotary;
  int64_t q_stride[3], k_stride[3], qo_stride[3], ko_stride[3];
  int64_t cos_stride_b, cos_stride_s;  // cos_stride_b = 0 when shared by the batch
  bool interleaved, backward;
  DType dtype;
};

// Flash attention (attention.cu), dense or packed, forward and backward. Tensors are addressed as
// base + batch * stride[0] + head * stride[1] + (row0 + row) * stride[2] with unit stride over the head dim;
// packed sequences (cu_q / cu_k non-null) have stride[0] = 0 and row0 = cu[b]. Every row, head and batch
// stride of q, k, v, o, do is a multiple of 8 elements and every base 16-byte aligned (the binding copies
// a tensor that is not). Softmax statistics (lse, delta) are float32 with their own strides.
struct AttnParams {
  const void* q;                 // (.., H, Lq, E)
  const void* k;                 // (.., Hkv, Lk, E)
  const void* v;                 // (.., Hkv, Lk, Ev)
  void* o;                       // forward out: (.., H, Lq, Ev)
  float* lse;                    // forward out / backward in: natural-log log-sum-exp of the scaled scores
  const void* dout;              // backward: dO (.., H, Lq, Ev)
  const float* delta;            // backward: rowsum(dO * O) - dlse, strided like lse
  void* dq;                      // backward out: (.., H, Lq, E)
  void* dk;                      // backward out: (.., Hkv, Lk, E)
  void* dv;                      // backward out: (.., Hkv, Lk, Ev)
  const uint8_t* key_padding;    // (B, Lk) 1 = real key, or null
  const int32_t* cu_q;           // (B + 1,) or null (dense)
  const int32_t* cu_k;
  const int64_t* seed;           // (1,) dropout seed on the device, or null (no dropout)
  int64_t q_stride[3], k_stride[3], v_stride[3], o_stride[3], do_stride[3];
  int64_t dq_stride[3], dk_stride[3], dv_stride[3], lse_stride[3];
  int64_t kpm_stride;            // key_padding's batch stride
  int batch, heads, heads_kv;    // heads % heads_kv == 0 (GQA: query head h reads kv head h / (heads / heads_kv))
  int len_q, len_k;              // dense: L and S; packed: max_seqlen_q / _k (grid size, dropout counters)
  int head_dim, head_dim_v;      // E, Ev: multiples of 8, 16..256
  float scale;                   // softmax scale of q k^T
  bool causal, bottom_right;     // causal: key j visible to query i when j <= i (+ Lk_b - Lq_b bottom-right)
  int window_left, window_right; // -1: unbounded; else i + shift - left <= j <= i + shift + right
  float dropout_p;               // 0: none; keep when Philox uniform >= p (Triton's mask, see attention.cu)
  DType dtype;                   // F16 or BF16
};

// The attention backward's row statistic (attention.cu, used by the attention and DeBERTa bindings):
// delta[row] = sum_e dO[row, e] O[row, e] - dlse[row], float32, one thread a row (no float32 copies of dO and O).
struct DeltaParams {
  const void* dout;        // rows of e elements, strides (batch, head, row) like the attention tensors
  const void* out;
  const float* dlse;       // strided like delta, or null
  float* delta;            // out
  const int32_t* cu_seqlens;  // packed (row0 = cu[b], rows = cu[b + 1] - cu[b]) or null
  int64_t do_stride[3], o_stride[3], stat_stride[3];
  int batch, heads, rows, head_dim;  // rows: L (dense) or max_seqlen (packed)
  DType dtype;
};

// DeBERTa's disentangled attention (deberta.cu), dense (B, H, S, D) with key padding or packed (total, H, D)
// with cu_seqlens; strides as AttnParams' (batch, head, row), head dim contiguous. Scores
// z_ij = scale (q_i . k_j + q_i . pos_key[idx(i - j)] + k_j . pos_query[idx(i - j)]), idx from rel_idx.
struct DebParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;                       // forward out
  float* lse;                    // forward out / backward in (natural log)
  const void* pos_key;           // (H, 2 span, D) or null (no c2p term)
  const void* pos_query;         // (H, 2 span, D) or null (no p2c term)
  const int32_t* rel_idx;        // (2 max_seqlen - 1,): entry d + max_seqlen - 1 is idx(d)
  const uint8_t* key_padding;    // (B, S) 1 = real key, or null
  const int32_t* cu_seqlens;     // (B + 1,) or null (dense)
  const int64_t* seed;           // dropout seed on the device, or null
  const void* dout;              // backward: dO
  const float* delta;            // backward: rowsum(dO * O) - dlse, strided like lse
  void* dq;
  void* dk;
  void* dv;
  float* run_query_parts;        // backward out: (B H, row tiles, 2, D): per query block, sum over its rows of
                                 // (sum_j dS over the first run d <= d_first, then the last d >= d_last) q_i
  float* run_key_parts;          // the same per key block with k_j (dpos's share of the runs; the op layer sums)
  float* band_key;               // band out: (H, band_n, D) sum over pairs at distance d of dS q_i (row d - band_lo)
  float* band_query;             // band out: the same of dS k_j
  float* dpos_key;               // fold out: (H, pos_rows, D) float32, the band's share of dPK / s (or null)
  float* dpos_query;             // the same for dPQ
  int pos_rows;                  // 2 span
  int64_t q_stride[3], k_stride[3], v_stride[3], o_stride[3], do_stride[3];
  int64_t dq_stride[3], dk_stride[3], dv_stride[3], lse_stride[3];
  int64_t pos_stride[2];         // (head, row) strides of pos_key and pos_query
  int64_t kpm_stride;
  int d_first, d_last;           // d <= d_first: idx = 0; d >= d_last: idx = 2 span - 1 (relative_band)
  int band_lo, band_n;           // the band kernel's distances band_lo .. band_lo + band_n - 1
  int batch, heads, max_seqlen, head_dim;  // head_dim: a multiple of 8, <= 64
  float scale, dropout_p;
  DType dtype;                   // F16 or BF16
};

// The fused LoRA linear's GEMM (lora.cu): Y = X Wop + scaling * (P Qop) [* keep] + bias, rounded once.
// transposed = false (forward): Wop = W^T from W (n, k), Qop = Q^T from Q (n, r); true (dx): W (k, n) and
// Q (r, n) as stored. k, n and r multiples of 8; row strides multiples of 8 elements, 16-byte aligned bases.
struct LoraParams {
  const void* x;         // (m, k)
  const void* w;         // (n, k) or, transposed, (k, n)
  const void* p;         // (m, r)
  const void* q;         // (n, r) or, transposed, (r, n)
  const float* bias;     // (n,) or null
  const uint8_t* keep;   // (m, n) 1 = keep the low-rank term, or null
  void* y;               // (m, n) out
  int64_t m, n, k, r;
  int64_t x_stride, w_stride, p_stride, q_stride, keep_stride, y_stride;
  float scaling;
  bool transposed;
  DType dtype;           // F16 or BF16
};

// Test-only (tc_selftest.cu): one block of two warps runs the tensor-core primitives of simt.h on fixed
// tiles, so that tests check them (against a matmul and the PTX ISA's fragment maps) in both builds.
//   cp.async (zero-filling rows >= m_valid of A) -> shared; ldmatrix -> fragments; mma.m16n8k16:
//   D = A B + C  (A: 32 x 32, B: 32 x 16, C, D: 32 x 16, float32; warp w owns rows 16 w .. 16 w + 15),
//   E = round_T(D) B[0:16]  (D's accumulators repacked as A fragments: the attention P V step).
struct TcSelftestParams {
  const void* a;   // (32, 32) row-major, 16-byte aligned rows
  const void* b;   // b_trans: B itself (32 k, 16 n) row-major; else B^T (16 n, 32 k) row-major
  const float* c;  // (32, 16)
  float* d;        // (32, 16) out
  float* e;        // (32, 16) out
  int32_t* frags;  // (64, 20) out: each thread's registers A[2 k-steps][4], B[2 k-steps][4], P[4]
  float* acc;      // (64, 8) out: each thread's accumulators after D = A B + C: [2 n-tiles][4]
  int m_valid;     // rows of A read from memory; the rest are zero-filled by cp.async
  int ldm_x;       // matrices per ldmatrix for B: 1, 2 or 4
  bool b_trans;    // B row-major (k, n), loaded with ldmatrix .trans
  bool wait;       // false: skip cp.async.wait_group (a bug the harness must show)
  bool misalign;   // true: A's ldmatrix rows 2 bytes off (a fault on the device, an error in the harness)
  DType dtype;     // F16 or BF16
};

// The CPU harness (always built).
namespace cpu {
void norm_fwd(const NormFwdParams& p);
void norm_bwd(const NormBwdParams& p);
void swiglu(const SwigluParams& p);
void rope(const RopeParams& p);
void tc_selftest(const TcSelftestParams& p);
void attention_fwd(const AttnParams& p);
void attention_bwd(const AttnParams& p);
void attention_delta(const DeltaParams& p);
void lora_gemm(const LoraParams& p);
void deberta_fwd(const DebParams& p);
void deberta_bwd(const DebParams& p);
}  // namespace cpu

#if defined(__CUDACC__) || defined(FUSEDLM_WITH_CUDA)
}  // namespace fl
#include <cuda_runtime_api.h>
namespace fl {
namespace cuda {
void norm_fwd(const NormFwdParams& p, cudaStream_t stream);
void norm_bwd(const NormBwdParams& p, cudaStream_t stream);
void swiglu(const SwigluParams& p, cudaStream_t stream);
void rope(const RopeParams& p, cudaStream_t stream);
void tc_selftest(const TcSelftestParams& p, cudaStream_t stream);
void attention_fwd(const AttnParams& p, cudaStream_t stream);
void attention_bwd(const AttnParams& p, cudaStream_t stream);
void attention_delta(const DeltaParams& p, cudaStream_t stream);
void lora_gemm(const LoraParams& p, cudaStream_t stream);
void deberta_fwd(const DebParams& p, cudaStream_t stream);
void deberta_bwd(const DebParams& p, cudaStream_t stream);
}  // namespace cuda
#endif

}  // namespace fl
