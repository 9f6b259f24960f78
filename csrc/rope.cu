// Rotary position embedding of q and k at once, both layouts, partial rotary, GQA (q and k head counts
// differ), and with `backward` the transposed rotation (the gradient). For a rotary pair (a, b) of
// features at (batch, position), with c, s the cos / sin table entries of each feature:
//     forward:   out_a = x_a c_a - x_b s_a,     out_b = x_b c_b + x_a s_b
//     backward:  dx_a  = g_a c_a + g_b s_b,     dx_b  = g_b c_b - g_a s_a
// Pairs are (i, i + R/2) for rotate_half and (2i, 2i + 1) interleaved; features R .. D - 1 are copied.
// One block per (batch, position); its threads stride over the work units of all H + Hkv heads:
// rotate_half units are two VEC-vectors (i .. and i + R/2 ..), interleaved units one vector of W =
// max(VEC, 2) features (VEC / 2 whole pairs), pass-through units one vector.
#include "simt.h"

namespace fl {
inline namespace FL_IMPL {

template <class T, int VEC>
struct Rope {
  using Params = RopeParams;
  static constexpr int kThreads = 128, kMaxThreads = kThreads, kSmemFloats = 0;
  static constexpr int W = VEC >= 2 ? VEC : 2;  // interleaved unit width: whole pairs
  struct State {
    float red[2];
  };

  // One rotary pair; (xa, xb) in, the rotated (or, backward, the transposed-rotated) pair out.
  static FL_HD void turn(float xa, float xb, float ca, float sa, float cb, float sb, bool backward, float* oa,
                         float* ob) {
    if (!backward) {
      *oa = xa * ca - xb * sa;
      *ob = xb * cb + xa * sb;
    } else {
      *oa = xa * ca + xb * sb;
      *ob = xb * cb - xa * sa;
    }
  }

  template <class B>
  static FL_BODY void body(B& b, const Params& p) {
    const int64_t bi = b.ctx.bx / p.seqlen, si = b.ctx.bx % p.seqlen;
    const int64_t R = p.rotary, half_r = R / 2;
    const int64_t rot_units = p.interleaved ? R / W : half_r / VEC, units = rot_units + (p.head_dim - R) / VEC;
    const float* cs = p.cos + bi * p.cos_stride_b + si * p.cos_stride_s;
    const float* sn = p.sin + bi * p.cos_stride_b + si * p.cos_stride_s;
    b.each([&](const Ctx& c, State&) {
      for (int64_t u = c.tid; u < (p.heads_q + p.heads_k) * units; u += c.nthreads) {
        const int64_t head = u / units, j = u % units;
        const bool is_q = head < p.heads_q;
        const int64_t h = is_q ? head : head - p.heads_q;
        const int64_t* st = is_q ? p.q_stride : p.k_stride;
        const int64_t* so = is_q ? p.qo_stride : p.ko_stride;
        const T* in = static_cast<const T*>(is_q ? p.q : p.k) + bi * st[0] + h * st[1] + si * st[2];
        T* out = static_cast<T*>(is_q ? p.q_out : p.k_out) + bi * so[0] + h * so[1] + si * so[2];
        if (j >= rot_units) {  // pass-through features
          const int64_t f = R + (j - rot_units) * VEC;
          store<VEC>(out + f, load<VEC>(in + f));
        } else if (!p.interleaved) {  // pairs (i, i + R/2): the vector at i and the one at i + R/2
          const int64_t i = j * VEC;
          const Vec<T, VEC> va = load<VEC>(in + i), vb = load<VEC>(in + i + half_r);
          Vec<T, VEC> oa, ob;
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const int64_t a = i + e, bb = a + half_r;
            float ra, rb;
            turn(to_float(va.v[e]), to_float(vb.v[e]), cs[a], sn[a], cs[bb], sn[bb], p.backward, &ra, &rb);
            oa.v[e] = from_float<T>(ra);
            ob.v[e] = from_float<T>(rb);
          }
          store<VEC>(out + i, oa);
          store<VEC>(out + i + half_r, ob);
        } else {  // pairs (2i, 2i + 1) inside W features
          const int64_t i = j * W;
          T x[W], o[W];
#pragma unroll
          for (int part = 0; part < W / VEC; ++part) {
            const Vec<T, VEC> v = load<VEC>(in + i + part * VEC);
#pragma unroll
            for (int e = 0; e < VEC; ++e) x[part * VEC + e] = v.v[e];
          }
#pragma unroll
          for (int e = 0; e < W; e += 2) {
            const int64_t a = i + e;
            float ra, rb;
            turn(to_float(x[e]), to_float(x[e + 1]), cs[a], sn[a], cs[a + 1], sn[a + 1], p.backward, &ra, &rb);
            o[e] = from_float<T>(ra);
            o[e + 1] = from_float<T>(rb);
          }
#pragma unroll
          for (int part = 0; part < W / VEC; ++part) {
            Vec<T, VEC> v;
#pragma unroll
            for (int e = 0; e < VEC; ++e) v.v[e] = o[part * VEC + e];
            store<VEC>(out + i + part * VEC, v);
          }
        }
      }
    });
  }
};

template <class T>
void rope_typed(const RopeParams& p, Stream stream) {
  constexpr int V = vec16<T>();
  auto ok = [&](const void* ptr, const int64_t* stride) {
    return aligned<T>(ptr, V) && stride[0] % V == 0 && stride[1] % V == 0 && stride[2] % V == 0;
  };
  const bool vec_ok = p.head_dim % V == 0 && (p.interleaved ? p.rotary % V == 0 : p.rotary % (2 * V) == 0) &&
                      ok(p.q, p.q_stride) && ok(p.k, p.k_stride) && ok(p.q_out, p.qo_stride) &&
                      ok(p.k_out, p.ko_stride);
  const int blocks = int(p.batch * p.seqlen);
  if (vec_ok) return launch<Rope<T, V>>(blocks, 1, Rope<T, V>::kThreads, p, stream);
  launch<Rope<T, 1>>(blocks, 1, Rope<T, 1>::kThreads, p, stream);
}

}  // namespace FL_IMPL

#if defined(__CUDACC__)
namespace cuda {
void rope(const RopeParams& p, cudaStream_t stream) { FL_DISPATCH_DTYPE(p.dtype, T, rope_typed<T>(p, stream)) }
}  // namespace cuda
#else
namespace cpu {
void rope(const RopeParams& p) { FL_DISPATCH_DTYPE(p.dtype, T, rope_typed<T>(p, nullptr)) }
}  // namespace cpu
#endif

}  // namespace fl
