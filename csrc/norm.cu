// RMSNorm and LayerNorm with the fused residual add: forward, backward (ds), and the dweight / dbias
// column sums. One block per row for the forward and ds kernels; the math, per row of n features:
//
//     s     = x + residual               rounded to the input dtype (the sum the op returns)
//     LN:   mu = <s>,  rstd = 1 / sqrt(<(s - mu)^2> + eps)      (<.> the mean over the row, in float32)
//     RMS:  mu = 0,    rstd = 1 / sqrt(<s^2> + eps)
//     xhat  = (s - mu) * rstd,   y = xhat * w + b                (RMS: w = offset + weight)
//     ds    = rstd * (g - <g> - xhat <g xhat>) (+ dsum),  g = dy * w      (RMS: without the <g> term)
//     dweight = sum over rows of dy * xhat,   dbias = sum over rows of dy
//
// Static switches (template parameters): the dtype T; VEC, the elements per access (16 bytes when the
// row size, strides and pointers allow, else 1); NV, the vectors each thread keeps in registers. With
// NV > 0 the row is read from memory once (up to 512 * 16 vectors: 65536 features of a 16-bit dtype,
// 32768 of float32 in the forward, half that in the backward, which holds dy and s); NV == 0 is the
// looped variant for wider rows, which re-reads the row per pass (from L2 on a GPU). Thread t always handles the vectors t, t + threads, t + 2 threads, ... of its row, in every
// pass, so a pass only reads back what the same thread wrote (the stored sum s): no barrier needed.
#include "simt.h"

namespace fl {
inline namespace FL_IMPL {

// s = x (+ residual) for vector v of a row, stored to s_out when fused.
template <class T, int VEC>
FL_HD Vec<T, VEC> load_sum(const T* x, const T* res, T* s_out, int64_t v) {
  Vec<T, VEC> xv = load<VEC>(x + v * VEC);
  if (res != nullptr) {
    const Vec<T, VEC> rv = load<VEC>(res + v * VEC);
#pragma unroll
    for (int e = 0; e < VEC; ++e) xv.v[e] = from_float<T>(to_float(xv.v[e]) + to_float(rv.v[e]));
    store<VEC>(s_out + v * VEC, xv);
  }
  return xv;
}

// The scale and shift of features v*VEC .. v*VEC + VEC - 1 (1 and 0 when absent).
template <int VEC>
FL_HD void load_affine(const float* w, const float* b, float offset, int64_t v, float* wv, float* bv) {
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    wv[e] = 1.0f;
    bv[e] = 0.0f;
  }
  if (w != nullptr) {
    const Vec<float, VEC> t = load<VEC>(w + v * VEC);
#pragma unroll
    for (int e = 0; e < VEC; ++e) wv[e] = t.v[e] + offset;
  }
  if (b != nullptr) {
    const Vec<float, VEC> t = load<VEC>(b + v * VEC);
#pragma unroll
    for (int e = 0; e < VEC; ++e) bv[e] = t.v[e];
  }
}

// Calls f(i, v) for the vectors v = tid, tid + threads, ... (below nvec) of the row that this thread owns; i
// is the register slot holding v when NV > 0 (the loop is unrolled, so slots stay registers), 0 otherwise.
template <int NV, class F>
FL_HD void for_my_vectors(const Ctx& c, int64_t nvec, F&& f) {
  if constexpr (NV > 0) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int64_t v = c.tid + int64_t(i) * c.nthreads;
      if (v < nvec) f(i, v);
    }
  } else {
    for (int64_t v = c.tid; v < nvec; v += c.nthreads) f(0, v);
  }
}

template <class T, int VEC, int NV>
struct NormFwd {
  using Params = NormFwdParams;
  // 512 threads for the widest held rows leave 128 registers a thread (64 hold the row): no spills.
  static constexpr int kMaxThreads = NV >= 8 ? 512 : 1024, kSmemFloats = 0;
  struct State {
    float red[2];
    float mean;
    Vec<T, VEC> s[NV > 0 ? NV : 1];  // the thread's part of the row (NV > 0)
  };

  // The vector v of s: from its register slot i (NV > 0), else re-read from memory.
  static FL_HD Vec<T, VEC> held_or_load(State& st, int i, const T* src, int64_t v) {
    if constexpr (NV > 0) {
      keep_packed(st.s[i]);
      return st.s[i];
    } else {
      return load<VEC>(src + v * VEC);
    }
  }

  template <class B>
  static FL_BODY void body(B& b, const Params& p) {
    const int64_t row = b.ctx.bx, nvec = p.n / VEC;
    const T* x = static_cast<const T*>(p.x) + row * p.x_stride;
    const T* res = p.residual ? static_cast<const T*>(p.residual) + row * p.res_stride : nullptr;
    T* s_out = p.s ? static_cast<T*>(p.s) + row * p.s_stride : nullptr;
    const T* src = res ? s_out : x;  // where the looped variant re-reads s from
    T* y = static_cast<T*>(p.y) + row * p.y_stride;
    const float inv_n = 1.0f / float(p.n);

    // Pass 1: s (stored when fused); sum of s (LayerNorm) or of s^2 (RMSNorm).
    b.each([&](const Ctx& c, State& st) {
      float acc = 0.0f;
      auto add = [&](const Vec<T, VEC>& sv) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float f = to_float(sv.v[e]);
          acc += p.is_rms ? f * f : f;
        }
      };
      for_my_vectors<NV>(c, nvec, [&](int i, int64_t v) {
        const Vec<T, VEC> sv = load_sum<T, VEC>(x, res, s_out, v);
        if constexpr (NV > 0) st.s[i] = sv;
        add(sv);
      });
      st.red[0] = acc;
    });
    b.template block_sum<1>();

    // Pass 2 (LayerNorm): the variance about the mean (two passes: no cancellation).
    if (!p.is_rms) {
      b.each([&](const Ctx& c, State& st) {
        st.mean = st.red[0] * inv_n;
        float acc = 0.0f;
        auto add = [&](const Vec<T, VEC>& sv) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const float d = to_float(sv.v[e]) - st.mean;
            acc += d * d;
          }
        };
        for_my_vectors<NV>(c, nvec, [&](int i, int64_t v) { add(held_or_load(st, i, src, v)); });
        st.red[0] = acc;
      });
      b.template block_sum<1>();
    }

    // Last pass: normalise, scale, shift.
    b.each([&](const Ctx& c, State& st) {
      const float mean = p.is_rms ? 0.0f : st.mean;
      const float rstd = rsqrt(st.red[0] * inv_n + p.eps);
      auto out = [&](const Vec<T, VEC>& sv, int64_t v) {
        float wv[VEC], bv[VEC];
        load_affine<VEC>(p.weight, p.bias, p.offset, v, wv, bv);
        Vec<T, VEC> yv;
#pragma unroll
        for (int e = 0; e < VEC; ++e) yv.v[e] = from_float<T>((to_float(sv.v[e]) - mean) * rstd * wv[e] + bv[e]);
        store<VEC>(y + v * VEC, yv);
      };
      for_my_vectors<NV>(c, nvec, [&](int i, int64_t v) { out(held_or_load(st, i, src, v), v); });
      if (c.tid == 0) {
        p.rstd[row] = rstd;
        if (p.mean != nullptr) p.mean[row] = mean;
      }
    });
  }
};

template <class T, int VEC, int NV>
struct NormBwdRows {
  using Params = NormBwdParams;
  static constexpr int kMaxThreads = NV >= 4 ? 512 : 1024, kSmemFloats = 0;
  struct State {
    float red[2];
    Vec<T, VEC> dy[NV > 0 ? NV : 1], s[NV > 0 ? NV : 1];
  };

  template <class B>
  static FL_BODY void body(B& b, const Params& p) {
    const int64_t row = b.ctx.bx, nvec = p.n / VEC;
    const T* dy = static_cast<const T*>(p.dy) + row * p.dy_stride;
    const T* s = static_cast<const T*>(p.s) + row * p.s_stride;
    const T* dsum = p.dsum ? static_cast<const T*>(p.dsum) + row * p.dsum_stride : nullptr;
    T* ds = static_cast<T*>(p.ds) + row * p.ds_stride;
    const float mean = p.mean ? p.mean[row] : 0.0f, rstd = p.rstd[row], inv_n = 1.0f / float(p.n);

    // g = dy * w and xhat for one vector, into floats.
    auto terms = [&](const Vec<T, VEC>& dyv, const Vec<T, VEC>& sv, int64_t v, float* g, float* xhat) {
      float wv[VEC], unused[VEC];
      load_affine<VEC>(p.weight, nullptr, p.offset, v, wv, unused);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        g[e] = to_float(dyv.v[e]) * wv[e];
        xhat[e] = (to_float(sv.v[e]) - mean) * rstd;
      }
    };

    // Pass 1: the row sums of g and g * xhat.
    b.each([&](const Ctx& c, State& st) {
      float sum_g = 0.0f, sum_gx = 0.0f;
      auto add = [&](const Vec<T, VEC>& dyv, const Vec<T, VEC>& sv, int64_t v) {
        float g[VEC], xhat[VEC];
        terms(dyv, sv, v, g, xhat);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          sum_g += g[e];
          sum_gx += g[e] * xhat[e];
        }
      };
      for_my_vectors<NV>(c, nvec, [&](int i, int64_t v) {
        const Vec<T, VEC> dyv = load<VEC>(dy + v * VEC), sv = load<VEC>(s + v * VEC);
        if constexpr (NV > 0) {
          st.dy[i] = dyv;
          st.s[i] = sv;
        }
        add(dyv, sv, v);
      });
      st.red[0] = sum_g;
      st.red[1] = sum_gx;
    });
    b.template block_sum<2>();

    // Pass 2: ds.
    b.each([&](const Ctx& c, State& st) {
      const float mean_g = p.is_rms ? 0.0f : st.red[0] * inv_n, mean_gx = st.red[1] * inv_n;
      auto out = [&](const Vec<T, VEC>& dyv, const Vec<T, VEC>& sv, int64_t v) {
        float g[VEC], xhat[VEC], extra[VEC];
        terms(dyv, sv, v, g, xhat);
        if (dsum != nullptr) {
          to_floats(load<VEC>(dsum + v * VEC), extra);
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) extra[e] = 0.0f;
        }
        Vec<T, VEC> dv;
#pragma unroll
        for (int e = 0; e < VEC; ++e) dv.v[e] = from_float<T>(rstd * (g[e] - mean_g - xhat[e] * mean_gx) + extra[e]);
        store<VEC>(ds + v * VEC, dv);
      };
      for_my_vectors<NV>(c, nvec, [&](int i, int64_t v) {
        if constexpr (NV > 0) {
          keep_packed(st.dy[i]);
          keep_packed(st.s[i]);
          out(st.dy[i], st.s[i], v);
        } else {
          out(load<VEC>(dy + v * VEC), load<VEC>(s + v * VEC), v);
        }
      });
    });
  }
};

// dweight / dbias partial sums: block (bx, by) sums rows by*rows_per_chunk .. of the 32 * VEC columns
// starting at bx * 32 * VEC. 256 threads: lane = tid % 32 picks VEC columns, ry = tid / 32 one of 8 row
// lanes; the 8 row-lane sums are added in order through shared memory.
template <class T, int VEC>
struct NormBwdCols {
  using Params = NormBwdParams;
  static constexpr int kThreads = 256, kRowLanes = kThreads / 32;
  static constexpr int kMaxThreads = kThreads, kSmemFloats = 2 * kThreads * VEC;
  struct State {
    float red[2];
  };

  template <class B>
  static FL_BODY void body(B& b, const Params& p) {
    const int64_t col0_block = int64_t(b.ctx.bx) * 32 * VEC;
    const int64_t r_begin = int64_t(b.ctx.by) * p.rows_per_chunk;
    const int64_t r_end = r_begin + p.rows_per_chunk < p.rows ? r_begin + p.rows_per_chunk : p.rows;
    float* sm = b.shared();  // [2][kThreads][VEC]: dweight then dbias partials per thread

    b.each([&](const Ctx& c, State&) {
      const int lane = c.tid % 32, ry = c.tid / 32;
      const int64_t col = col0_block + int64_t(lane) * VEC;
      float dw[VEC], db[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) dw[e] = db[e] = 0.0f;
      if (col < p.n) {
        for (int64_t r = r_begin + ry; r < r_end; r += kRowLanes) {
          float dyf[VEC], sf[VEC];
          to_floats(load<VEC>(static_cast<const T*>(p.dy) + r * p.dy_stride + col), dyf);
          to_floats(load<VEC>(static_cast<const T*>(p.s) + r * p.s_stride + col), sf);
          const float mean = p.mean ? p.mean[r] : 0.0f, rstd = p.rstd[r];
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            dw[e] += dyf[e] * ((sf[e] - mean) * rstd);
            db[e] += dyf[e];
          }
        }
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        sm[c.tid * VEC + e] = dw[e];
        sm[(kThreads + c.tid) * VEC + e] = db[e];
      }
    });
    b.sync();
    b.each([&](const Ctx& c, State&) {
      const int lane = c.tid % 32;
      const int64_t col = col0_block + int64_t(lane) * VEC;
      if (c.tid >= 32 || col >= p.n) return;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        float dw = 0.0f, db = 0.0f;
        for (int ry = 0; ry < kRowLanes; ++ry) {
          dw += sm[(ry * 32 + lane) * VEC + e];
          db += sm[(kThreads + ry * 32 + lane) * VEC + e];
        }
        if (p.dw_part) p.dw_part[int64_t(b.ctx.by) * p.n + col + e] = dw;
        if (p.db_part) p.db_part[int64_t(b.ctx.by) * p.n + col + e] = db;
      }
    });
  }
};

// ---- Launch configuration: the widest access the pointers and strides allow, then the register budget.

template <class T, int VEC>
void norm_fwd_sized(const NormFwdParams& p, Stream stream) {
  const int64_t nvec = p.n / VEC;
  const int rows = int(p.rows);
  // Up to 128 threads hold 1, 2 or 4 vectors each; then up to 512 threads hold 8 or 16 (65536 features
  // of a 16-bit dtype, 32768 of float32); wider rows loop.
  if (nvec <= 128) return launch<NormFwd<T, VEC, 1>>(rows, 1, round_up32(nvec), p, stream);
  if (nvec <= 256) return launch<NormFwd<T, VEC, 2>>(rows, 1, round_up32((nvec + 1) / 2), p, stream);
  if (nvec <= 512) return launch<NormFwd<T, VEC, 4>>(rows, 1, round_up32((nvec + 3) / 4), p, stream);
  if (nvec <= 512 * 8) return launch<NormFwd<T, VEC, 8>>(rows, 1, round_up32((nvec + 7) / 8), p, stream);
  if constexpr (VEC > 1) {  // the scalar fallback holds at most 8 (a 16-element array spills on sm_80)
    if (nvec <= 512 * 16) return launch<NormFwd<T, VEC, 16>>(rows, 1, round_up32((nvec + 15) / 16), p, stream);
  }
  launch<NormFwd<T, VEC, 0>>(rows, 1, 1024, p, stream);
}

template <class T>
void norm_fwd_typed(const NormFwdParams& p, Stream stream) {
  constexpr int V = vec16<T>();
  const bool vec_ok = p.n % V == 0 && aligned<T>(p.x, V) && p.x_stride % V == 0 && aligned<T>(p.y, V) &&
                      p.y_stride % V == 0 && (!p.residual || (aligned<T>(p.residual, V) && p.res_stride % V == 0 &&
                                                              aligned<T>(p.s, V) && p.s_stride % V == 0)) &&
                      (!p.weight || aligned<float>(p.weight, V)) && (!p.bias || aligned<float>(p.bias, V));
  if (vec_ok) return norm_fwd_sized<T, V>(p, stream);
  norm_fwd_sized<T, 1>(p, stream);
}

template <class T, int VEC>
void norm_bwd_sized(const NormBwdParams& p, Stream stream) {
  const int64_t nvec = p.n / VEC;
  const int rows = int(p.rows);
  // Two vectors (dy, s) per held slot: half the forward's capacity (32768 features of a 16-bit dtype).
  if (nvec <= 128) launch<NormBwdRows<T, VEC, 1>>(rows, 1, round_up32(nvec), p, stream);
  else if (nvec <= 256) launch<NormBwdRows<T, VEC, 2>>(rows, 1, round_up32((nvec + 1) / 2), p, stream);
  else if (nvec <= 512 * 4) launch<NormBwdRows<T, VEC, 4>>(rows, 1, round_up32((nvec + 3) / 4), p, stream);
  else if (nvec <= 512 * 8) launch<NormBwdRows<T, VEC, 8>>(rows, 1, round_up32((nvec + 7) / 8), p, stream);
  else launch<NormBwdRows<T, VEC, 0>>(rows, 1, 1024, p, stream);
  if (p.dw_part || p.db_part) {
    const int64_t tiles = (p.n + 32 * VEC - 1) / (32 * VEC);
    const int64_t chunks = (p.rows + p.rows_per_chunk - 1) / p.rows_per_chunk;
    launch<NormBwdCols<T, VEC>>(int(tiles), int(chunks), NormBwdCols<T, VEC>::kThreads, p, stream);
  }
}

template <class T>
void norm_bwd_typed(const NormBwdParams& p, Stream stream) {
  constexpr int V = vec16<T>();
  const bool vec_ok = p.n % V == 0 && aligned<T>(p.dy, V) && p.dy_stride % V == 0 && aligned<T>(p.s, V) &&
                      p.s_stride % V == 0 && aligned<T>(p.ds, V) && p.ds_stride % V == 0 &&
                      (!p.dsum || (aligned<T>(p.dsum, V) && p.dsum_stride % V == 0)) &&
                      (!p.weight || aligned<float>(p.weight, V));
  if (vec_ok) return norm_bwd_sized<T, V>(p, stream);
  norm_bwd_sized<T, 1>(p, stream);
}

}  // namespace FL_IMPL

#if defined(__CUDACC__)
namespace cuda {
void norm_fwd(const NormFwdParams& p, cudaStream_t s) { FL_DISPATCH_DTYPE(p.dtype, T, norm_fwd_typed<T>(p, s)) }
void norm_bwd(const NormBwdParams& p, cudaStream_t s) { FL_DISPATCH_DTYPE(p.dtype, T, norm_bwd_typed<T>(p, s)) }
}  // namespace cuda
#else
namespace cpu {
void norm_fwd(const NormFwdParams& p) { FL_DISPATCH_DTYPE(p.dtype, T, norm_fwd_typed<T>(p, nullptr)) }
void norm_bwd(const NormBwdParams& p) { FL_DISPATCH_DTYPE(p.dtype, T, norm_bwd_typed<T>(p, nullptr)) }
}  // namespace cpu
#endif

}  // namespace fl
