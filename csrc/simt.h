// The SIMT layer every kernel in csrc/ is written against, so that one kernel body compiles with nvcc for
// the GPU and with a plain C++ compiler for the CPU harness (the tests run the kernels' own source on CPU).
//
// A kernel is a struct K with
//     using Params = ...;                    the launch arguments (plain data, see kernels.h)
//     struct State {...};                    one thread's registers; `red[2]` is the reduction slot
//     static constexpr int kMaxThreads;      block size bound (__launch_bounds__ on the device)
//     static constexpr int kSmemFloats;      shared memory the body uses through b.shared()
//     template <class Block> static FL_BODY void body(Block& b, const Params& p);
// and its body is a sequence of *phases* separated by barriers:
//     b.each([&](const Ctx& c, State& st) { ... });   every thread of the block runs the lambda
//     b.sync();                                        __syncthreads()
//     b.template block_sum<K>();                       st.red[0..K) summed over the block, total to all
//     b.shared();                                      the block's shared memory (floats)
// On the device each() is one call on the thread's own state, sync() is __syncthreads() and block_sum()
// is a warp butterfly (shfl_xor 16, 8, 4, 2, 1), one partial per warp in shared memory, and the same
// butterfly over the warp partials. On the host (the harness) a block is a vector of States; each()
// loops over the threads in order (so everything before a barrier happens before anything after it),
// and block_sum() replays the butterfly lane by lane in the same order, giving the same float sums as
// the device (up to the differences listed in csrc/README.md).
#pragma once

#include <stdint.h>
#include <string.h>

#include <cmath>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define FL_HD __host__ __device__ __forceinline__
#define FL_BODY __device__ __forceinline__
#define FL_IMPL impl_device
#else
#include <vector>
#define FL_HD inline
#define FL_BODY inline
#define FL_IMPL impl_cpu
#endif

#include "kernels.h"

namespace fl {
// Everything below is compiled twice (nvcc for the device, the C++ compiler for the harness) into
// different inline namespaces, so the two builds can live in one library without clashing symbols.
inline namespace FL_IMPL {

constexpr int kWarpSize = 32;

// ---- Storage types: the device's own; on the host small bit containers with round-to-nearest-even.
#if defined(__CUDACC__)
using half = __half;
using bfloat16 = __nv_bfloat16;
using Stream = cudaStream_t;
FL_HD float to_float(float v) { return v; }
FL_HD float to_float(__half v) { return __half2float(v); }
FL_HD float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T> FL_HD T from_float(float v);
template <> FL_HD float from_float<float>(float v) { return v; }
template <> FL_HD __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> FL_HD __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
FL_HD float rsqrt(float v) { return rsqrtf(v); }
FL_HD float exp(float v) { return expf(v); }
#else
struct half { uint16_t bits; };
struct bfloat16 { uint16_t bits; };
using Stream = void*;

inline uint32_t float_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
inline float bits_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

inline float to_float(float v) { return v; }
inline float to_float(bfloat16 v) { return bits_float(uint32_t(v.bits) << 16); }
inline float to_float(half v) {
  const uint32_t sign = uint32_t(v.bits & 0x8000) << 16, exp = (v.bits >> 10) & 0x1f, man = v.bits & 0x3ff;
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in float
    const float mag = std::ldexp(float(man), -24);
    return sign ? -mag : mag;
  }
  if (exp == 31) return bits_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  return bits_float(sign | ((exp - 15 + 127) << 23) | (man << 13));
}

// Round the integer m right by `shift` bits to nearest, ties to even.
inline uint32_t round_shift(uint32_t m, int shift) {
  if (shift >= 32) return 0;
  const uint32_t kept = m >> shift, rest = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
  return kept + (rest > halfway || (rest == halfway && (kept & 1)));
}

template <class T> inline T from_float(float v);
template <> inline float from_float<float>(float v) { return v; }
template <> inline bfloat16 from_float<bfloat16>(float v) {
  const uint32_t u = float_bits(v);
  if ((u & 0x7fffffff) > 0x7f800000) return {uint16_t((u >> 16) | 0x40)};  // nan stays a (quiet) nan
  return {uint16_t(round_shift(u, 16))};  // a carry into the exponent is the correct rounding (to inf too)
}
template <> inline half from_float<half>(float v) {
  const uint32_t u = float_bits(v), sign = (u >> 16) & 0x8000, mag = u & 0x7fffffff;
  if (mag > 0x7f800000) return {uint16_t(sign | 0x7e00)};  // nan
  const int exp = int(mag >> 23) - 127 + 15;                 // the half's biased exponent
  const uint32_t man = mag & 0x7fffff;
  if (exp >= 31) return {uint16_t(sign | 0x7c00)};           // overflow (or inf) -> inf
  if (exp >= 1)  // normal: drop 13 mantissa bits; a carry may bump the exponent, up to inf: correct
    return {uint16_t(sign | round_shift((uint32_t(exp) << 23) | man, 13))};
  // subnormal half (or zero): the 24-bit significand shifted right by 14 - exp
  return {uint16_t(sign | round_shift(man | 0x800000, 14 - exp))};
}
inline float rsqrt(float v) { return 1.0f / std::sqrt(v); }
inline float exp(float v) { return std::exp(v); }
#endif

// ---- Vectors: VEC elements loaded or stored with one access (16 bytes in the vectorized kernels).
template <class T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <int N, class T>
FL_HD Vec<T, N> load(const T* p) {
#if defined(__CUDACC__)
  return *reinterpret_cast<const Vec<T, N>*>(p);
#else
  Vec<T, N> out;
  memcpy(&out, p, sizeof(out));
  return out;
#endif
}

template <int N, class T>
FL_HD void store(T* p, const Vec<T, N>& v) {
#if defined(__CUDACC__)
  *reinterpret_cast<Vec<T, N>*>(p) = v;
#else
  memcpy(p, &v, sizeof(v));
#endif
}

// The elements of one vector from memory: VEC elements at p (aligned) or, with VEC == 1, one.
template <class T, int N>
FL_HD void to_floats(const Vec<T, N>& v, float* out) {
#pragma unroll
  for (int e = 0; e < N; ++e) out[e] = to_float(v.v[e]);
}

// Makes the compiler forget what it knows about the bits of v (no instruction is emitted). Used on the
// vectors a thread keeps across a barrier: without it nvcc may keep their float conversions live instead
// of the packed 16-bit values (twice the registers: spills on sm_90 for bf16).
template <class T, int N>
FL_HD void keep_packed(Vec<T, N>& v) {
#if defined(__CUDA_ARCH__)
  static_assert(sizeof(v) % 4 == 0 || sizeof(v) == 2, "vector of whole 32-bit words");
  if constexpr (sizeof(v) % 4 == 0) {
    uint32_t* w = reinterpret_cast<uint32_t*>(&v);
#pragma unroll
    for (int i = 0; i < int(sizeof(v) / 4); ++i) asm volatile("" : "+r"(w[i]));
  } else {
    uint16_t* h = reinterpret_cast<uint16_t*>(&v);
    asm volatile("" : "+h"(h[0]));
  }
#else
  (void)v;
#endif
}

// ---- Where a thread is.
struct Ctx {
  int tid;       // threadIdx.x
  int nthreads;  // blockDim.x (a multiple of 32)
  int bx, by;    // blockIdx.x, blockIdx.y
  int gx, gy;    // gridDim.x, gridDim.y
};

#if defined(__CUDACC__)
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;  // the butterfly leaves the same total in every lane
}

template <class State>
struct Block {
  Ctx ctx;
  State st;
  float* red;   // 2 x 32 floats: one partial per warp and reduced quantity
  float* smem;  // the kernel's own shared memory

  template <class F>
  __device__ __forceinline__ void each(F&& f) { f(ctx, st); }
  __device__ __forceinline__ void sync() { __syncthreads(); }
  __device__ __forceinline__ float* shared() { return smem; }

  template <int K>
  __device__ __forceinline__ void block_sum() {
    const int lane = ctx.tid & 31, warp = ctx.tid >> 5, nwarps = ctx.nthreads >> 5;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const float v = warp_sum(st.red[k]);
      if (lane == 0) red[k * 32 + warp] = v;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < K; ++k) st.red[k] = warp_sum(lane < nwarps ? red[k * 32 + lane] : 0.0f);
    __syncthreads();  // red may be written again by the next reduction
  }
};

template <class K>
__global__ void __launch_bounds__(K::kMaxThreads) simt_kernel(const typename K::Params p) {
  __shared__ float red[2 * 32];
  __shared__ float smem[K::kSmemFloats > 0 ? K::kSmemFloats : 1];
  Block<typename K::State> b;
  b.ctx = Ctx{int(threadIdx.x), int(blockDim.x), int(blockIdx.x), int(blockIdx.y), int(gridDim.x), int(gridDim.y)};
  b.red = red;
  b.smem = smem;
  K::body(b, p);
}

// Launch kernel K on a (gx, gy) grid of blocks of `threads` threads (a multiple of 32, <= K::kMaxThreads).
template <class K>
void launch(int gx, int gy, int threads, const typename K::Params& p, Stream stream) {
  if (gx == 0 || gy == 0) return;
  simt_kernel<K><<<dim3(gx, gy), threads, 0, stream>>>(p);
}
#else
// The harness: the 32 lanes of a warp as an array, the butterfly replayed in the device's order.
inline float warp_sum(float* lanes) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    float next[32];
    for (int l = 0; l < 32; ++l) next[l] = lanes[l] + lanes[l ^ offset];
    memcpy(lanes, next, sizeof(next));
  }
  return lanes[0];
}

template <class State>
struct Block {
  Ctx ctx;
  std::vector<State> threads;
  std::vector<float> smem;

  template <class F>
  void each(F&& f) {
    Ctx c = ctx;
    for (c.tid = 0; c.tid < ctx.nthreads; ++c.tid) f(static_cast<const Ctx&>(c), threads[c.tid]);
  }
  void sync() {}  // each() has run every thread to this point already
  float* shared() { return smem.data(); }

  template <int K>
  void block_sum() {
    const int nwarps = ctx.nthreads / 32;
    for (int k = 0; k < K; ++k) {
      float partial[32], lanes[32];
      for (int w = 0; w < nwarps; ++w) {
        for (int l = 0; l < 32; ++l) lanes[l] = threads[w * 32 + l].red[k];
        partial[w] = warp_sum(lanes);
      }
      for (int l = 0; l < 32; ++l) lanes[l] = l < nwarps ? partial[l] : 0.0f;
      const float total = warp_sum(lanes);
      for (auto& t : threads) t.red[k] = total;
    }
  }
};

// Run kernel K's blocks one after another, each block's threads phase by phase.
template <class K>
void launch(int gx, int gy, int threads, const typename K::Params& p, Stream) {
  Block<typename K::State> b;
  b.threads.resize(threads);
  b.smem.assign(K::kSmemFloats > 0 ? K::kSmemFloats : 1, 0.0f);
  b.ctx = Ctx{0, threads, 0, 0, gx, gy};
  for (int by = 0; by < gy; ++by)
    for (int bx = 0; bx < gx; ++bx) {
      b.ctx.bx = bx;
      b.ctx.by = by;
      for (auto& t : b.threads) t = typename K::State{};  // registers start undefined; no carry-over
      K::body(b, p);
    }
}
#endif

// Types per DType, for the launchers' dtype switch.
#define FL_DISPATCH_DTYPE(dtype, T, ...)                 \
  switch (dtype) {                                       \
    case ::fl::DType::F32: { using T = float; __VA_ARGS__; break; }         \
    case ::fl::DType::F16: { using T = ::fl::half; __VA_ARGS__; break; }    \
    case ::fl::DType::BF16: { using T = ::fl::bfloat16; __VA_ARGS__; break; } \
  }

// Elements per 16-byte access for T.
template <class T>
constexpr int vec16() { return int(16 / sizeof(T)); }

// True when `p` is aligned for VEC-element accesses of T.
template <class T>
FL_HD bool aligned(const void* p, int vec) {
  return (reinterpret_cast<uintptr_t>(p) % (sizeof(T) * vec)) == 0;
}

inline int round_up32(int64_t n) { return int((n + 31) / 32 * 32); }

}  // namespace FL_IMPL
}  // namespace fl
