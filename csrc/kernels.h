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

// The CPU harness (always built).
namespace cpu {
void norm_fwd(const NormFwdParams& p);
void norm_bwd(const NormBwdParams& p);
void swiglu(const SwigluParams& p);
void rope(const RopeParams& p);
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
}  // namespace cuda
#endif

}  // namespace fl
