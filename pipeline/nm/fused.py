"""The soft 2:4 mask in one pass over each weight on the CPU: Gumbel transform, softmax over the six
candidates, the floor, the candidate product and W ⊙ M forward; the regulariser, the candidate product's
transpose and the softmax's backward in one pass back. What `learn._SoftMaskedWeight` does in ~13 whole-
tensor passes (and reductions over a last dimension of 6, which ATen runs row by row), here a C++ loop
over tiles of 16 groups that the compiler vectorises across groups (glibc's vector exp/log). A tile is
held candidate-major; with AVX-512, a full tile's transposes to and from the tensors' group-major layout
are register permutes (the scalar copies they replace were a third of the forward's time).

The noise is drawn inside the kernel, counter-based: the uniform of element i (group g, candidate c: i =
6g + c) of a layer is SplitMix64's (i+1)-th output from the state SplitMix64(seed), its top 24 bits as
(n + 0.5)/2^24. A function of (seed, i) alone, as `learn.gumbel_noise`'s torch draw is of the seed: the same
for a resumed run, every data-parallel rank and an activation-checkpointing recomputation, and drawn in
parallel without a pass through memory. It is another draw than torch's for the same seed (same
distribution; the closure curves in docs/RESULTS.md are re-run with it). `uniforms` returns the same
numbers as a tensor. The arithmetic after the draw is `learn`'s, in the same order, with vector exp/log in
place of ATen's: from the same uniforms, results equal the whole-tensor path within float32 rounding
(tests/test_soft_mask.py).

Built on first use with `torch.utils.cpp_extension.load_inline` (a C++ compiler; cached under
~/.cache/torch_extensions). Where it cannot be built, or off the CPU, or for another pattern than 2:4
with one logit per candidate, `learn` keeps its whole-tensor path: `available()` says which.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("maskpipe")

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>

namespace {
constexpr int C = 6, M = 4, T = 16;  // 2:4: six candidates of four positions; a tile of T groups
constexpr uint64_t GAMMA = 0x9E3779B97F4A7C15ULL;

inline uint64_t mix(uint64_t z) {  // SplitMix64's output function
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

inline float uniform(uint64_t key, uint64_t i) {  // in (0, 1): the top 24 bits, centred in their bin
  return ((float)(mix(key + (i + 1) * GAMMA) >> 40) + 0.5f) * 5.9604644775390625e-8f;
}
// The candidates in encoding.candidates' rank order (nm_candidates(2, 4)); checked against it in Python.
constexpr float CAND[C][M] = {{1, 1, 0, 0}, {1, 0, 1, 0}, {1, 0, 0, 1}, {0, 1, 1, 0}, {0, 1, 0, 1}, {0, 0, 1, 1}};

#ifdef __AVX512F__
#include <immintrin.h>
// A full tile's transposes in registers: a vector of 16 floats of one layout takes its lanes from a pair of
// vectors of the other (permutex2var, one index vector for every pair) and picks the pair by lane (blend).
// Scalar transposes were a third of the forward's time (2026-12-04 profile); these tables are built once.
struct Transposes {
  __m512i in_idx[C], p_idx[C], out_idx[M];
  __mmask16 in_pair[C][2], p_pair[C][2], out_pair[M];
  Transposes() {
    alignas(64) int idx[T];
    for (int c = 0; c < C; ++c) {  // lg[c][t] = l[f], f = 6t + c: lane f % 32 of the vector pair f / 32
      in_pair[c][0] = in_pair[c][1] = 0;
      for (int t = 0; t < T; ++t) {
        int f = t * C + c;
        idx[t] = f % 32;
        if (f / 32) in_pair[c][f / 32 - 1] |= 1 << t;
      }
      in_idx[c] = _mm512_load_si512(idx);
    }
    for (int k = 0; k < C; ++k) {  // p[f] = s[c][t], f = 16k + i = 6t + c: lane t of s[c], from the pair c / 2
      p_pair[k][0] = p_pair[k][1] = 0;
      for (int i = 0; i < T; ++i) {
        int f = 16 * k + i, t = f / C, c = f % C;
        idx[i] = c % 2 * 16 + t;
        if (c / 2) p_pair[k][c / 2 - 1] |= 1 << i;
      }
      p_idx[k] = _mm512_load_si512(idx);
    }
    for (int k = 0; k < M; ++k) {  // m[f] = mj[j][t], f = 16k + i = 4t + j: from the pair j / 2
      out_pair[k] = 0;
      for (int i = 0; i < T; ++i) {
        int f = 16 * k + i, t = f / M, j = f % M;
        idx[i] = j % 2 * 16 + t;
        if (j / 2) out_pair[k] |= 1 << i;
      }
      out_idx[k] = _mm512_load_si512(idx);
    }
  }
};
const Transposes TR;

inline __m512 pick3(const __m512* v, __m512i idx, const __mmask16* pair) {  // from 6 vectors
  __m512 r = _mm512_permutex2var_ps(v[0], idx, v[1]);
  r = _mm512_mask_blend_ps(pair[0], r, _mm512_permutex2var_ps(v[2], idx, v[3]));
  return _mm512_mask_blend_ps(pair[1], r, _mm512_permutex2var_ps(v[4], idx, v[5]));
}
#endif

void forward_tile(const float* l, uint64_t key, uint64_t g0, const float* w, float* p, float* out, int64_t n,
                  float tau, float kappa, float exp_floor, float below_floor) {
  // candidate-major tile, s[c][t]: every inner loop runs over the T groups at once
  alignas(64) float s[C][T], lg[C][T], mx[T], tot[T], mj[M][T];
  for (int c = 0; c < C; ++c) {
#pragma omp simd
    for (int t = 0; t < T; ++t) s[c][t] = uniform(key, (g0 + t) * C + c);
  }
#ifdef __AVX512F__
  if (n == T) {
    __m512 v[C];
    for (int k = 0; k < C; ++k) v[k] = _mm512_loadu_ps(l + 16 * k);
    for (int c = 0; c < C; ++c) _mm512_store_ps(lg[c], pick3(v, TR.in_idx[c], TR.in_pair[c]));
  } else
#endif
    for (int t = 0; t < T; ++t)
      for (int c = 0; c < C; ++c) lg[c][t] = t < n ? l[t * C + c] : 0.f;
  for (int c = 0; c < C; ++c) {
#pragma omp simd
    for (int t = 0; t < T; ++t) {  // gumbel_noise: -log(max(-log(max(u, 1e-10)), 1e-10)); then (g + κl)/τ
      float g = -std::log(std::fmax(s[c][t], 1e-10f));
      g = -std::log(std::fmax(g, 1e-10f));
      s[c][t] = (g + lg[c][t] * kappa) / tau;
    }
  }
#pragma omp simd
  for (int t = 0; t < T; ++t) {
    float m = s[0][t];
    for (int c = 1; c < C; ++c) m = std::fmax(m, s[c][t]);
    mx[t] = m;
  }
  for (int c = 0; c < C; ++c) {
#pragma omp simd
    for (int t = 0; t < T; ++t) s[c][t] = std::exp(std::fmax(s[c][t] - mx[t], exp_floor));
  }
#pragma omp simd
  for (int t = 0; t < T; ++t) {
    float a = s[0][t];
    for (int c = 1; c < C; ++c) a += s[c][t];
    tot[t] = a;
  }
  for (int c = 0; c < C; ++c) {
#pragma omp simd
    for (int t = 0; t < T; ++t) {
      float q = s[c][t] / tot[t];
      s[c][t] = q > below_floor ? q : 0.f;
    }
  }
  for (int j = 0; j < M; ++j) {  // the candidate product: M[t][j] = Σ_c p[t][c] CAND[c][j]
#pragma omp simd
    for (int t = 0; t < T; ++t) {
      float m = 0.f;
      for (int c = 0; c < C; ++c) m += s[c][t] * CAND[c][j];
      mj[j][t] = m;
    }
  }
#ifdef __AVX512F__
  if (n == T) {
    __m512 v[C], m[M];
    for (int c = 0; c < C; ++c) v[c] = _mm512_load_ps(s[c]);
    for (int j = 0; j < M; ++j) m[j] = _mm512_load_ps(mj[j]);
    for (int k = 0; k < C; ++k) _mm512_storeu_ps(p + 16 * k, pick3(v, TR.p_idx[k], TR.p_pair[k]));
    for (int k = 0; k < M; ++k) {
      __m512 r = _mm512_permutex2var_ps(m[0], TR.out_idx[k], m[1]);
      r = _mm512_mask_blend_ps(TR.out_pair[k], r, _mm512_permutex2var_ps(m[2], TR.out_idx[k], m[3]));
      _mm512_storeu_ps(out + 16 * k, _mm512_mul_ps(_mm512_loadu_ps(w + 16 * k), r));
    }
    return;
  }
#endif
  for (int64_t t = 0; t < n; ++t) {
    for (int c = 0; c < C; ++c) p[t * C + c] = s[c][t];
    for (int j = 0; j < M; ++j) out[t * M + j] = w[t * M + j] * mj[j][t];
  }
}

void backward_tile(const float* p, const float* g, const float* w, const float* masked, float* gl, int64_t n,
                   float scale, float two_lam) {
  for (int64_t t = 0; t < n; ++t) {
    float gm[M], gp[C], dot = 0.f;
    for (int j = 0; j < M; ++j)
      gm[j] = (masked ? g[t * M + j] - two_lam * masked[t * M + j] : g[t * M + j]) * w[t * M + j];
    for (int c = 0; c < C; ++c) {
      float a = 0.f;
      for (int j = 0; j < M; ++j) a += gm[j] * CAND[c][j];
      gp[c] = a;
      dot += p[t * C + c] * a;
    }
    for (int c = 0; c < C; ++c) gl[t * C + c] = (gp[c] - dot) * p[t * C + c] * scale;
  }
}
}  // namespace

// logits [G, 6], weight [G, 4], the layer's noise seed: returns (probs [G, 6], masked [G, 4])
std::vector<torch::Tensor> forward(torch::Tensor logits, int64_t seed, torch::Tensor weight, double tau,
                                   double kappa, double exp_floor, double below_floor) {
  auto probs = torch::empty_like(logits), out = torch::empty_like(weight);
  const float *l = logits.data_ptr<float>(), *w = weight.data_ptr<float>();
  float *p = probs.data_ptr<float>(), *o = out.data_ptr<float>();
  const uint64_t key = mix((uint64_t)seed);
  const int64_t groups = logits.size(0), tiles = (groups + T - 1) / T;
  at::parallel_for(0, tiles, 256, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      int64_t g0 = i * T, n = std::min<int64_t>(T, groups - g0);
      forward_tile(l + g0 * C, key, (uint64_t)g0, w + g0 * M, p + g0 * C, o + g0 * M, n, (float)tau,
                   (float)kappa, (float)exp_floor, (float)below_floor);
    }
  });
  return {probs, out};
}

// the kernel's uniforms for elements 0..n-1 of a layer's draw
torch::Tensor uniforms(int64_t n, int64_t seed) {
  auto u = torch::empty({n}, torch::kFloat32);
  float* out = u.data_ptr<float>();
  const uint64_t key = mix((uint64_t)seed);
  at::parallel_for(0, n, 1 << 16, [&](int64_t a, int64_t b) {
#pragma omp simd
    for (int64_t i = a; i < b; ++i) out[i] = uniform(key, (uint64_t)i);
  });
  return u;
}

// probs [G, 6]; grad, weight, masked (or an empty tensor) [G, 4]: returns the logits' gradient [G, 6]
torch::Tensor backward(torch::Tensor probs, torch::Tensor grad, torch::Tensor weight, torch::Tensor masked,
                       double tau, double kappa, double lam) {
  auto gl = torch::empty_like(probs);
  const float *p = probs.data_ptr<float>(), *g = grad.data_ptr<float>(), *w = weight.data_ptr<float>();
  const float *mk = masked.numel() ? masked.data_ptr<float>() : nullptr;
  float* out = gl.data_ptr<float>();
  const int64_t groups = probs.size(0);
  const float scale = (float)(kappa / tau), two_lam = (float)(2 * lam);
  at::parallel_for(0, groups, 4096, [&](int64_t a, int64_t b) {
    backward_tile(p + a * C, g + a * M, w + a * M, mk ? mk + a * M : nullptr, out + a * C, b - a, scale, two_lam);
  });
  return gl;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
  m.def("uniforms", &uniforms);
}
"""

_ISA = {"AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"], "AVX2": ["-mavx2", "-mfma"]}
ENABLED = True  # False: every layer takes the whole-tensor path (benchmarks/learn_step.py --fused off)
_MODULE: object | None = None
_FAILED = False


def _module():
    """The compiled extension, built once per process (and cached on disk by torch), or None."""
    global _MODULE, _FAILED
    if _MODULE is None and not _FAILED:
        try:
            from torch.utils.cpp_extension import load_inline

            # Vector ISA from what torch detected, not -march=native: a build cached in a home directory
            # shared by a cluster's nodes must run on all of them (one build per capability).
            cap = torch.backends.cpu.get_cpu_capability()
            isa = _ISA.get(cap, [])
            # -ffast-math lets glibc's vector exp/log in; division and sums keep their order.
            _MODULE = load_inline(f"maskpipe_soft_mask_24_{cap.lower()}", cpp_sources=_SOURCE, verbose=False,
                                  extra_cflags=["-O3", *isa, "-ffast-math", "-fno-reciprocal-math",
                                                "-fno-associative-math", "-fopenmp"])
        except Exception as e:  # no compiler, no headers: the whole-tensor path still works
            _FAILED = True
            log.warning("fused soft mask unavailable, using the whole-tensor path (%s: %s)", type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "")
    return _MODULE


def available(weight: torch.Tensor, logits: torch.Tensor, candidates: torch.Tensor) -> bool:
    """Whether the fused pass serves this layer: float32 on the CPU, 2:4 with six candidate logits in
    the kernel's order, and the extension built."""
    from maskpipe.pipeline.nm.learn import nm_candidates

    return (ENABLED and weight.device.type == "cpu" and weight.dtype == logits.dtype == torch.float32
            and logits.shape[-1] == 6 and candidates.shape == (6, 4)
            and torch.equal(candidates, nm_candidates(2, 4).float()) and _module() is not None)


def _seed(seed: int) -> int:
    return (int(seed) + 2**63) % 2**64 - 2**63  # any Python int, as the int64 the kernel takes (mod 2^64)


def forward(weight, logits, seed, tau, kappa, exp_floor, below_floor):
    """(probs [out, G, 6], W ⊙ M [out, in]) with the noise of `seed` (the module docstring)."""
    probs, masked = _module().forward(logits.reshape(-1, 6).contiguous(), _seed(seed), weight.reshape(-1, 4)
                                      .contiguous(), tau, kappa, exp_floor, below_floor)
    return probs.view(logits.shape), masked.view(weight.shape)


def uniforms(shape: torch.Size, seed: int) -> torch.Tensor:
    """The uniforms `forward` draws for `seed`, as a tensor of `shape` (elements in row-major order)."""
    return _module().uniforms(int(torch.Size(shape).numel()), _seed(seed)).view(shape)


def backward(probs, grad, weight, masked, tau, kappa, lam):
    """∂/∂logits [out, G, 6] from the masked weight's gradient [out, in]."""
    empty = torch.empty(0)
    return _module().backward(probs.reshape(-1, 6), grad.float().reshape(-1, 4).contiguous(),
                              weight.reshape(-1, 4).contiguous(),
                              masked.reshape(-1, 4).contiguous() if masked is not None else empty,
                              tau, kappa, lam).view(probs.shape)
