// The training step's elementwise work around the matmuls, fused (recompute.Kernels; lmforge/kernels builds this).
//
// Why written here: on SmolLM2-135M at 8 x 512 tokens (bf16, 2 threads, the AMX kind) torch's ops run an RMSNorm's
// forward and backward as ~14 passes over (tokens x 576) float32 copies, ~20 ms a norm and 61 norms a step, and the
// SwiGLU backward as five passes over (tokens x 1536): together about a fifth of the step. Each function below reads
// its inputs once and writes its outputs once. Inductor fuses them as well (lmforge compiled them with it until
// 2026-12-07), but its warm start costs ~2.5 s of every run's first step (Dynamo tracing and the cache lookups of five
// functions); this library loads in milliseconds once built. (Inductor's loops ran 15-25% faster on the SwiGLU ones,
// 4096 x 1536 on the AMX kind: 1-2% of a step, against ~2.5 s once per run.)
//
// The arithmetic is the torch ops' (recompute.py's _norm, _norm_grad_x, _norm_grad_w, _swiglu, _swiglu_grads):
// float32 inside, the values rounded to bf16 where the torch ops make a bf16 tensor. Sums run in another order (16
// lanes, then a tree), exp is a polynomial (about 1 ulp, lmforge/kernels/vec.h) and SiLU multiplies by the sigmoid
// where torch divides, so a bf16 result may differ from the ops' in its last bit (tested). The norm weight's gradient
// sums fixed blocks of rows in a fixed order: the same bits for any number of threads.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "vec.h"

namespace {

using namespace lmforge;
using bf16 = c10::BFloat16;

constexpr int64_t BLOCK = 64;  // rows per partial sum of the norm weight's gradient

void check_rows(const at::Tensor& t, int64_t C, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.dim() == 2 && t.size(1) == C && t.stride(1) == 1,
              name, ": bf16 rows (N, ", C, ") with the last dim contiguous");
}

void check_weight(const at::Tensor& w, int64_t C) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.numel() == C, "rms_norm: a bf16 weight of ", C);
}

// x * rstd rounded to bf16, 16 lanes from i (n of them)
inline f16v normed(const bf16* x, int64_t i, int64_t n, float rstd) { return round_lanes(load_n(x + i, n) * rstd, bf16()); }

// rms_norm: out = bf16(weight * bf16(x * rstd)), rstd = 1 / sqrt(mean(x^2) + eps) in float32 per row
std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t N = x.size(0), C = x.size(1);
  check_rows(x, C, "rms_norm x");
  check_weight(weight, C);
  at::Tensor out = at::empty({N, C}, x.options());
  at::Tensor rstd = at::empty({N, 1}, x.options().dtype(at::kFloat));
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* wp = weight.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  float* rp = rstd.data_ptr<float>();
  const int64_t xs = x.stride(0);
  at::parallel_for(0, N, 16, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const bf16* xr = xp + r * xs;
      f16v ss = {};
      for (int64_t i = 0; i < C; i += 16) {
        const f16v v = load_n(xr + i, std::min<int64_t>(16, C - i));
        ss += v * v;
      }
      const float inv = 1.f / std::sqrt(hsum(ss) / float(C) + float(eps));
      rp[r] = inv;
      for (int64_t i = 0; i < C; i += 16) {
        const int64_t n = std::min<int64_t>(16, C - i);
        store_n(op + r * C + i, load_n(wp + i, n) * normed(xr, i, n, inv), n);
      }
    }
  });
  return {out, rstd};
}

// rms_norm's out again from x and the rstd it kept (the backward remakes a norm output the next linears saved)
at::Tensor rms_norm_output(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rstd) {
  const int64_t N = x.size(0), C = x.size(1);
  check_rows(x, C, "rms_norm_output x");
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == N && rstd.is_contiguous(), "rms_norm_output rstd");
  check_weight(weight, C);
  at::Tensor out = at::empty({N, C}, x.options());
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* wp = weight.data_ptr<bf16>();
  const float* rp = rstd.data_ptr<float>();
  bf16* op = out.data_ptr<bf16>();
  const int64_t xs = x.stride(0);
  at::parallel_for(0, N, 16, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t i = 0; i < C; i += 16) {
        const int64_t n = std::min<int64_t>(16, C - i);
        store_n(op + r * C + i, load_n(wp + i, n) * normed(xp + r * xs, i, n, rp[r]), n);
      }
  });
  return out;
}

// rms_norm's backward for grad (N, C), as recompute._norm_grad_x and _norm_grad_w:
//   g = bf16(grad * weight); grad_x = bf16((g - x * (rstd * rstd * mean(g * x))) * rstd)
//   grad_w = bf16(sum over rows of bf16(grad * bf16(x * rstd)))
// Each output only when asked for (an undefined tensor otherwise).
std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad, const at::Tensor& x,
                                                     const at::Tensor& weight, const at::Tensor& rstd, bool need_x,
                                                     bool need_w) {
  const int64_t N = x.size(0), C = x.size(1);
  check_rows(x, C, "rms_norm_backward x");
  check_rows(grad, C, "rms_norm_backward grad");
  TORCH_CHECK(grad.size(0) == N && rstd.scalar_type() == at::kFloat && rstd.numel() == N && rstd.is_contiguous(),
              "rms_norm_backward: grad (N, C) and rstd (N, 1) float32");
  check_weight(weight, C);
  at::Tensor grad_x = need_x ? at::empty({N, C}, x.options()) : at::Tensor();
  const int64_t blocks = (N + BLOCK - 1) / BLOCK;
  std::vector<float> partial(need_w ? blocks * C : 0);
  float* pp = partial.data();
  const bf16* gp = grad.data_ptr<bf16>();
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* wp = weight.data_ptr<bf16>();
  const float* rp = rstd.data_ptr<float>();
  bf16* dxp = need_x ? grad_x.data_ptr<bf16>() : nullptr;
  const int64_t gs = grad.stride(0), xs = x.stride(0);
  at::parallel_for(0, blocks, 1, [=](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      float* part = need_w ? pp + b * C : nullptr;
      if (part) std::fill(part, part + C, 0.f);
      for (int64_t r = b * BLOCK; r < std::min(N, (b + 1) * BLOCK); ++r) {
        const bf16* gr = gp + r * gs;
        const bf16* xr = xp + r * xs;
        const float inv = rp[r];
        if (part)
          for (int64_t i = 0; i < C; i += 16) {
            const int64_t n = std::min<int64_t>(16, C - i);
            const f16v prod = round_lanes(load_n(gr + i, n) * normed(xr, i, n, inv), bf16());
            store_n(part + i, load_n(part + i, n) + prod, n);
          }
        if (!dxp) continue;
        f16v dot = {};
        for (int64_t i = 0; i < C; i += 16) {
          const int64_t n = std::min<int64_t>(16, C - i);
          dot += round_lanes(load_n(gr + i, n) * load_n(wp + i, n), bf16()) * load_n(xr + i, n);
        }
        const float k = inv * inv * (hsum(dot) / float(C));
        for (int64_t i = 0; i < C; i += 16) {
          const int64_t n = std::min<int64_t>(16, C - i);
          const f16v g = round_lanes(load_n(gr + i, n) * load_n(wp + i, n), bf16());
          store_n(dxp + r * C + i, (g - load_n(xr + i, n) * k) * inv, n);
        }
      }
    }
  });
  at::Tensor grad_w;
  if (need_w) {
    grad_w = at::empty({C}, x.options());
    bf16* dwp = grad_w.data_ptr<bf16>();
    for (int64_t i = 0; i < C; i += 16) {
      const int64_t n = std::min<int64_t>(16, C - i);
      f16v s = {};
      for (int64_t b = 0; b < blocks; ++b) s += load_n(partial.data() + b * C + i, n);
      store_n(dwp + i, s, n);
    }
  }
  return {grad_x, grad_w};
}

// silu(gate) = gate * s rounded to bf16, as torch's silu on a bf16 tensor, from s = sigmoid(gate) (torch divides
// gate by 1 + exp(-gate): the same up to a float32 ulp; the backward needs s, so one division serves both)
inline f16v sigmoid(f16v g) { return 1.f / (1.f + vexp(-g)); }
inline f16v silu(f16v g, f16v s) { return round_lanes(g * s, bf16()); }

// swiglu: bf16(bf16(silu(gate)) * up); gate and up (N, I), rows may be strided (halves of one projection)
at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up) {
  const int64_t N = gate.size(0), I = gate.size(1);
  check_rows(gate, I, "swiglu gate");
  check_rows(up, I, "swiglu up");
  at::Tensor out = at::empty({N, I}, gate.options());
  const bf16* gp = gate.data_ptr<bf16>();
  const bf16* up_ = up.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  const int64_t gs = gate.stride(0), us = up.stride(0);
  at::parallel_for(0, N, 8, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t i = 0; i < I; i += 16) {
        const int64_t n = std::min<int64_t>(16, I - i);
        const f16v g = load_n(gp + r * gs + i, n);
        store_n(op + r * I + i, silu(g, sigmoid(g)) * load_n(up_ + r * us + i, n), n);
      }
  });
  return out;
}

// swiglu's backward for grad_h (N, I), as recompute._swiglu_grads(_and_product):
//   grad_gate = bf16(bf16(grad_h * up) * s * (1 + gate * (1 - s))), s = sigmoid(gate) (torch's silu_backward)
//   grad_up = bf16(grad_h * bf16(silu(gate))); with product, also swiglu's output bf16(bf16(silu(gate)) * up)
std::tuple<at::Tensor, at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& grad_h, const at::Tensor& gate,
                                                               const at::Tensor& up, bool product) {
  const int64_t N = gate.size(0), I = gate.size(1);
  check_rows(grad_h, I, "swiglu_backward grad_h");
  check_rows(gate, I, "swiglu_backward gate");
  check_rows(up, I, "swiglu_backward up");
  at::Tensor grad_gate = at::empty({N, I}, gate.options()), grad_up = at::empty({N, I}, gate.options());
  at::Tensor h = product ? at::empty({N, I}, gate.options()) : at::Tensor();
  const bf16* dp = grad_h.data_ptr<bf16>();
  const bf16* gp = gate.data_ptr<bf16>();
  const bf16* up_ = up.data_ptr<bf16>();
  bf16* dgp = grad_gate.data_ptr<bf16>();
  bf16* dup = grad_up.data_ptr<bf16>();
  bf16* hp = product ? h.data_ptr<bf16>() : nullptr;
  const int64_t ds = grad_h.stride(0), gs = gate.stride(0), us = up.stride(0);
  at::parallel_for(0, N, 8, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t i = 0; i < I; i += 16) {
        const int64_t n = std::min<int64_t>(16, I - i);
        const f16v d = load_n(dp + r * ds + i, n), g = load_n(gp + r * gs + i, n), u = load_n(up_ + r * us + i, n);
        const f16v s = sigmoid(g), act = silu(g, s);
        store_n(dgp + r * I + i, round_lanes(d * u, bf16()) * (s * (1.f + g * (1.f - s))), n);
        store_n(dup + r * I + i, d * act, n);
        if (hp) store_n(hp + r * I + i, act * u, n);
      }
  });
  return {grad_gate, grad_up, h};
}

}  // namespace

TORCH_LIBRARY(lmforge_train, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)", &rms_norm);
  m.def("rms_norm_output(Tensor x, Tensor weight, Tensor rstd) -> Tensor", &rms_norm_output);
  m.def("rms_norm_backward(Tensor grad, Tensor x, Tensor weight, Tensor rstd, bool need_x, bool need_w) "
        "-> (Tensor, Tensor)", &rms_norm_backward);
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor", &swiglu);
  m.def("swiglu_backward(Tensor grad_h, Tensor gate, Tensor up, bool product) -> (Tensor, Tensor, Tensor)",
        &swiglu_backward);
}
