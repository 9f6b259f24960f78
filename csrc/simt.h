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
//     b.template shared_as<U>();                       the same memory as U (16-byte aligned)
// and, for tensor-core kernels, warp-collective phases whose operands each lane names through a selector
// `sel(const Ctx&, State&)` returning pointers into its State (see "Tensor cores" below):
//     b.template mma_m16n8k16<T>(sel);                 D += A B per warp (mma.sync, T = half or bfloat16)
//     b.template ldmatrix<X, TRANS>(sel);              X 8x8 b16 matrices from shared memory (ldmatrix)
//     b.template quad_reduce<N, MAX>(sel);             N floats max- or sum-reduced over each quad of lanes
// and, inside an each() phase, the per-thread asynchronous copy (cp.async.cg, 16 bytes):
//     b.cp_async16(dst_shared, src_global, valid);     b.cp_async_commit();   b.template cp_async_wait<N>();
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
#include <type_traits>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#define FL_HD __host__ __device__ __forceinline__
#define FL_BODY __device__ __forceinline__
#define FL_IMPL impl_device
#else
#include <stdexcept>
#include <string>
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
FL_HD float exp2(float v) { return exp2f(v); }
FL_HD float log(float v) { return logf(v); }
FL_HD uint32_t umulhi(uint32_t a, uint32_t b) { return __umulhi(a, b); }
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
inline float exp2(float v) { return std::exp2(v); }
inline float log(float v) { return std::log(v); }
inline uint32_t umulhi(uint32_t a, uint32_t b) { return uint32_t((uint64_t(a) * b) >> 32); }
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

// ---- Tensor cores: the warp-level operands (PTX ISA 9.7.14.5.8, "Matrix Fragments for mma.m16n8k16 with
// floating point type", and 9.7.14.5.15, "Warp-level matrix load instruction: ldmatrix").
//
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 computes D (16 x 8, float32) = A (16 x 16)
// B (16 x 8) + C across the 32 lanes of a warp. Each lane holds a fragment: A as 4 .b32 registers of two
// 16-bit elements each (a0..a7, the lower-indexed element in the low half), B as 2 (b0..b3), C and D as 4
// floats (c0..c3). With g = lane >> 2 (groupID) and t = lane % 4 (threadID_in_group), element i is at
//     A:    row g + 8 [i in {2,3,6,7}],     col 2t + (i & 1) + 8 [i >= 4]
//     B:    row (k) 2t + (i & 1) + 8 [i >= 2],                col (n) g
//     C, D: row g + 8 [i >= 2],             col 2t + (i & 1)
// These functions are those maps; the harness's mma gathers and scatters through them.
FL_HD int mma_a_row(int lane, int i) { return (lane >> 2) + 8 * ((i >> 1) & 1); }
FL_HD int mma_a_col(int lane, int i) { return 2 * (lane & 3) + (i & 1) + 8 * (i >> 2); }
FL_HD int mma_b_row(int lane, int i) { return 2 * (lane & 3) + (i & 1) + 8 * (i >> 1); }
FL_HD int mma_b_col(int lane, int) { return lane >> 2; }
FL_HD int mma_c_row(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }
FL_HD int mma_c_col(int lane, int i) { return 2 * (lane & 3) + (i & 1); }

// One lane's operands of an mma phase: A (4 registers), B (2), and the accumulator (4 floats), which the
// phase updates in place (D = A B + C with D and C the same registers, the only form the kernels use).
struct Mma {
  const uint32_t* a;
  const uint32_t* b;
  float* c;
};

// One lane's part of an ldmatrix phase: the shared-memory address of the 16-byte row it supplies (lane
// 8 j + r gives row r of matrix j; lanes from 8 X on are not read, as on the device) and where its X
// registers go (register j holds its two elements of matrix j).
struct Ldm {
  const void* row;
  uint32_t* dst;
};

// Two floats rounded to T (half or bfloat16) as one .b32 register: lo in the low 16 bits. Turns two C/D
// elements (c0, c1 or c2, c3) into an A register: the accumulator of two adjacent 16 x 8 tiles is the A
// operand of a 16 x 16 one (the P V step of attention, without a trip through shared memory).
template <class T>
FL_HD uint32_t pack2(float lo, float hi);

#if defined(__CUDACC__)
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &h, 4);
  return u;
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &h, 4);
  return u;
}

// The instructions themselves (one lane's view; every lane of the warp must execute them together).
template <class T>
__device__ __forceinline__ void mma_m16n8k16_sync(const uint32_t* a, const uint32_t* b, float* c) {
  static_assert(sizeof(T) == 2, "mma.m16n8k16 takes half or bfloat16 operands");
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

template <int X, bool TRANS>
__device__ __forceinline__ void ldmatrix_sync(uint32_t* d, const void* row) {
  static_assert(X == 1 || X == 2 || X == 4, "ldmatrix loads 1, 2 or 4 matrices");
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (X == 1 && !TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(d[0]) : "r"(addr));
  } else if constexpr (X == 1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(d[0]) : "r"(addr));
  } else if constexpr (X == 2 && !TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(d[0]), "=r"(d[1]) : "r"(addr));
  } else if constexpr (X == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(d[0]), "=r"(d[1]) : "r"(addr));
  } else if constexpr (!TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3]) : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3]) : "r"(addr));
  }
}
#else
template <>
inline uint32_t pack2<half>(float lo, float hi) {
  return uint32_t(from_float<half>(lo).bits) | (uint32_t(from_float<half>(hi).bits) << 16);
}
template <>
inline uint32_t pack2<bfloat16>(float lo, float hi) {
  return uint32_t(from_float<bfloat16>(lo).bits) | (uint32_t(from_float<bfloat16>(hi).bits) << 16);
}

// Element `hi` (0: low 16 bits, 1: high) of a .b32 register holding two T.
template <class T>
inline float reg_elem(uint32_t reg, int hi) {
  T v;
  v.bits = uint16_t(hi ? reg >> 16 : reg & 0xffffu);
  return to_float(v);
}

// D = A B + C for one warp's gathered operands (row-major float arrays), as the harness computes it: the
// products of two half / bfloat16 values are exact in double, their sum with C is formed in double
// (left to right over k, then + C) and rounded once to float32. The device's order and internal rounding
// inside one mma are unspecified (see csrc/README.md); this is the exactly rounded result up to the
// double sum's own error (~2^-50 relative to the sum of |terms|).
inline void mma_m16n8k16_ref(const float (&A)[16][16], const float (&B)[16][8], float (&C)[16][8]) {
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      double acc = 0.0;
      for (int k = 0; k < 16; ++k) acc += double(A[i][k]) * double(B[k][j]);
      C[i][j] = float(acc + double(C[i][j]));
    }
}

// One warp's mma: gather A, B, C from the 32 lanes through the maps above, multiply, scatter D. Out of
// line (one copy per T, not one per call site): keeps the harness's compile time down.
template <class T>
[[gnu::noinline]] void warp_mma_m16n8k16(const Mma (&m)[kWarpSize]) {
  float A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < kWarpSize; ++l) {
    for (int i = 0; i < 8; ++i) A[mma_a_row(l, i)][mma_a_col(l, i)] = reg_elem<T>(m[l].a[i >> 1], i & 1);
    for (int i = 0; i < 4; ++i) {
      B[mma_b_row(l, i)][mma_b_col(l, i)] = reg_elem<T>(m[l].b[i >> 1], i & 1);
      C[mma_c_row(l, i)][mma_c_col(l, i)] = m[l].c[i];
    }
  }
  mma_m16n8k16_ref(A, B, C);
  for (int l = 0; l < kWarpSize; ++l)
    for (int i = 0; i < 4; ++i) m[l].c[i] = C[mma_c_row(l, i)][mma_c_col(l, i)];
}

// One warp's ldmatrix of x matrices (rows already checked): lane l receives in register j the elements
// (l / 4, 2 (l % 4) + {0, 1}) of matrix j, or with trans those of its transpose, (2 (l % 4) + {0, 1}, l / 4).
[[gnu::noinline]] inline void warp_ldmatrix(const Ldm (&m)[kWarpSize], int x, bool trans) {
  uint16_t rows[4][8][8];
  for (int j = 0; j < x; ++j)
    for (int r = 0; r < 8; ++r) memcpy(rows[j][r], m[8 * j + r].row, 16);
  for (int l = 0; l < kWarpSize; ++l) {
    const int g = l >> 2, t = l & 3;
    for (int j = 0; j < x; ++j) {
      const uint16_t lo = trans ? rows[j][2 * t][g] : rows[j][g][2 * t];
      const uint16_t hi = trans ? rows[j][2 * t + 1][g] : rows[j][g][2 * t + 1];
      m[l].dst[j] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
  }
}
#endif

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
  template <class U>
  __device__ __forceinline__ U* shared_as() { return reinterpret_cast<U*>(smem); }

  // Warp-collective phases: every thread of the block takes part (its warp executes the instruction).
  template <class T, class F>
  __device__ __forceinline__ void mma_m16n8k16(F&& sel) {
    const Mma m = sel(static_cast<const Ctx&>(ctx), st);
    mma_m16n8k16_sync<T>(m.a, m.b, m.c);
  }
  template <int X, bool TRANS, class F>
  __device__ __forceinline__ void ldmatrix(F&& sel) {
    const Ldm l = sel(static_cast<const Ctx&>(ctx), st);
    ldmatrix_sync<X, TRANS>(l.dst, l.row);
  }
  // N floats of each lane reduced (max or sum) over its quad, the 4 lanes 4 g .. 4 g + 3 that hold one
  // row of an mma C fragment: a butterfly over lane bits 0 and 1 (shfl_xor 1, then 2).
  template <int N, bool MAX, class F>
  __device__ __forceinline__ void quad_reduce(F&& sel) {
    float* v = sel(static_cast<const Ctx&>(ctx), st);
#pragma unroll
    for (int k = 0; k < N; ++k)
#pragma unroll
      for (int offset = 1; offset <= 2; offset <<= 1) {
        const float o = __shfl_xor_sync(0xffffffffu, v[k], offset);
        v[k] = MAX ? fmaxf(v[k], o) : v[k] + o;
      }
  }

  // Per-thread asynchronous copies (inside an each() phase): 16 bytes global -> shared, bypassing L1
  // (cp.async.cg); with valid == false the 16 bytes are zero-filled and nothing is read (src must still be
  // an aligned address). A thread's copies are visible to it after cp_async_wait<N>() leaves at most N of
  // its committed groups pending; to the other threads only after a barrier that follows that wait.
  __device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid = true) {
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(src), "r"(valid ? 16 : 0));
  }
  __device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
  template <int N>
  __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

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

// Shared memory a kernel uses: up to 40 KB as a static array, more as dynamic shared memory (the 48 KB
// static limit; sm_80 allows 163 KB a block, sm_90 227 KB, when the launch opts in). The per-architecture
// limit is a compile-time check here, so the nvcc gate (tests/test_cuda_nvcc.py) fails on a tile too big.
template <class K>
constexpr int smem_bytes() { return K::kSmemFloats > 0 ? int(K::kSmemFloats * sizeof(float)) : 0; }
template <class K>
constexpr bool dynamic_smem() { return smem_bytes<K>() > 40 * 1024; }

template <class K>
__global__ void __launch_bounds__(K::kMaxThreads) simt_kernel(const typename K::Params p) {
#if defined(__CUDA_ARCH__)
  static_assert(smem_bytes<K>() + 256 <= (__CUDA_ARCH__ >= 900 ? 232448 : __CUDA_ARCH__ >= 800 ? 166912 : 49152),
                "the kernel's shared memory exceeds this architecture's per-block limit");
#endif
  __shared__ float red[2 * 32];
  Block<typename K::State> b;
  if constexpr (dynamic_smem<K>()) {
    extern __shared__ __align__(16) float dynamic_smem_floats[];
    b.smem = dynamic_smem_floats;
  } else {
    __shared__ __align__(16) float smem[K::kSmemFloats > 0 ? K::kSmemFloats : 1];
    b.smem = smem;
  }
  b.ctx = Ctx{int(threadIdx.x), int(blockDim.x), int(blockIdx.x), int(blockIdx.y), int(gridDim.x), int(gridDim.y)};
  b.red = red;
  K::body(b, p);
}

// Launch kernel K on a (gx, gy) grid of blocks of `threads` threads (a multiple of 32, <= K::kMaxThreads;
// gy <= 65535). A kernel needing more shared memory than this GPU gives a block (sm_86 / sm_89 / sm_120:
// 99 KB, where sm_80 has 163 KB) throws, naming both sizes, instead of failing the launch obscurely.
template <class K>
void launch(int gx, int gy, int threads, const typename K::Params& p, Stream stream) {
  if (gx == 0 || gy == 0) return;
  if constexpr (dynamic_smem<K>()) {
    int device = 0, optin = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    const int need = smem_bytes<K>() + 2 * 32 * int(sizeof(float));  // + the static reduction slots
    if (need > optin)
      throw std::runtime_error("fusedlm: this kernel needs " + std::to_string(need) +
                               " bytes of shared memory a block, the GPU allows " + std::to_string(optin) +
                               " (use backend='triton')");
    const cudaError_t set = cudaFuncSetAttribute(simt_kernel<K>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 smem_bytes<K>());
    if (set != cudaSuccess)
      throw std::runtime_error(std::string("fusedlm: cudaFuncSetAttribute(max dynamic shared memory) failed: ") +
                               cudaGetErrorString(set));
    simt_kernel<K><<<dim3(gx, gy), threads, smem_bytes<K>(), stream>>>(p);
  } else {
    simt_kernel<K><<<dim3(gx, gy), threads, 0, stream>>>(p);
  }
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

// cp.async on the host: a copy reads its source when issued and lands in shared memory only when a
// cp_async_wait of the issuing thread retires its group, so reading a tile before the wait sees the NaN
// poison (the device would read stale or partial data): the harness catches a missing wait. (Outside Block:
// one set of container instantiations for all kernels, which keeps the harness's compile time down.)
struct CopyJob {
  unsigned char* dst;
  unsigned char data[16];
};
struct CopyQueue {
  std::vector<CopyJob> open;                 // issued since the last commit
  std::vector<std::vector<CopyJob>> groups;  // committed, oldest first
};

template <class State>
struct Block {
  Ctx ctx;
  std::vector<State> threads;
  std::vector<float> smem;  // 16-byte aligned (operator new); filled with 0xff bytes (NaN) per block

  std::vector<CopyQueue> copies;  // per thread (see CopyQueue)
  int cur = 0;                    // the thread each() is running

  template <class F>
  void each(F&& f) {
    Ctx c = ctx;
    for (c.tid = 0; c.tid < ctx.nthreads; ++c.tid) {
      cur = c.tid;
      f(static_cast<const Ctx&>(c), threads[c.tid]);
    }
  }
  void sync() {}  // each() has run every thread to this point already
  float* shared() { return smem.data(); }
  template <class U>
  U* shared_as() { return reinterpret_cast<U*>(smem.data()); }

  // What faults (or is undefined) on the device is an error here: out-of-range or misaligned accesses
  // of the tensor-core primitives throw (a RuntimeError in Python).
  void check_shared(const void* p, size_t n, const char* what) const {
    const auto* lo = reinterpret_cast<const unsigned char*>(smem.data());
    const auto* q = static_cast<const unsigned char*>(p);
    if (q < lo || q + n > lo + smem.size() * sizeof(float))
      throw std::runtime_error(std::string("fusedlm harness: ") + what + " outside the block's shared memory");
  }
  static void check_aligned16(const void* p, const char* what) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
      throw std::runtime_error(std::string("fusedlm harness: ") + what + " is not 16-byte aligned");
  }

  // The 32 lanes of each warp together: gather A, B, C through the PTX maps, multiply, scatter D.
  template <class T, class F>
  void mma_m16n8k16(F&& sel) {
    static_assert(sizeof(T) == 2, "mma.m16n8k16 takes half or bfloat16 operands");
    Ctx c = ctx;
    for (int w = 0; w < ctx.nthreads / kWarpSize; ++w) {
      Mma m[kWarpSize];
      for (int l = 0; l < kWarpSize; ++l) {
        c.tid = w * kWarpSize + l;
        m[l] = sel(static_cast<const Ctx&>(c), threads[c.tid]);
      }
      warp_mma_m16n8k16<T>(m);
    }
  }

  // ldmatrix: lane 8 j + r supplies row r of matrix j (16 bytes of shared memory, 16-byte aligned); lane l
  // receives in register j the elements (l / 4, 2 (l % 4) + {0, 1}) of matrix j, or with TRANS those of
  // its transpose: (2 (l % 4) + {0, 1}, l / 4).
  template <int X, bool TRANS, class F>
  void ldmatrix(F&& sel) {
    static_assert(X == 1 || X == 2 || X == 4, "ldmatrix loads 1, 2 or 4 matrices");
    Ctx c = ctx;
    for (int w = 0; w < ctx.nthreads / kWarpSize; ++w) {
      Ldm m[kWarpSize];
      for (int l = 0; l < kWarpSize; ++l) {
        c.tid = w * kWarpSize + l;
        m[l] = sel(static_cast<const Ctx&>(c), threads[c.tid]);
      }
      for (int j = 0; j < X; ++j)
        for (int r = 0; r < 8; ++r) {
          check_aligned16(m[8 * j + r].row, "ldmatrix row address");
          check_shared(m[8 * j + r].row, 16, "ldmatrix row");
        }
      warp_ldmatrix(m, X, TRANS);
    }
  }

  // The quad butterfly of the device (shfl_xor 1, then 2), replayed lane by lane in the same order.
  template <int N, bool MAX, class F>
  void quad_reduce(F&& sel) {
    Ctx c = ctx;
    for (int w = 0; w < ctx.nthreads / kWarpSize; ++w) {
      float* v[kWarpSize];
      for (int l = 0; l < kWarpSize; ++l) {
        c.tid = w * kWarpSize + l;
        v[l] = sel(static_cast<const Ctx&>(c), threads[c.tid]);
      }
      for (int k = 0; k < N; ++k)
        for (int offset = 1; offset <= 2; offset <<= 1) {
          float next[kWarpSize];
          for (int l = 0; l < kWarpSize; ++l)
            next[l] = MAX ? std::fmax(v[l][k], v[l ^ offset][k]) : v[l][k] + v[l ^ offset][k];
          for (int l = 0; l < kWarpSize; ++l) v[l][k] = next[l];
        }
    }
  }

  void cp_async16(void* dst, const void* src, bool valid = true) {
    check_aligned16(dst, "cp.async destination");
    check_aligned16(src, "cp.async source");
    check_shared(dst, 16, "cp.async destination");
    CopyJob job;
    job.dst = static_cast<unsigned char*>(dst);
    if (valid) memcpy(job.data, src, 16);
    else memset(job.data, 0, 16);
    copies[cur].open.push_back(job);
  }
  void cp_async_commit() {
    CopyQueue& q = copies[cur];
    q.groups.push_back(std::move(q.open));
    q.open.clear();
  }
  template <int N>
  void cp_async_wait() {
    CopyQueue& q = copies[cur];
    while (int(q.groups.size()) > N) {
      for (const CopyJob& job : q.groups.front()) memcpy(job.dst, job.data, 16);
      q.groups.erase(q.groups.begin());
    }
  }

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
      memset(b.smem.data(), 0xff, b.smem.size() * sizeof(float));  // so does shared memory: NaN poison
      b.copies.assign(threads, {});
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

// The same for the tensor-core kernels, which take float16 and bfloat16 only (the bindings refuse float32).
#define FL_DISPATCH_HALF(dtype, T, ...)                                        \
  do {                                                                         \
    if ((dtype) == ::fl::DType::F16) { using T = ::fl::half; __VA_ARGS__; }    \
    else { using T = ::fl::bfloat16; __VA_ARGS__; }                            \
  } while (0)

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
