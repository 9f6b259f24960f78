// The binding layer of fusedlm's C++ kernels: checks inputs, fills the params structs of kernels.h, launches
// on the current stream under a device guard, and registers the ops as fusedlm_C::* with TORCH_LIBRARY.
// CPU tensors go to the CPU harness (the same kernel source run on the host, fl::cpu); CUDA tensors,
// in the CUDA build (FUSEDLM_WITH_CUDA), to the device launchers (fl::cuda). Fake kernels and autograd
// are registered from Python (fusedlm/_cuda.py). Public-API validation (names, messages) happens in
// Python before these are called; the TORCH_CHECKs here guard the kernels' own assumptions.
#include <ATen/ATen.h>
#include <torch/library.h>

#if defined(FUSEDLM_WITH_CUDA)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif
#if defined(FUSEDLM_PY_MODULE)
#include <Python.h>
#endif

#include <algorithm>
#include <optional>
#include <vector>

#include "kernels.h"

namespace {

using at::Tensor;

fl::DType kernel_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return fl::DType::F32;
    case at::kHalf: return fl::DType::F16;
    case at::kBFloat16: return fl::DType::BF16;
    default: TORCH_CHECK(false, name, ": expected float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return fl::DType::F32;  // not reached
}

// kernel_dtype for the tensor-core kernels, which take float16 or bfloat16: `kernels` names them in the error
// ("the cuda attention kernels take").
fl::DType half_kernel_dtype(const Tensor& t, const char* name, const char* kernels) {
  const fl::DType dtype = kernel_dtype(t, name);
  TORCH_CHECK(dtype != fl::DType::F32, name, ": ", kernels, " float16 or bfloat16, got float32");
  return dtype;
}

void check_like(const Tensor& t, const Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(), " (that of ", ref_name, "), got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(), " (that of ",
              ref_name, "), got ", t.scalar_type());
}

// (..., n) -> (rows, n) with unit stride along n (a view where the strides allow it).
Tensor rows_of(const Tensor& t) {
  Tensor r = t.reshape({-1, t.size(-1)});
  return r.stride(1) == 1 ? r : r.contiguous();
}

// A (n,) float32 contiguous copy of a weight or bias (no copy when it already is one), or undefined.
Tensor affine(const std::optional<Tensor>& t, const Tensor& x, const char* name) {
  if (!t.has_value()) return Tensor();
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(-1), name, ": expected shape (", x.size(-1), ",), got ",
              t->sizes());
  TORCH_CHECK(t->device() == x.device(), name, ": expected device ", x.device(), ", got ", t->device());
  return t->to(at::kFloat).contiguous();
}

// Runs `cpu(params)` or, for CUDA tensors, `gpu(params, stream)` on the current stream of t's device.
template <class P, class Cpu, class Gpu>
void run(const Tensor& t, const P& params, Cpu cpu, Gpu gpu) {
  if (t.is_cpu()) return cpu(params);
#if defined(FUSEDLM_WITH_CUDA)
  if (t.is_cuda()) {
    const c10::cuda::CUDAGuard guard(t.device());
    gpu(params, c10::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
#else
  (void)gpu;
#endif
  TORCH_CHECK(false, "fusedlm_C: no kernel for tensors on ", t.device(),
              " in this build (the CUDA kernels need the CUDA build of fusedlm._C)");
}

#if defined(FUSEDLM_WITH_CUDA)
#define FL_GPU(fn) [](const auto& p, cudaStream_t s) { fl::cuda::fn(p, s); }
#else
#define FL_GPU(fn) [](const auto&, void*) {}
#endif

void check_grid(int64_t blocks, const char* what) {
  TORCH_CHECK(blocks <= INT32_MAX, what, ": too many rows for one launch (", blocks, ")");
}

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd(const Tensor& x, const std::optional<Tensor>& residual,
                                                    const std::optional<Tensor>& weight,
                                                    const std::optional<Tensor>& bias, double eps, double offset,
                                                    bool is_rms) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) >= 1, "x: expected (..., n) with n >= 1, got ", x.sizes());
  const fl::DType dtype = kernel_dtype(x, "x");
  const Tensor x2 = rows_of(x);
  Tensor r2;
  if (residual.has_value()) {
    check_like(*residual, x, "residual", "x");
    TORCH_CHECK(residual->sizes() == x.sizes(), "residual: expected shape ", x.sizes(), ", got ", residual->sizes());
    r2 = rows_of(*residual);
  }
  const Tensor w = affine(weight, x, "weight"), b = affine(bias, x, "bias");
  const int64_t rows = x2.size(0), n = x2.size(1);
  check_grid(rows, "norm_fwd");
  Tensor y = at::empty({rows, n}, x.options());
  Tensor s = residual.has_value() ? at::empty({rows, n}, x.options()) : at::empty({0}, x.options());
  Tensor mean = at::empty({is_rms ? 0 : rows}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows > 0) {
    fl::NormFwdParams p{};
    p.x = x2.data_ptr();
    p.residual = r2.defined() ? r2.data_ptr() : nullptr;
    p.weight = w.defined() ? w.data_ptr<float>() : nullptr;
    p.bias = b.defined() ? b.data_ptr<float>() : nullptr;
    p.y = y.data_ptr();
    p.s = r2.defined() ? s.data_ptr() : nullptr;
    p.mean = is_rms ? nullptr : mean.data_ptr<float>();
    p.rstd = rstd.data_ptr<float>();
    p.rows = rows;
    p.n = n;
    p.x_stride = x2.stride(0);
    p.res_stride = r2.defined() ? r2.stride(0) : 0;
    p.y_stride = n;
    p.s_stride = n;
    p.eps = float(eps);
    p.offset = float(offset);
    p.is_rms = is_rms;
    p.dtype = dtype;
    run(x, p, [](const auto& q) { fl::cpu::norm_fwd(q); }, FL_GPU(norm_fwd));
  }
  return {y.view(x.sizes()), residual.has_value() ? s.view(x.sizes()) : s, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> norm_bwd(const Tensor& dy, const Tensor& s, const std::optional<Tensor>& weight,
                                            const std::optional<Tensor>& dsum, const Tensor& mean, const Tensor& rstd,
                                            double offset, bool is_rms, bool need_dw, bool need_db) {
  const fl::DType dtype = kernel_dtype(s, "s");
  check_like(dy, s, "dy", "s");
  TORCH_CHECK(dy.sizes() == s.sizes(), "dy: expected shape ", s.sizes(), ", got ", dy.sizes());
  const Tensor dy2 = rows_of(dy), s2 = rows_of(s);
  Tensor dsum2;
  if (dsum.has_value()) {
    check_like(*dsum, s, "dsum", "s");
    TORCH_CHECK(dsum->sizes() == s.sizes(), "dsum: expected shape ", s.sizes(), ", got ", dsum->sizes());
    dsum2 = rows_of(*dsum);
  }
  const int64_t rows = s2.size(0), n = s2.size(1);
  check_grid(rows, "norm_bwd");
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == rows, "rstd: expected float32 (", rows, ",)");
  TORCH_CHECK(is_rms || (mean.scalar_type() == at::kFloat && mean.numel() == rows), "mean: expected float32 (", rows,
              ",)");
  const Tensor w = affine(weight, s, "weight");
  const Tensor mean_c = is_rms ? mean : mean.contiguous(), rstd_c = rstd.contiguous();
  Tensor ds = at::empty({rows, n}, s.options());
  const int64_t rows_per_chunk = 128, chunks = std::max<int64_t>(1, (rows + rows_per_chunk - 1) / rows_per_chunk);
  const auto f32 = s.options().dtype(at::kFloat);
  Tensor dw_part = need_dw ? at::empty({chunks, n}, f32) : Tensor();
  Tensor db_part = need_db ? at::empty({chunks, n}, f32) : Tensor();
  if (rows > 0) {
    fl::NormBwdParams p{};
    p.dy = dy2.data_ptr();
    p.s = s2.data_ptr();
    p.weight = w.defined() ? w.data_ptr<float>() : nullptr;
    p.dsum = dsum2.defined() ? dsum2.data_ptr() : nullptr;
    p.mean = is_rms ? nullptr : mean_c.data_ptr<float>();
    p.rstd = rstd_c.data_ptr<float>();
    p.ds = ds.data_ptr();
    p.dw_part = need_dw ? dw_part.data_ptr<float>() : nullptr;
    p.db_part = need_db ? db_part.data_ptr<float>() : nullptr;
    p.rows = rows;
    p.n = n;
    p.rows_per_chunk = rows_per_chunk;
    p.dy_stride = dy2.stride(0);
    p.s_stride = s2.stride(0);
    p.dsum_stride = dsum2.defined() ? dsum2.stride(0) : 0;
    p.ds_stride = n;
    p.offset = float(offset);
    p.is_rms = is_rms;
    p.dtype = dtype;
    run(s, p, [](const auto& q) { fl::cpu::norm_bwd(q); }, FL_GPU(norm_bwd));
  }
  // The chunk partials summed in float32 (zeros for an empty batch).
  Tensor dw = need_dw ? (rows > 0 ? dw_part.sum(0) : at::zeros({n}, f32)) : at::empty({0}, f32);
  Tensor db = need_db ? (rows > 0 ? db_part.sum(0) : at::zeros({n}, f32)) : at::empty({0}, f32);
  return {ds.view(s.sizes()), dw, db};
}

fl::SwigluParams swiglu_params(const Tensor& gate, const Tensor& up, const Tensor& g2, const Tensor& u2) {
  check_like(up, gate, "up", "gate");
  TORCH_CHECK(up.sizes() == gate.sizes(), "up: expected shape ", gate.sizes(), ", got ", up.sizes());
  check_grid(g2.size(0), "swiglu");
  TORCH_CHECK((g2.size(1) + 255) / 256 <= 65535, "swiglu: rows wider than 2^24 features are not supported");
  fl::SwigluParams p{};
  p.gate = g2.data_ptr();
  p.up = u2.data_ptr();
  p.rows = g2.size(0);
  p.n = g2.size(1);
  p.gate_stride = g2.stride(0);
  p.up_stride = u2.stride(0);
  p.dtype = kernel_dtype(gate, "gate");
  return p;
}

Tensor swiglu_fwd(const Tensor& gate, const Tensor& up) {
  TORCH_CHECK(gate.dim() >= 1, "gate: expected at least 1 dimension");
  const Tensor g2 = rows_of(gate), u2 = rows_of(up);
  fl::SwigluParams p = swiglu_params(gate, up, g2, u2);
  Tensor out = at::empty(g2.sizes(), gate.options());
  p.out = out.data_ptr();
  p.out_stride = p.n;
  if (out.numel() > 0) run(gate, p, [](const auto& q) { fl::cpu::swiglu(q); }, FL_GPU(swiglu));
  return out.view(gate.sizes());
}

std::tuple<Tensor, Tensor> swiglu_bwd(const Tensor& dy, const Tensor& gate, const Tensor& up) {
  const Tensor g2 = rows_of(gate), u2 = rows_of(up);
  fl::SwigluParams p = swiglu_params(gate, up, g2, u2);
  check_like(dy, gate, "dy", "gate");
  TORCH_CHECK(dy.sizes() == gate.sizes(), "dy: expected shape ", gate.sizes(), ", got ", dy.sizes());
  const Tensor d2 = rows_of(dy);
  Tensor dgate = at::empty(g2.sizes(), gate.options()), dup = at::empty(g2.sizes(), gate.options());
  p.dy = d2.data_ptr();
  p.dy_stride = d2.stride(0);
  p.dgate = dgate.data_ptr();
  p.dup = dup.data_ptr();
  p.dgate_stride = p.dup_stride = p.n;
  p.backward = true;
  if (dgate.numel() > 0) run(gate, p, [](const auto& q) { fl::cpu::swiglu(q); }, FL_GPU(swiglu));
  return {dgate.view(gate.sizes()), dup.view(gate.sizes())};
}

// q (B, H, S, D), k (B, Hkv, S, D); (B, S, H, D) when `transposed`. cos, sin (S, R) or (B or 1, S, R).
std::tuple<Tensor, Tensor> rope(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                                bool interleaved, bool transposed, bool backward) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "q, k: expected 4-D tensors, got ", q.sizes(), " and ", k.sizes());
  check_like(k, q, "k", "q");
  const fl::DType dtype = kernel_dtype(q, "q");
  const int sdim = transposed ? 1 : 2, hdim = transposed ? 2 : 1;
  const int64_t B = q.size(0), S = q.size(sdim), D = q.size(3), R = cos.size(-1);
  TORCH_CHECK(k.size(0) == B && k.size(sdim) == S && k.size(3) == D, "k: expected batch, length, head dim of q");
  TORCH_CHECK(sin.sizes() == cos.sizes(), "sin: expected the shape of cos ", cos.sizes(), ", got ", sin.sizes());
  TORCH_CHECK(R % 2 == 0 && R >= 2 && R <= D, "cos: expected an even rotary dim 2 <= R <= ", D, ", got ", R);
  TORCH_CHECK((cos.dim() == 2 || cos.dim() == 3) && cos.size(-2) == S, "cos: expected (S, R) or (B, S, R), got ",
              cos.sizes());
  TORCH_CHECK(cos.dim() == 2 || cos.size(0) == 1 || cos.size(0) == B, "cos: batch must be 1 or ", B);
  TORCH_CHECK(cos.device() == q.device() && sin.device() == q.device(), "cos, sin: expected device ", q.device());
  check_grid(B * S, "rope");
  const Tensor qc = q.stride(3) == 1 ? q : q.contiguous(), kc = k.stride(3) == 1 ? k : k.contiguous();
  const Tensor c = cos.to(at::kFloat).contiguous(), sn = sin.to(at::kFloat).contiguous();
  Tensor q_out = at::empty(q.sizes(), q.options()), k_out = at::empty(k.sizes(), k.options());
  fl::RopeParams p{};
  p.q = qc.data_ptr();
  p.k = kc.data_ptr();
  p.cos = c.data_ptr<float>();
  p.sin = sn.data_ptr<float>();
  p.q_out = q_out.data_ptr();
  p.k_out = k_out.data_ptr();
  p.batch = B;
  p.seqlen = S;
  p.heads_q = q.size(hdim);
  p.heads_k = k.size(hdim);
  p.head_dim = D;
  p.rotary = R;
  const Tensor* srcs[4] = {&qc, &kc, &q_out, &k_out};
  int64_t* dsts[4] = {p.q_stride, p.k_stride, p.qo_stride, p.ko_stride};
  for (int i = 0; i < 4; ++i) {
    dsts[i][0] = srcs[i]->stride(0);
    dsts[i][1] = srcs[i]->stride(hdim);
    dsts[i][2] = srcs[i]->stride(sdim);
  }
  const bool shared = cos.dim() == 2 || cos.size(0) == 1;
  p.cos_stride_b = shared ? 0 : S * R;
  p.cos_stride_s = R;
  p.interleaved = interleaved;
  p.backward = backward;
  p.dtype = dtype;
  if (B * S > 0 && D > 0) run(q, p, [](const auto& x) { fl::cpu::rope(x); }, FL_GPU(rope));
  return {q_out, k_out};
}

// ---- Attention (attention.cu): dense q (B, H, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), or packed
// (total, H, E) with cu_seqlens (B + 1,). The kernels copy rows 16 bytes at a time: an operand whose base or
// strides do not allow it (a view at an odd offset, a strided head dim) is copied first.
bool copyable16(const Tensor& t) {
  if (t.stride(-1) != 1 || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  return true;
}

Tensor attn_operand(const Tensor& t) {
  const Tensor c = copyable16(t) ? t : t.contiguous();
  return copyable16(c) ? c : c.clone();  // contiguous() keeps a misaligned view as it is
}

// (batch, head, row) strides of a dense (B, H, L, X) or packed (total, H, X) tensor.
void attn_strides(const Tensor& t, bool packed, int64_t* out) {
  out[0] = packed ? 0 : t.stride(0);
  out[1] = t.stride(1);
  out[2] = packed ? t.stride(0) : t.stride(2);
}

struct AttnInputs {
  Tensor q, k, v, kpm, cu_q, cu_k;
  bool packed;
  int64_t B, H, Hkv, Lq, Lk, E, Ev;
};

AttnInputs attn_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& kpm,
                       const std::optional<Tensor>& cu_q, const std::optional<Tensor>& cu_k, int64_t max_q,
                       int64_t max_k) {
  AttnInputs in;
  in.packed = cu_q.has_value();
  half_kernel_dtype(q, "q", "the cuda attention kernels take");
  check_like(k, q, "k", "q");
  check_like(v, q, "v", "q");
  TORCH_CHECK(q.dim() == (in.packed ? 3 : 4) && k.dim() == q.dim() && v.dim() == q.dim(),
              "q, k, v: expected ", in.packed ? "(total, H, E)" : "(B, H, L, E)", " tensors");
  in.H = q.size(1);  // heads: dim 1 in both layouts
  in.Hkv = k.size(1);
  in.E = q.size(-1);
  in.Ev = v.size(-1);
  TORCH_CHECK(in.Hkv > 0 && in.H % in.Hkv == 0, "k: heads must divide q's ", in.H, ", got ", in.Hkv);
  for (int64_t e : {in.E, in.Ev})
    TORCH_CHECK(e % 8 == 0 && e >= 16 && e <= 256, "head dims: expected multiples of 8 in 16..256, got ", e);
  if (in.packed) {
    TORCH_CHECK(cu_k.has_value(), "cu_seqlens_k: required with cu_seqlens_q");
    in.cu_q = cu_q->to(at::kInt).contiguous();
    in.cu_k = cu_k->to(at::kInt).contiguous();
    in.B = in.cu_q.numel() - 1;
    in.Lq = max_q;
    in.Lk = max_k;
  } else {
    in.B = q.size(0);
    in.Lq = q.size(2);
    in.Lk = k.size(2);
  }
  TORCH_CHECK((in.Lq + 63) / 64 <= 65535 && (in.Lk + 63) / 64 <= 65535, "attention: sequences longer than ",
              65535 * 64, " rows are not supported");
  TORCH_CHECK(in.B * in.H <= INT32_MAX, "attention: batch x heads exceeds one launch");
  in.q = attn_operand(q);
  in.k = attn_operand(k);
  in.v = attn_operand(v);
  if (kpm.has_value()) {
    TORCH_CHECK(!in.packed && kpm->scalar_type() == at::kBool && kpm->dim() == 2 && kpm->size(0) == in.B &&
                    kpm->size(1) == in.Lk, "key_padding_mask: expected bool (B, S)");
    in.kpm = kpm->contiguous();
  }
  return in;
}

fl::AttnParams attn_params(const AttnInputs& in, const std::optional<Tensor>& seed, double scale, bool causal,
                           bool bottom_right, double dropout_p, int64_t window_left, int64_t window_right) {
  fl::AttnParams p{};
  p.q = in.q.data_ptr();
  p.k = in.k.data_ptr();
  p.v = in.v.data_ptr();
  attn_strides(in.q, in.packed, p.q_stride);
  attn_strides(in.k, in.packed, p.k_stride);
  attn_strides(in.v, in.packed, p.v_stride);
  p.key_padding = in.kpm.defined() ? reinterpret_cast<const uint8_t*>(in.kpm.data_ptr()) : nullptr;
  p.kpm_stride = in.kpm.defined() ? in.kpm.stride(0) : 0;
  p.cu_q = in.packed ? in.cu_q.data_ptr<int32_t>() : nullptr;
  p.cu_k = in.packed ? in.cu_k.data_ptr<int32_t>() : nullptr;
  TORCH_CHECK(dropout_p == 0.0 || (seed.has_value() && seed->numel() == 1 && seed->scalar_type() == at::kLong),
              "seed: expected an int64 tensor of one element with dropout");
  p.seed = dropout_p > 0.0 ? seed->data_ptr<int64_t>() : nullptr;
  p.batch = int(in.B);
  p.heads = int(in.H);
  p.heads_kv = int(in.Hkv);
  p.len_q = int(in.Lq);
  p.len_k = int(in.Lk);
  p.head_dim = int(in.E);
  p.head_dim_v = int(in.Ev);
  p.scale = float(scale);
  p.causal = causal;
  p.bottom_right = bottom_right;
  // A window side at least Lq + Lk wide bounds nothing (|i + shift - j| < Lq + Lk): unbounded, before the
  // int narrowing (a side of 2^31 would wrap to a negative band).
  const int64_t reach = in.Lq + in.Lk;
  p.window_left = int(window_left < 0 || window_left >= reach ? -1 : window_left);
  p.window_right = int(window_right < 0 || window_right >= reach ? -1 : window_right);
  p.dropout_p = float(dropout_p);
  p.dtype = kernel_dtype(in.q, "q");
  return p;
}

// Strides (batch, head, row) of the float32 row statistics (lse, delta): (B, H, L) dense, (total, H) packed.
void stat_strides(bool packed, int64_t heads, int64_t rows, int64_t* out) {
  out[0] = packed ? 0 : heads * rows;
  out[1] = packed ? 1 : rows;
  out[2] = packed ? heads : 1;
}

// delta = rowsum(dO * O) - dlse (float32, shaped like lse: (B, H, L) dense, (total, H) packed) by the
// AttnDelta kernel: no float32 copies of dO and O. dlse may be a broadcast view (lse.sum()'s gradient).
Tensor attn_delta(const Tensor& dout, const Tensor& out, const std::optional<Tensor>& dlse, const Tensor& lse,
                  const std::optional<Tensor>& cu, int64_t batch, int64_t heads, int64_t rows) {
  const bool packed = cu.has_value();
  Tensor delta = at::empty(lse.sizes(), lse.options().dtype(at::kFloat));
  Tensor dl;
  if (dlse.has_value()) dl = dlse->to(at::kFloat).expand(lse.sizes()).contiguous();
  fl::DeltaParams p{};
  p.dout = dout.data_ptr();
  p.out = out.data_ptr();
  p.dlse = dl.defined() ? dl.data_ptr<float>() : nullptr;
  p.delta = delta.data_ptr<float>();
  const Tensor cu32 = packed ? cu->to(at::kInt).contiguous() : Tensor();
  p.cu_seqlens = packed ? cu32.data_ptr<int32_t>() : nullptr;
  attn_strides(dout, packed, p.do_stride);
  attn_strides(out, packed, p.o_stride);
  stat_strides(packed, heads, rows, p.stat_stride);
  p.batch = int(batch);
  p.heads = int(heads);
  p.rows = int(rows);
  p.head_dim = int(out.size(-1));
  p.dtype = half_kernel_dtype(out, "out", "the cuda attention kernels take");
  if (delta.numel() > 0) run(out, p, [](const auto& x) { fl::cpu::attention_delta(x); }, FL_GPU(attention_delta));
  return delta;
}

// The backward's shared inputs and outputs (AttnParams and DebParams name them alike): dO, lse, delta and
// the gradients of q, k, v, contiguous whatever the inputs' layout (the fake kernels say so without strides).
template <class P>
std::tuple<Tensor, Tensor, Tensor> backward_io(P& p, const Tensor& doc, const Tensor& lse, const Tensor& delta,
                                               const Tensor& q, const Tensor& k, const Tensor& v, bool packed,
                                               int64_t heads, int64_t rows) {
  Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  p.dout = doc.data_ptr();
  attn_strides(doc, packed, p.do_stride);
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  stat_strides(packed, heads, rows, p.lse_stride);
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  attn_strides(dq, packed, p.dq_stride);
  attn_strides(dk, packed, p.dk_stride);
  attn_strides(dv, packed, p.dv_stride);
  return {dq, dk, dv};
}

// -> (out (.., H, L, Ev) laid out like q, lse float32)
std::tuple<Tensor, Tensor> attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                         const std::optional<Tensor>& key_padding_mask,
                                         const std::optional<Tensor>& cu_seqlens_q,
                                         const std::optional<Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                         int64_t max_seqlen_k, double scale, bool causal, bool bottom_right,
                                         double dropout_p, const std::optional<Tensor>& seed, int64_t window_left,
                                         int64_t window_right) {
  const AttnInputs in = attn_inputs(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k);
  fl::AttnParams p = attn_params(in, seed, scale, causal, bottom_right, dropout_p, window_left, window_right);
  Tensor out, lse;
  if (in.packed) {
    out = at::empty({q.size(0), in.H, in.Ev}, q.options());
    lse = at::empty({q.size(0), in.H}, q.options().dtype(at::kFloat));
  } else {
    // (B, L, H, Ev) memory when q is laid out that way (Hugging Face's transposed views), else (B, H, L, Ev)
    const bool blhe = q.stride(1) < q.stride(2);
    out = blhe ? at::empty({in.B, in.Lq, in.H, in.Ev}, q.options()).transpose(1, 2)
               : at::empty({in.B, in.H, in.Lq, in.Ev}, q.options());
    lse = at::empty({in.B, in.H, in.Lq}, q.options().dtype(at::kFloat));
  }
  p.o = out.data_ptr();
  attn_strides(out, in.packed, p.o_stride);
  p.lse = lse.data_ptr<float>();
  stat_strides(in.packed, in.H, in.Lq, p.lse_stride);
  if (out.numel() > 0 || lse.numel() > 0)
    run(q, p, [](const auto& x) { fl::cpu::attention_fwd(x); }, FL_GPU(attention_fwd));
  return {out, lse};
}

// -> (dq, dk, dv). dlse: the gradient reaching lse, or None.
std::tuple<Tensor, Tensor, Tensor> attention_bwd(
    const Tensor& dout, const std::optional<Tensor>& dlse, const Tensor& q, const Tensor& k, const Tensor& v,
    const Tensor& out, const Tensor& lse, const std::optional<Tensor>& key_padding_mask,
    const std::optional<Tensor>& cu_seqlens_q, const std::optional<Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale, bool causal, bool bottom_right, double dropout_p,
    const std::optional<Tensor>& seed, int64_t window_left, int64_t window_right) {
  const AttnInputs in = attn_inputs(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k);
  fl::AttnParams p = attn_params(in, seed, scale, causal, bottom_right, dropout_p, window_left, window_right);
  check_like(dout, q, "dout", "q");
  check_like(out, q, "out", "q");
  const std::vector<int64_t> out_shape = in.packed ? std::vector<int64_t>{q.size(0), in.H, in.Ev}
                                                   : std::vector<int64_t>{in.B, in.H, in.Lq, in.Ev};
  const std::vector<int64_t> lse_shape = in.packed ? std::vector<int64_t>{q.size(0), in.H}
                                                   : std::vector<int64_t>{in.B, in.H, in.Lq};
  TORCH_CHECK(out.sizes() == at::IntArrayRef(out_shape), "out: expected shape ", out_shape, ", got ", out.sizes());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(lse_shape), "lse: expected shape ", lse_shape, ", got ", lse.sizes());
  TORCH_CHECK(dout.sizes() == out.sizes(), "dout: expected shape ", out.sizes(), ", got ", dout.sizes());
  const Tensor doc = attn_operand(dout);
  const Tensor lse_c = lse.to(at::kFloat).contiguous();
  // delta_i = dO_i . O_i - dlse_i (float32, lse's layout)
  const Tensor delta = attn_delta(doc, out.stride(-1) == 1 ? out : out.contiguous(), dlse, lse_c, cu_seqlens_q, in.B,
                                  in.H, in.Lq);
  const auto [dq, dk, dv] = backward_io(p, doc, lse_c, delta, q, k, v, in.packed, in.H, in.Lq);
  if (dq.numel() > 0 || dk.numel() > 0)
    run(q, p, [](const auto& x) { fl::cpu::attention_bwd(x); }, FL_GPU(attention_bwd));
  return {dq, dk, dv};
}

// ---- DeBERTa attention (deberta.cu): dense q, k, v (B, H, S, D) with an optional key padding mask, or
// packed (total, H, D) with cu_seqlens; pos_key / pos_query (H, 2 span, D) or None; rel_idx the int32
// bucket table over distances -(S-1) .. S-1 (S = max_seqlen). D a multiple of 8, at most 64.
struct DebInputs {
  Tensor q, k, v, pk, pq, kpm, cu, rel;
  bool packed;
  int64_t B, H, S, D;
};

DebInputs deb_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& pos_key,
                     const std::optional<Tensor>& pos_query, const std::optional<Tensor>& kpm,
                     const std::optional<Tensor>& cu, const Tensor& rel_idx, int64_t max_seqlen) {
  DebInputs in;
  in.packed = cu.has_value();
  half_kernel_dtype(q, "q", "the cuda DeBERTa kernels take");
  check_like(k, q, "k", "q");
  check_like(v, q, "v", "q");
  TORCH_CHECK(q.dim() == (in.packed ? 3 : 4) && k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "q, k, v: expected equal ", in.packed ? "(total, H, D)" : "(B, H, S, D)", " shapes");
  in.H = q.size(1);
  in.D = q.size(-1);
  TORCH_CHECK(in.D % 8 == 0 && in.D >= 8 && in.D <= 64, "head dim: expected a multiple of 8 up to 64, got ", in.D);
  if (in.packed) {
    in.cu = cu->to(at::kInt).contiguous();
    in.B = in.cu.numel() - 1;
    in.S = max_seqlen;
  } else {
    in.B = q.size(0);
    in.S = q.size(2);
  }
  TORCH_CHECK((in.S + 63) / 64 <= 65535 && in.B * in.H <= INT32_MAX, "deberta: too large for one launch");
  TORCH_CHECK(rel_idx.scalar_type() == at::kInt && rel_idx.numel() == std::max<int64_t>(2 * in.S - 1, 0),
              "rel_idx: expected int32 (", 2 * in.S - 1, ",)");
  in.rel = rel_idx.contiguous();
  in.q = attn_operand(q);
  in.k = attn_operand(k);
  in.v = attn_operand(v);
  for (const auto* t : {&pos_key, &pos_query}) {
    if (!t->has_value()) continue;
    check_like(**t, q, "pos_key / pos_query", "q");
    TORCH_CHECK((*t)->dim() == 3 && (*t)->size(0) == in.H && (*t)->size(2) == in.D,
                "pos_key / pos_query: expected (H, 2 span, D), got ", (*t)->sizes());
  }
  if (pos_key.has_value()) in.pk = attn_operand(pos_key->contiguous());  // (rows gathered 16 bytes at a time)
  if (pos_query.has_value()) in.pq = attn_operand(pos_query->contiguous());
  TORCH_CHECK(!in.pk.defined() || !in.pq.defined() || in.pk.sizes() == in.pq.sizes(),
              "pos_query: expected the shape of pos_key");
  if (kpm.has_value()) {
    TORCH_CHECK(!in.packed && kpm->scalar_type() == at::kBool && kpm->dim() == 2 && kpm->size(0) == in.B &&
                    kpm->size(1) == in.S, "key_padding_mask: expected bool (B, S)");
    in.kpm = kpm->contiguous();
  }
  return in;
}

fl::DebParams deb_params(const DebInputs& in, const std::optional<Tensor>& seed, double scale, double dropout_p) {
  fl::DebParams p{};
  p.q = in.q.data_ptr();
  p.k = in.k.data_ptr();
  p.v = in.v.data_ptr();
  attn_strides(in.q, in.packed, p.q_stride);
  attn_strides(in.k, in.packed, p.k_stride);
  attn_strides(in.v, in.packed, p.v_stride);
  p.pos_key = in.pk.defined() ? in.pk.data_ptr() : nullptr;
  p.pos_query = in.pq.defined() ? in.pq.data_ptr() : nullptr;
  const Tensor& pos = in.pk.defined() ? in.pk : in.pq;
  p.pos_stride[0] = pos.defined() ? pos.stride(0) : 0;
  p.pos_stride[1] = pos.defined() ? pos.stride(1) : 0;
  p.rel_idx = in.rel.data_ptr<int32_t>();
  p.key_padding = in.kpm.defined() ? reinterpret_cast<const uint8_t*>(in.kpm.data_ptr()) : nullptr;
  p.kpm_stride = in.kpm.defined() ? in.kpm.stride(0) : 0;
  p.cu_seqlens = in.packed ? in.cu.data_ptr<int32_t>() : nullptr;
  TORCH_CHECK(dropout_p == 0.0 || (seed.has_value() && seed->numel() == 1 && seed->scalar_type() == at::kLong),
              "seed: expected an int64 tensor of one element with dropout");
  p.seed = dropout_p > 0.0 ? seed->data_ptr<int64_t>() : nullptr;
  p.batch = int(in.B);
  p.heads = int(in.H);
  p.max_seqlen = int(in.S);
  p.head_dim = int(in.D);
  p.scale = float(scale);
  p.dropout_p = float(dropout_p);
  p.dtype = kernel_dtype(in.q, "q");
  return p;
}

// -> (out like q's shape, lse float32 (B, H, S) or (total, H))
std::tuple<Tensor, Tensor> deberta_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                       const std::optional<Tensor>& pos_key, const std::optional<Tensor>& pos_query,
                                       const std::optional<Tensor>& key_padding_mask,
                                       const std::optional<Tensor>& cu_seqlens, const Tensor& rel_idx,
                                       int64_t max_seqlen, double scale, double dropout_p,
                                       const std::optional<Tensor>& seed) {
  const DebInputs in = deb_inputs(q, k, v, pos_key, pos_query, key_padding_mask, cu_seqlens, rel_idx, max_seqlen);
  fl::DebParams p = deb_params(in, seed, scale, dropout_p);
  Tensor out = at::empty(q.sizes(), q.options());
  Tensor lse = in.packed ? at::empty({q.size(0), in.H}, q.options().dtype(at::kFloat))
                         : at::empty({in.B, in.H, in.S}, q.options().dtype(at::kFloat));
  p.o = out.data_ptr();
  attn_strides(out, in.packed, p.o_stride);
  p.lse = lse.data_ptr<float>();
  stat_strides(in.packed, in.H, in.S, p.lse_stride);
  if (out.numel() > 0) run(q, p, [](const auto& x) { fl::cpu::deberta_fwd(x); }, FL_GPU(deberta_fwd));
  return {out, lse};
}

// -> (dq, dk, dv, run_parts (2, B H, row tiles, 2, D): the runs' share of dpos_key (with q) and dpos_query
// (with k) per block, dpos_key, dpos_query (H, 2 span, D): the band's share; float32 and over s, empty when
// not asked for). d_first / d_last: the bucket runs (relative_band); band_lo, band_n: the band distances.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> deberta_bwd(
    const Tensor& dout, const std::optional<Tensor>& dlse, const Tensor& q, const Tensor& k, const Tensor& v,
    const std::optional<Tensor>& pos_key, const std::optional<Tensor>& pos_query, const Tensor& out, const Tensor& lse,
    const std::optional<Tensor>& key_padding_mask, const std::optional<Tensor>& cu_seqlens, const Tensor& rel_idx,
    int64_t max_seqlen, double scale, double dropout_p, const std::optional<Tensor>& seed, int64_t d_first,
    int64_t d_last, int64_t band_lo, int64_t band_n, bool grad_pos_key, bool grad_pos_query) {
  const DebInputs in = deb_inputs(q, k, v, pos_key, pos_query, key_padding_mask, cu_seqlens, rel_idx, max_seqlen);
  fl::DebParams p = deb_params(in, seed, scale, dropout_p);
  check_like(dout, q, "dout", "q");
  check_like(out, q, "out", "q");
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "dout, out: expected the shape of q");
  const Tensor doc = attn_operand(dout);
  const Tensor lse_c = lse.to(at::kFloat).contiguous();
  const std::vector<int64_t> stat_shape = in.packed ? std::vector<int64_t>{q.size(0), in.H}
                                                    : std::vector<int64_t>{in.B, in.H, in.S};
  TORCH_CHECK(lse_c.sizes() == at::IntArrayRef(stat_shape), "lse: expected shape ", stat_shape, ", got ", lse.sizes());
  const Tensor delta = attn_delta(doc, out.stride(-1) == 1 ? out : out.contiguous(), dlse, lse_c, cu_seqlens, in.B,
                                  in.H, in.S);  // (B, H, S) or (total, H): lse's layout
  const auto f32 = q.options().dtype(at::kFloat);
  // blocks past a packed sequence's end write no part: zeros
  const int64_t tiles = (in.S + 63) / 64;
  Tensor runs = at::zeros({2, in.B * in.H, tiles, 2, in.D}, f32);
  const bool band = (grad_pos_key || grad_pos_query) && band_n > 0;
  TORCH_CHECK((band_n + 63) / 64 <= 65535, "deberta: too many band distances for one launch");
  const Tensor& pos = in.pk.defined() ? in.pk : in.pq;
  const int64_t rows = pos.defined() ? pos.size(1) : 0;
  TORCH_CHECK(rows <= 65535, "pos_key: more than 65535 relative positions");
  Tensor band_key = at::empty({band && grad_pos_key ? in.H : 0, band_n, in.D}, f32);
  Tensor band_query = at::empty({band && grad_pos_query ? in.H : 0, band_n, in.D}, f32);
  Tensor dpk = at::zeros({grad_pos_key ? in.H : 0, rows, in.D}, f32);
  Tensor dpq = at::zeros({grad_pos_query ? in.H : 0, rows, in.D}, f32);
  const auto [dq, dk, dv] = backward_io(p, doc, lse_c, delta, q, k, v, in.packed, in.H, in.S);
  p.run_query_parts = runs.data_ptr<float>();
  p.run_key_parts = p.run_query_parts + runs.numel() / 2;
  p.band_key = band && grad_pos_key ? band_key.data_ptr<float>() : nullptr;
  p.band_query = band && grad_pos_query ? band_query.data_ptr<float>() : nullptr;
  p.dpos_key = grad_pos_key ? dpk.data_ptr<float>() : nullptr;
  p.dpos_query = grad_pos_query ? dpq.data_ptr<float>() : nullptr;
  p.pos_rows = int(rows);
  const int64_t clamp = int64_t(1) << 30;
  p.d_first = int(std::max(-clamp, std::min(clamp, d_first)));
  p.d_last = int(std::max(-clamp, std::min(clamp, d_last)));
  p.band_lo = int(band_lo);
  p.band_n = int(band_n);
  if (q.numel() > 0) run(q, p, [](const auto& x) { fl::cpu::deberta_bwd(x); }, FL_GPU(deberta_bwd));
  return {dq, dk, dv, runs, dpk, dpq};
}

// ---- The fused LoRA linear's GEMM (lora.cu). Forward (transposed = false): x (M, K), w = W (N, K),
// p = x A^T (M, R), q = B (N, R) -> x W^T + s p B^T + bias. dx (transposed = true): x = dy (M, K'),
// w = W (K', N), p = dy B (M, R), q = A (R, N) -> dy W + s (p A) * keep. A rank that is not a multiple of 8
// is padded with zero columns of p and q (the 16-byte copies), which adds nothing.
Tensor pad_rank(const Tensor& t, int64_t dim) {
  const int64_t r = t.size(dim), pad = (8 - r % 8) % 8;
  if (pad == 0) return t;
  std::vector<int64_t> widths(2 * t.dim(), 0);
  widths[2 * (t.dim() - 1 - dim) + 1] = pad;  // constant_pad_nd counts from the last dimension
  return at::constant_pad_nd(t, widths, 0);
}

Tensor lora_gemm(const Tensor& x, const Tensor& w, const Tensor& p, const Tensor& q, const std::optional<Tensor>& bias,
                 const std::optional<Tensor>& keep, double scaling, bool transposed) {
  const fl::DType dtype = half_kernel_dtype(x, "x", "the cuda LoRA kernel takes");
  for (const Tensor* t : {&w, &p, &q}) check_like(*t, x, "w, p, q", "x");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && p.dim() == 2 && q.dim() == 2, "x, w, p, q: expected 2-D tensors");
  const int64_t M = x.size(0), K = x.size(1), N = transposed ? w.size(1) : w.size(0), R = p.size(1);
  TORCH_CHECK(w.size(transposed ? 0 : 1) == K, "w: expected ", K, " reduction features, got ", w.sizes());
  TORCH_CHECK(p.size(0) == M, "p: expected ", M, " rows, got ", p.sizes());
  TORCH_CHECK(q.size(transposed ? 0 : 1) == R && q.size(transposed ? 1 : 0) == N, "q: expected rank ", R, " x ", N,
              " features, got ", q.sizes());
  TORCH_CHECK(K % 8 == 0 && N % 8 == 0, "lora_gemm: the 16-byte copies need K and N multiples of 8, got K=", K,
              ", N=", N);
  TORCH_CHECK((M + 63) / 64 <= INT32_MAX && (N + 63) / 64 <= 65535, "lora_gemm: too large for one launch");
  const Tensor xc = attn_operand(x), wc = attn_operand(w);
  const Tensor pc = attn_operand(pad_rank(p, 1)), qc = attn_operand(pad_rank(q, transposed ? 0 : 1));
  Tensor b, k8;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->device() == x.device(), "bias: expected (", N,
                ",) on ", x.device());
    b = bias->to(at::kFloat).contiguous();
  }
  if (keep.has_value()) {
    TORCH_CHECK(keep->scalar_type() == at::kBool && keep->sizes() == at::IntArrayRef({M, N}) &&
                    keep->device() == x.device(), "keep: expected bool (", M, ", ", N, ") on ", x.device());
    k8 = keep->contiguous();
  }
  Tensor y = at::empty({M, N}, x.options());
  fl::LoraParams prm{};
  prm.x = xc.data_ptr();
  prm.w = wc.data_ptr();
  prm.p = pc.data_ptr();
  prm.q = qc.data_ptr();
  prm.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  prm.keep = k8.defined() ? reinterpret_cast<const uint8_t*>(k8.data_ptr()) : nullptr;
  prm.y = y.data_ptr();
  prm.m = M;
  prm.n = N;
  prm.k = K;
  prm.r = pc.size(1);
  prm.x_stride = xc.stride(0);
  prm.w_stride = wc.stride(0);
  prm.p_stride = pc.stride(0);
  prm.q_stride = qc.stride(0);
  prm.keep_stride = k8.defined() ? k8.stride(0) : 0;
  prm.y_stride = N;
  prm.scaling = float(scaling);
  prm.transposed = transposed;
  prm.dtype = dtype;
  if (M > 0) run(x, prm, [](const auto& z) { fl::cpu::lora_gemm(z); }, FL_GPU(lora_gemm));
  return y;
}

// Test-only: the tensor-core primitives of simt.h on fixed tiles (csrc/tc_selftest.cu, kernels.h). a (32, 32),
// b (32, 16) when b_trans else (16, 32), in float16 or bfloat16; c (32, 16) float32. Returns d = a b + c,
// e = round(d) b[:16] (float32, (32, 16)), every thread's fragment registers (64, 20) int32 and accumulators
// (64, 8) float32. Not an op of the public API: no fake kernel, no autograd.
std::tuple<Tensor, Tensor, Tensor, Tensor> tc_selftest(const Tensor& a, const Tensor& b, const Tensor& c,
                                                       int64_t m_valid, int64_t ldm_x, bool b_trans, bool wait,
                                                       bool misalign) {
  const fl::DType dtype = half_kernel_dtype(a, "a", "the tensor-core self-test takes");
  check_like(b, a, "b", "a");
  TORCH_CHECK(c.device() == a.device() && c.scalar_type() == at::kFloat, "c: expected float32 on ", a.device());
  TORCH_CHECK(a.sizes() == at::IntArrayRef({32, 32}), "a: expected (32, 32), got ", a.sizes());
  TORCH_CHECK(b.sizes() == (b_trans ? at::IntArrayRef({32, 16}) : at::IntArrayRef({16, 32})), "b: wrong shape ",
              b.sizes());
  TORCH_CHECK(c.sizes() == at::IntArrayRef({32, 16}), "c: expected (32, 16), got ", c.sizes());
  TORCH_CHECK(ldm_x == 1 || ldm_x == 2 || ldm_x == 4, "ldm_x: expected 1, 2 or 4, got ", ldm_x);
  TORCH_CHECK(m_valid >= 0 && m_valid <= 32, "m_valid: expected 0..32, got ", m_valid);
  const Tensor ac = a.contiguous(), bc = b.contiguous(), cc = c.contiguous();
  const auto f32 = c.options();
  Tensor d = at::empty({32, 16}, f32), e = at::empty({32, 16}, f32), acc = at::empty({64, 8}, f32);
  Tensor frags = at::empty({64, 20}, f32.dtype(at::kInt));
  fl::TcSelftestParams p{};
  p.a = ac.data_ptr();
  p.b = bc.data_ptr();
  p.c = cc.data_ptr<float>();
  p.d = d.data_ptr<float>();
  p.e = e.data_ptr<float>();
  p.frags = frags.data_ptr<int32_t>();
  p.acc = acc.data_ptr<float>();
  p.m_valid = int(m_valid);
  p.ldm_x = int(ldm_x);
  p.b_trans = b_trans;
  p.wait = wait;
  p.misalign = misalign;
  p.dtype = dtype;
  run(a, p, [](const auto& q) { fl::cpu::tc_selftest(q); }, FL_GPU(tc_selftest));
  return {d, e, frags, acc};
}

}  // namespace

TORCH_LIBRARY(fusedlm_C, m) {
  m.def("norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, float offset, bool is_rms)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("norm_bwd(Tensor dy, Tensor s, Tensor? weight, Tensor? dsum, Tensor mean, Tensor rstd, float offset,"
        " bool is_rms, bool need_dw, bool need_db) -> (Tensor, Tensor, Tensor)");
  m.def("swiglu_fwd(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_bwd(Tensor dy, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  m.def("rope(Tensor q, Tensor k, Tensor cos, Tensor sin, bool interleaved, bool transposed, bool backward)"
        " -> (Tensor, Tensor)");
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? cu_seqlens_q,"
        " Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, bool causal, bool bottom_right,"
        " float dropout_p, Tensor? seed, int window_left, int window_right) -> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " Tensor? key_padding_mask, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q,"
        " int max_seqlen_k, float scale, bool causal, bool bottom_right, float dropout_p, Tensor? seed,"
        " int window_left, int window_right) -> (Tensor, Tensor, Tensor)");
  m.def("deberta_fwd(Tensor q, Tensor k, Tensor v, Tensor? pos_key, Tensor? pos_query, Tensor? key_padding_mask,"
        " Tensor? cu_seqlens, Tensor rel_idx, int max_seqlen, float scale, float dropout_p, Tensor? seed)"
        " -> (Tensor, Tensor)");
  m.def("deberta_bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor? pos_key, Tensor? pos_query,"
        " Tensor out, Tensor lse, Tensor? key_padding_mask, Tensor? cu_seqlens, Tensor rel_idx, int max_seqlen,"
        " float scale, float dropout_p, Tensor? seed, int d_first, int d_last, int band_lo, int band_n,"
        " bool grad_pos_key, bool grad_pos_query) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("lora_gemm(Tensor x, Tensor w, Tensor p, Tensor q, Tensor? bias, Tensor? keep, float scaling,"
        " bool transposed) -> Tensor");
  m.def("tc_selftest(Tensor a, Tensor b, Tensor c, int m_valid, int ldm_x, bool b_trans, bool wait, bool misalign)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedlm_C, CPU, m) {
  m.impl("norm_fwd", &norm_fwd);
  m.impl("norm_bwd", &norm_bwd);
  m.impl("swiglu_fwd", &swiglu_fwd);
  m.impl("swiglu_bwd", &swiglu_bwd);
  m.impl("rope", &rope);
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("lora_gemm", &lora_gemm);
  m.impl("deberta_fwd", &deberta_fwd);
  m.impl("deberta_bwd", &deberta_bwd);
  m.impl("tc_selftest", &tc_selftest);
}

#if defined(FUSEDLM_WITH_CUDA)
TORCH_LIBRARY_IMPL(fusedlm_C, CUDA, m) {
  m.impl("norm_fwd", &norm_fwd);
  m.impl("norm_bwd", &norm_bwd);
  m.impl("swiglu_fwd", &swiglu_fwd);
  m.impl("swiglu_bwd", &swiglu_bwd);
  m.impl("rope", &rope);
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("lora_gemm", &lora_gemm);
  m.impl("deberta_fwd", &deberta_fwd);
  m.impl("deberta_bwd", &deberta_bwd);
  m.impl("tc_selftest", &tc_selftest);
}
#endif

#if defined(FUSEDLM_PY_MODULE)
// `import fusedlm._C` loads the library (and so the registrations above); the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
#endif
