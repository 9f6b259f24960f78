// SwiGLU, elementwise over rows of n features, in float32:
//     out   = silu(g) * u,              silu(g) = g * sigmoid(g)
//     dgate = dy * u * sigmoid(g) * (1 + g * (1 - sigmoid(g))),   dup = dy * silu(g)
// Block (bx, by) covers row bx, vectors by * threads .. of it (grid x: rows, up to 2^31 - 1; y: chunks).
// Static switches: the dtype, VEC (16-byte accesses where the row size, strides and pointers allow, else
// 1) and forward / backward.
#include "simt.h"

namespace fl {
inline namespace FL_IMPL {

template <class T, int VEC, bool BACKWARD>
struct Swiglu {
  using Params = SwigluParams;
  static constexpr int kThreads = 256, kMaxThreads = kThreads, kSmemFloats = 0;
  struct State {
    float red[2];
  };

  template <class B>
  static FL_BODY void body(B& b, const Params& p) {
    const int64_t row = b.ctx.bx;
    b.each([&](const Ctx& c, State&) {
      const int64_t v = int64_t(b.ctx.by) * c.nthreads + c.tid;
      if (v >= p.n / VEC) return;
      const int64_t col = v * VEC;
      float g[VEC], u[VEC];
      to_floats(load<VEC>(static_cast<const T*>(p.gate) + row * p.gate_stride + col), g);
      to_floats(load<VEC>(static_cast<const T*>(p.up) + row * p.up_stride + col), u);
      if constexpr (!BACKWARD) {
        Vec<T, VEC> out;
#pragma unroll
        for (int e = 0; e < VEC; ++e) out.v[e] = from_float<T>(g[e] / (1.0f + exp(-g[e])) * u[e]);
        store<VEC>(static_cast<T*>(p.out) + row * p.out_stride + col, out);
      } else {
        float dy[VEC];
        to_floats(load<VEC>(static_cast<const T*>(p.dy) + row * p.dy_stride + col), dy);
        Vec<T, VEC> dg, du;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float sig = 1.0f / (1.0f + exp(-g[e]));
          dg.v[e] = from_float<T>(dy[e] * u[e] * sig * (1.0f + g[e] * (1.0f - sig)));
          du.v[e] = from_float<T>(dy[e] * g[e] * sig);
        }
        store<VEC>(static_cast<T*>(p.dgate) + row * p.dgate_stride + col, dg);
        store<VEC>(static_cast<T*>(p.dup) + row * p.dup_stride + col, du);
      }
    });
  }
};

template <class T, int VEC>
void swiglu_sized(const SwigluParams& p, Stream stream) {
  constexpr int threads = Swiglu<T, VEC, false>::kThreads;
  const int chunks = int((p.n / VEC + threads - 1) / threads);
  if (p.backward) return launch<Swiglu<T, VEC, true>>(int(p.rows), chunks, threads, p, stream);
  launch<Swiglu<T, VEC, false>>(int(p.rows), chunks, threads, p, stream);
}

template <class T>
void swiglu_typed(const SwigluParams& p, Stream stream) {
  constexpr int V = vec16<T>();
  auto ok = [&](const void* ptr, int64_t stride) { return ptr == nullptr || (aligned<T>(ptr, V) && stride % V == 0); };
  const bool vec_ok = p.n % V == 0 && ok(p.gate, p.gate_stride) && ok(p.up, p.up_stride) && ok(p.dy, p.dy_stride) &&
                      ok(p.out, p.out_stride) && ok(p.dgate, p.dgate_stride) && ok(p.dup, p.dup_stride);
  if (vec_ok) return swiglu_sized<T, V>(p, stream);
  swiglu_sized<T, 1>(p, stream);
}

}  // namespace FL_IMPL

#if defined(__CUDACC__)
namespace cuda {
void swiglu(const SwigluParams& p, cudaStream_t stream) { FL_DISPATCH_DTYPE(p.dtype, T, swiglu_typed<T>(p, stream)) }
}  // namespace cuda
#else
namespace cpu {
void swiglu(const SwigluParams& p) { FL_DISPATCH_DTYPE(p.dtype, T, swiglu_typed<T>(p, nullptr)) }
}  // namespace cpu
#endif

}  // namespace fl
