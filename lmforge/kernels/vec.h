// lmforge's C++ kernels' shared pieces (lmforge/kernels/__init__.py builds each source with this directory on the
// include path): 16-lane float32 vectors in GCC's vector extensions, loads and stores of float32 and bf16 (AVX-512
// intrinsics for the bf16 widening where the compiler has them), sums, exp, and rounding to the model dtype.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace lmforge {

typedef float f16v __attribute__((vector_size(64)));
typedef uint32_t u16v __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));
typedef uint16_t h16v __attribute__((vector_size(32)));
typedef float f8v __attribute__((vector_size(32)));
typedef float f4v __attribute__((vector_size(16)));

inline f16v load16(const float* p) { f16v v; std::memcpy(&v, p, 64); return v; }
inline f16v load16(const c10::BFloat16* p) {
#ifdef __AVX512F__
  return (f16v)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16);
#else
  h16v h; std::memcpy(&h, p, 32);
  return (f16v)(__builtin_convertvector(h, u16v) << 16);
#endif
}
inline void store16(float* p, f16v v) { std::memcpy(p, &v, 64); }
// rounded to nearest even, as torch's casts; NaN stays NaN
inline void store16(c10::BFloat16* p, f16v v) {
  const u16v u = (u16v)v;
  const u16v rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const h16v h = __builtin_convertvector(v != v ? u16v{} + 0x7FC0u : rounded, h16v);
  std::memcpy(p, &h, 32);
}

inline float hsum(f16v v) {
  f8v a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
          __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  f4v b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// lane j of the result = the sum of v[j]'s lanes: a transposing tree, 15 shuffle pairs for 16 sums
inline f16v sums16(const f16v* v) {
  f16v w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i)
    w[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    x[i] = __builtin_shufflevector(w[2 * i], w[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(w[2 * i], w[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    y[i] = __builtin_shufflevector(x[2 * i], x[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(x[2 * i], x[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(y[0], y[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(y[0], y[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// exp over 16 lanes (Cephes' expf: reduction by ln 2, degree-6 polynomial, about 1 ulp); 0 below -87.3 and at -inf.
// Inline: SLEEF's expf (torch's) is a call, which spills the caller's vectors (the decode loop ran ~2% slower on it)
inline f16v vexp(f16v x) {
  const i16v tiny = x < -87.3f;
  x = tiny ? f16v{} - 87.3f : x;
  f16v fx = x * 1.44269504088896341f + 0.5f;
#ifdef __AVX512F__
  fx = (f16v)_mm512_roundscale_ps((__m512)fx, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);  // floor, one instruction
  const i16v n = __builtin_convertvector(fx, i16v);
#else
  i16v n = __builtin_convertvector(fx, i16v);
  n -= (__builtin_convertvector(n, f16v) > fx) ? 1 : 0;  // floor
  fx = __builtin_convertvector(n, f16v);
#endif
  x = x - fx * 0.693359375f - fx * -2.12194440e-4f;
  f16v y = 1.9875691500E-4f * x + 1.3981999507E-3f;
  y = y * x + 8.3334519073E-3f;
  y = y * x + 4.1665795894E-2f;
  y = y * x + 1.6666665459E-1f;
  y = y * x + 5.0000001201E-1f;
  y = y * x * x + x + 1.0f;
  y = (f16v)((i16v)y + (n << 23));
  return (f16v)((i16v)y & ~tiny);
}

// rounded to the model dtype and widened back (bf16: to nearest even, as c10::BFloat16 for finite values)
inline f16v round_lanes(f16v x, float) { return x; }
inline f16v round_lanes(f16v x, c10::BFloat16) {
  u16v u = (u16v)x;
  return (f16v)((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u);
}

// up to 16 values from p (n of them; the rest 0), widened to float32
template <typename T>
inline f16v load_n(const T* p, int64_t n) {
  if (n == 16) return load16(p);
  alignas(64) float f[16] = {};
  for (int64_t i = 0; i < n; ++i) f[i] = float(p[i]);
  return load16(f);
}
template <typename T>
inline void store_n(T* p, f16v v, int64_t n) {
  if (n == 16) return store16(p, v);
  alignas(64) float f[16];
  store16(f, v);
  for (int64_t i = 0; i < n; ++i) p[i] = T(f[i]);
}

// v, which the compiler may not fuse into the next op: a product then a sum stay two roundings (in float32 GCC would
// contract them into one fused multiply-add, which torch's separate ops do not do)
inline f16v opaque(f16v v) {
  asm("" : "+m"(v));
  return v;
}

}  // namespace lmforge
