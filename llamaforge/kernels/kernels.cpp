// llamaforge native CPU kernels, registered as torch ops (torch.ops.llamaforge.*).
//
// 1. linear: y[M, N] = x[M, K] @ W[N, K]^T for a few rows of x and every weight format llamaforge stores:
//    float32, float16, bfloat16, int8 per-row scale, 4-bit groups, GGUF Q8_0 blocks. Decoding reads every
//    weight once per token, so these stream the weights once per call (the few rows of x reuse each weight
//    row from L1) and accumulate in float32. Float weights are converted to float32 in registers; integer
//    weights meet activations rounded to int16 per 32 columns (integer multiply-adds, see below).
// 2. decode_step: a whole decode step (one token per sequence, or a few per sequence when verifying draft
//    tokens) through all layers: RMSNorm, the fused qkv matmul, RoPE + write to the paged KV cache (through
//    each sequence's block table) + attention, output projection, RMSNorm, the fused w1/w3 matmul,
//    SiLU-gate, w2, residual adds, and the final norm. One op call instead of ~10 per layer: at 135M
//    parameters a token takes ~10 ms, and ~300 Python-level op calls would add 3 ms to it. The math is
//    llamaforge/model.py's (tests compare the two).
//
// AVX2 + FMA (+ F16C) intrinsics under __AVX2__; elsewhere plain loops that compilers vectorize.
// Threads: at::parallel_for, i.e. torch's own OpenMP pool.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "blocks.h"
#include "parallel.h"

using llamaforge::gguf_matmul;
using llamaforge::gguf_row_bytes;
using llamaforge::parallel_rows;

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

using at::Tensor;

// Rows of W per task: at least ~32K weights so that a thread's share is worth waking it for.
int64_t row_grain(int64_t K) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1)); }

// Integer and 16-bit kernels prefetch the weights this many bytes ahead: a thread's rows are one sequential
// stream, and the hardware prefetcher alone leaves them at about half the memory bandwidth.
constexpr int64_t PREFETCH = 1024;

// y = v, or y += v when accumulating into a residual stream.
inline void put(float* y, float v, bool accumulate) { *y = accumulate ? *y + v : v; }

#ifdef __AVX2__
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for 8 lanes (Cephes' expf: 2^n * polynomial, about 1 ulp); inputs below -87 give ~0.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// Weight element formats: load8 converts 8 consecutive weights to float32 lanes, get converts one.
struct F32 {
  using T = float;
  static float get(const T* p) { return *p; }
#ifdef __AVX2__
  static __m256 load8(const T* p) { return _mm256_loadu_ps(p); }
#endif
};
struct F16 {
  using T = at::Half;
  static float get(const T* p) { return static_cast<float>(*p); }
#ifdef __AVX2__
  static __m256 load8(const T* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#endif
};
struct BF16 {
  using T = at::BFloat16;
  static float get(const T* p) { return static_cast<float>(*p); }
#ifdef __AVX2__
  static __m256 load8(const T* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
#endif
};
struct I8 {
  using T = int8_t;
  static float get(const T* p) { return static_cast<float>(*p); }
#ifdef __AVX2__
  static __m256 load8(const T* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
#endif
};

// Weights as stored ---------------------------------------------------------------------------------------
enum class Format { F32, F16, BF16, Int8, Int4, Q8_0, GGUF };

// A linear layer's weights, y[m, n] = sum_k x[m, k] w[n, k]. `aux` holds the scales: int8 [N] per row;
// 4-bit [N, 2, K/group] (scale, bias) per row and group; Q8_0 [K/32, N] per block. GGUF blocks (blocks.cpp)
// carry their scales inside; `qtype` is their ggml type.
struct Weights {
  Format format;
  int64_t N, K, group;
  const void* w;
  const float* aux;
  int64_t qtype = -1;
};

Weights weights_of(const Tensor& w, const std::optional<Tensor>& aux, const char* who) {
  TORCH_CHECK(w.device().is_cpu() && w.is_contiguous(), who, ": weights must be contiguous CPU tensors");
  auto scales = [&](int64_t numel, const char* layout) -> const float* {
    TORCH_CHECK(aux.has_value() && aux->scalar_type() == at::kFloat && aux->is_contiguous() && aux->numel() == numel,
                who, ": scales must be float32 ", layout, " (", numel, " values)");
    return aux->data_ptr<float>();
  };
  if (aux.has_value() && aux->scalar_type() == at::kLong) {  // GGUF blocks [N, bytes per row], aux = (type, K)
    TORCH_CHECK(aux->numel() == 2 && aux->is_cpu(), who, ": GGUF blocks need an int64 (ggml type, K) tensor");
    const int64_t qtype = aux->data_ptr<int64_t>()[0], K = aux->data_ptr<int64_t>()[1];
    const int64_t row_bytes = gguf_row_bytes(qtype, K);
    TORCH_CHECK(row_bytes > 0, who, ": ggml type ", qtype, " with ", K, " columns has no native kernel");
    TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.size(1) == row_bytes, who,
                ": GGUF blocks of ggml type ", qtype, " with ", K, " columns must be uint8 [N, ", row_bytes, "], got ",
                w.scalar_type(), " ", w.sizes());
    return {Format::GGUF, w.size(0), K, 0, w.data_ptr(), nullptr, qtype};
  }
  if (!aux.has_value()) {
    TORCH_CHECK(w.dim() == 2, who, ": float weight must be [N, K]");
    const auto dtype = w.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, who,
                ": unsupported float weight dtype ", dtype);
    const Format f = dtype == at::kFloat ? Format::F32 : (dtype == at::kHalf ? Format::F16 : Format::BF16);
    return {f, w.size(0), w.size(1), 0, w.data_ptr(), nullptr};
  }
  if (w.scalar_type() == at::kChar && w.dim() == 2)
    return {Format::Int8, w.size(0), w.size(1), 0, w.data_ptr(), scales(w.size(0), "[N]")};
  if (w.scalar_type() == at::kChar && w.dim() == 3) {
    TORCH_CHECK(w.size(2) == 32, who, ": Q8_0 weight must be [K/32, N, 32]");
    const int64_t nb = w.size(0), N = w.size(1);
    return {Format::Q8_0, N, nb * 32, 32, w.data_ptr(), scales(nb * N, "[K/32, N]")};
  }
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2, who, ": weight must be float [N, K], int8 [N, K], ",
              "uint8 4-bit codes [N, K/2] or int8 Q8_0 blocks [K/32, N, 32]; got ", w.scalar_type(), " ", w.sizes());
  const int64_t N = w.size(0), K = 2 * w.size(1);
  TORCH_CHECK(aux->dim() == 3 && aux->size(0) == N && aux->size(1) == 2 && aux->size(2) > 0,
              who, ": 4-bit scale_bias must be [N, 2, K/group]");  // fmt: skip
  const int64_t group = K / aux->size(2);
  TORCH_CHECK(group >= 32 && (group & (group - 1)) == 0 && group * aux->size(2) == K, who,
              ": 4-bit group must be 32 * 2^i and divide K");
  return {Format::Int4, N, K, group, w.data_ptr(), scales(N * 2 * (K / group), "[N, 2, K/group]")};
}

// Float weights: out[m] = dot(x[m, :K], w[:K]) for MT rows of x (row stride ldx), one pass over w for all
// MT rows; with few rows, several accumulators per row hide the FMA latency.
template <class W, int MT>
inline void dot_rows(const float* x, int64_t ldx, const typename W::T* w, int64_t K, float* out) {
  float tail[MT] = {};
  int64_t k = 0;
#ifdef __AVX2__
  constexpr int U = MT == 1 ? 4 : (MT == 2 ? 2 : 1);
  __m256 acc[MT][U];
  for (int m = 0; m < MT; ++m)
    for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
  for (; k + 8 * U <= K; k += 8 * U) {
    // One row streaming (decode): 16-bit weights are fetched a line (32 weights) per iteration, too slowly for
    // the hardware prefetcher alone; prefetching ahead made bfloat16 decode steps 12% faster, float16 5%.
    // float32 rows (two lines per iteration) measured no gain, so they are left to the hardware.
    if constexpr (MT == 1 && sizeof(typename W::T) == 2)
      _mm_prefetch(reinterpret_cast<const char*>(w + k) + PREFETCH, _MM_HINT_T0);
    for (int u = 0; u < U; ++u) {
      __m256 wv = W::load8(w + k + 8 * u);
      for (int m = 0; m < MT; ++m) acc[m][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + k + 8 * u), acc[m][u]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    __m256 s = acc[m][0];
    for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, acc[m][u]);
    tail[m] = hsum(s);
  }
  for (; k < K; ++k)
    for (int m = 0; m < MT; ++m) tail[m] += W::get(w + k) * x[m * ldx + k];
#else
  for (int m = 0; m < MT; ++m) {
    float s = 0.f;
    const float* xm = x + m * ldx;
#pragma omp simd reduction(+ : s)
    for (k = 0; k < K; ++k) s += W::get(w + k) * xm[k];
    tail[m] = s;
  }
#endif
  for (int m = 0; m < MT; ++m) out[m] = tail[m];
}

// Calls body.template operator()<MT>(m) for row chunks of at most 4 rows covering 0..M.
template <class Body>
inline void for_row_chunks(int64_t M, Body&& body) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) body.template operator()<4>(m);
  switch (M - m) {
    case 3: body.template operator()<3>(m); break;
    case 2: body.template operator()<2>(m); break;
    case 1: body.template operator()<1>(m); break;
    default: break;
  }
}

// y[m, n] (+)= scale[n] * dot(x[m], w[n]) (scale 1 when row_scale is null).
template <class W>
void float_rows(const float* x, int64_t M, int64_t K, const typename W::T* w, int64_t N, const float* row_scale,
                float* y, int64_t ldy, bool accumulate) {
  parallel_rows(N, row_grain(K), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const typename W::T* wn = w + n * K;
      const float s = row_scale ? row_scale[n] : 1.f;
      for_row_chunks(M, [&]<int MT>(int64_t m) {
        float out[MT];
        dot_rows<W, MT>(x + m * K, K, wn, K, out);
        for (int i = 0; i < MT; ++i) put(y + (m + i) * ldy + n, out[i] * s, accumulate);
      });
    }
  });
}

// Integer weights meet activations rounded to int16 per 32 columns (relative error < 2e-5 of the chunk's
// largest value, far below bfloat16's 4e-3), so that 16 weights times 16 activations take one madd
// instead of float conversions. For 4-bit codes the int16 copy of x is permuted per 32 columns (even
// columns, then odd ones) to match the nibble order after a plain mask/shift.
struct Int16Rows {
  const int16_t* q;   // [M, K], permuted per 32 columns for 4-bit codes
  const float* scale; // [M, K/32]
  const float* sum;   // [M, K/group]: exact float sums of x per group, for 4-bit biases
};

Int16Rows quantize_rows(const float* x, int64_t M, int64_t K, int64_t group, bool pair_order) {
  thread_local std::vector<int16_t> q;  // reused across calls: no allocation per matmul
  thread_local std::vector<float> scale, sum;
  q.resize(M * K), scale.resize(M * K / 32), sum.assign(M * K / group, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < K; c += 32) {
      const float* xc = x + m * K + c;
      float mx = 0.f, total = 0.f;
      for (int i = 0; i < 32; ++i) mx = std::max(mx, std::fabs(xc[i])), total += xc[i];
      sum[(m * K + c) / group] += total;
      int16_t* qc = q.data() + m * K + c;
      if (!std::isfinite(total) || !std::isfinite(mx)) {  // NaN/inf in x: a NaN scale makes the outputs NaN,
        scale[(m * K + c) / 32] = std::nanf("");        // as a float matmul's would be (no int16 rounding)
        std::fill(qc, qc + 32, int16_t{0});
        continue;
      }
      const float inv = mx > 0.f ? 32767.f / mx : 0.f;
      scale[(m * K + c) / 32] = mx / 32767.f;
      for (int i = 0; i < 32; ++i) {
        const int j = pair_order ? (i < 16 ? 2 * i : 2 * (i - 16) + 1) : i;
        qc[i] = static_cast<int16_t>(std::nearbyint(xc[j] * inv));
      }
    }
  return {q.data(), scale.data(), sum.data()};
}

// Per-row int8 weights [N, K] (K a multiple of 32): out[r] = dot(x row m, w row r) / row scale, for R
// consecutive rows sharing each load of x.
template <int R>
inline void int8_rows(const Int16Rows& xr, int64_t m, int64_t K, const int8_t* q, float* out) {
  const int64_t nc = K / 32;
  const int16_t* xq = xr.q + m * K;
  const float* xs = xr.scale + m * nc;
#ifdef __AVX2__
  constexpr int A = R == 1 ? 2 : 1;  // accumulators per row: one row alone needs two to hide FMA latency
  __m256 acc[R * A];
  for (int r = 0; r < R * A; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < nc; ++c) {
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + c * 32));
    const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + c * 32 + 16));
    const __m256 xscale = _mm256_broadcast_ss(xs + c);
    _mm_prefetch(reinterpret_cast<const char*>(q + (R - 1) * K + c * 32 + PREFETCH), _MM_HINT_T0);
    for (int r = 0; r < R; ++r) {
      const __m128i* w = reinterpret_cast<const __m128i*>(q + r * K + c * 32);
      const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(w)), x0),
                                         _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(w + 1)), x1));
      acc[r * A + c % A] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), xscale, acc[r * A + c % A]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(A == 1 ? acc[r] : _mm256_add_ps(acc[r * A], acc[r * A + A - 1]));
#else
  for (int r = 0; r < R; ++r) {
    float s = 0.f;
    for (int64_t c = 0; c < nc; ++c) {
      const int8_t* w = q + r * K + c * 32;
      int32_t t = 0;
#pragma omp simd reduction(+ : t)
      for (int i = 0; i < 32; ++i) t += int32_t(w[i]) * xq[c * 32 + i];
      s += xs[c] * static_cast<float>(t);
    }
    out[r] = s;
  }
#endif
}

// 4-bit codes: uint8 [N, K/2], byte j = column 2j (low nibble) | column 2j+1 (high nibble); per row and
// group a scale s and bias b = zero - 8 s, so that w = q * s + b and dot(x_g, w_g) = s * dot(x_g, q_g) +
// b * sum(x_g). out[r] for R consecutive rows sharing each load of x.
template <int R>
inline void int4_rows(const Int16Rows& xr, int64_t m, int64_t K, int gshift, const uint8_t* q, const float* sb,
                      float* out) {
  const int64_t nc = K / 32, ng = nc >> gshift;
  const int16_t* xq = xr.q + m * K;
  const float* xs = xr.scale + m * nc;
  float res[R] = {};
#ifdef __AVX2__
  const __m256i low4 = _mm256_set1_epi16(0x0F);
  constexpr int A = R == 1 ? 2 : 1;  // accumulators per row: one row alone needs two to hide FMA latency
  __m256 acc[R * A];
  for (int r = 0; r < R * A; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < nc; ++c) {
    const __m256i* xc = reinterpret_cast<const __m256i*>(xq + c * 32);
    const __m256i x0 = _mm256_loadu_si256(xc), x1 = _mm256_loadu_si256(xc + 1);
    const __m256 xscale = _mm256_broadcast_ss(xs + c);
    if (c % 4 == 0) _mm_prefetch(reinterpret_cast<const char*>(q + (R - 1) * (K / 2) + c * 16 + PREFETCH), _MM_HINT_T0);
    for (int r = 0; r < R; ++r) {
      // Each byte widened to 16 bits: the low nibble is a mask away, the high one a shift (nothing above it).
      const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + r * (K / 2) + c * 16)));
      const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(_mm256_and_si256(b, low4), x0),
                                         _mm256_madd_epi16(_mm256_srli_epi16(b, 4), x1));
      const __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(p), xscale);                     // activation scale
      acc[r * A + c % A] = _mm256_fmadd_ps(_mm256_broadcast_ss(sb + r * 2 * ng + (c >> gshift)), t,
                                           acc[r * A + c % A]);  // weight scale
    }
  }
  for (int r = 0; r < R; ++r) res[r] = hsum(A == 1 ? acc[r] : _mm256_add_ps(acc[r * A], acc[r * A + A - 1]));
#else
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < nc; ++c) {
      const uint8_t* qc = q + r * (K / 2) + c * 16;
      const int16_t* xc = xq + c * 32;
      int32_t t = 0;
#pragma omp simd reduction(+ : t)
      for (int i = 0; i < 16; ++i) t += int32_t(qc[i] & 15) * xc[i] + int32_t(qc[i] >> 4) * xc[16 + i];
      res[r] += sb[r * 2 * ng + (c >> gshift)] * (xs[c] * static_cast<float>(t));
    }
#endif
  const float* xsum = xr.sum + m * ng;
  for (int r = 0; r < R; ++r) {
    float bias = 0.f;
    const float* b = sb + r * 2 * ng + ng;
#pragma omp simd reduction(+ : bias)
    for (int64_t g = 0; g < ng; ++g) bias += b[g] * xsum[g];
    out[r] = res[r] + bias;
  }
}

// Row-wise integer formats (int8, 4-bit). One row of x (a decode step): R1 rows of W at a time. More rows of
// x: 4 rows of W at a time, their codes staying in L1 across the rows of x. `rows<R>(m, n, out)` computes
// out[0..R) for rows n..n+R of W and row m of x; `scale(n)` is the per-row factor.
template <int R1, class Rows, class Scale>
void integer_rows(int64_t M, int64_t N, int64_t K, float* y, int64_t ldy, bool accumulate, Rows&& rows,
                  Scale&& scale) {
  parallel_rows(N, row_grain(K), [&](int64_t n0, int64_t n1) {
    float out[4];
    int64_t n = n0;
    if (M == 1) {
      for (; n + R1 <= n1; n += R1) {
        rows.template operator()<R1>(0, n, out);
        for (int r = 0; r < R1; ++r) put(y + n + r, out[r] * scale(n + r), accumulate);
      }
    } else {
      for (; n + 4 <= n1; n += 4)
        for (int64_t m = 0; m < M; ++m) {
          rows.template operator()<4>(m, n, out);
          for (int r = 0; r < 4; ++r) put(y + m * ldy + n + r, out[r] * scale(n + r), accumulate);
        }
    }
    for (; n < n1; ++n)
      for (int64_t m = 0; m < M; ++m) {
        rows.template operator()<1>(m, n, out);
        put(y + m * ldy + n, out[0] * scale(n), accumulate);
      }
  });
}

// GGUF Q8_0 in BlockInt8Linear's layout: qweight int8 [K/32, N, 32], scales float32 [K/32, N]. Rows are taken
// in tiles whose blocks are contiguous in memory (16 KB per block of a tile); each row keeps a vector
// accumulator across blocks (all in L1). Long contiguous runs are what keep this layout near memory
// bandwidth: tiles of 64 rows stream at ~15 GB/s here, tiles of 512 at ~24.
constexpr int64_t Q8_TILE = 512;

void q8_0_tile(const Int16Rows& xr, int64_t m, int64_t K, const int8_t* q, const float* scales, int64_t N,
               int64_t t0, int64_t t1, float* y, bool accumulate) {
  const int64_t nb = K / 32;
  const int16_t* xq = xr.q + m * K;
  const float* xs = xr.scale + m * nb;
#ifdef __AVX2__
  __m256 acc[Q8_TILE];
  for (int64_t n = 0; n < t1 - t0; ++n) acc[n] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * 32));
    const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * 32 + 16));
    for (int64_t n = t0; n < t1; ++n) {
      const __m128i* w = reinterpret_cast<const __m128i*>(q + (b * N + n) * 32);
      const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(w)), x0),
                                         _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(w + 1)), x1));
      const __m256 f = _mm256_set1_ps(scales[b * N + n] * xs[b]);
      acc[n - t0] = _mm256_fmadd_ps(f, _mm256_cvtepi32_ps(p), acc[n - t0]);
    }
  }
  for (int64_t n = t0; n < t1; ++n) put(y + n, hsum(acc[n - t0]), accumulate);
#else
  float acc[Q8_TILE] = {};
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t n = t0; n < t1; ++n) {
      const int8_t* w = q + (b * N + n) * 32;
      int32_t t = 0;
#pragma omp simd reduction(+ : t)
      for (int i = 0; i < 32; ++i) t += int32_t(w[i]) * xq[b * 32 + i];
      acc[n - t0] += scales[b * N + n] * xs[b] * static_cast<float>(t);
    }
  for (int64_t n = t0; n < t1; ++n) put(y + n, acc[n - t0], accumulate);
#endif
}

// y [M, N] (row stride ldy) = x [M, K] @ W^T, or y += it.
void matmul(const Weights& W, const float* x, int64_t M, float* y, int64_t ldy, bool accumulate) {
  const int64_t N = W.N, K = W.K;
  switch (W.format) {
    case Format::F32: return float_rows<F32>(x, M, K, static_cast<const float*>(W.w), N, nullptr, y, ldy, accumulate);
    case Format::F16: return float_rows<F16>(x, M, K, static_cast<const at::Half*>(W.w), N, nullptr, y, ldy, accumulate);
    case Format::BF16:
      return float_rows<BF16>(x, M, K, static_cast<const at::BFloat16*>(W.w), N, nullptr, y, ldy, accumulate);
    case Format::Int8: {
      const int8_t* q = static_cast<const int8_t*>(W.w);
      if (K % 32) return float_rows<I8>(x, M, K, q, N, W.aux, y, ldy, accumulate);
      const Int16Rows xr = quantize_rows(x, M, K, 32, /*pair_order=*/false);
      return integer_rows<1>(
          M, N, K, y, ldy, accumulate,
          [&]<int R>(int64_t m, int64_t n, float* out) { int8_rows<R>(xr, m, K, q + n * K, out); },
          [&](int64_t n) { return W.aux[n]; });
    }
    case Format::Int4: {
      int gshift = 0;
      while ((int64_t{32} << gshift) < W.group) ++gshift;
      const int64_t ng = K / W.group;
      const uint8_t* q = static_cast<const uint8_t*>(W.w);
      const Int16Rows xr = quantize_rows(x, M, K, W.group, /*pair_order=*/true);
      return integer_rows<2>(
          M, N, K, y, ldy, accumulate,
          [&]<int R>(int64_t m, int64_t n, float* out) {
            int4_rows<R>(xr, m, K, gshift, q + n * (K / 2), W.aux + n * 2 * ng, out);
          },
          [](int64_t) { return 1.f; });
    }
    case Format::GGUF:
      return gguf_matmul(W.qtype, static_cast<const uint8_t*>(W.w), N, K, x, M, y, ldy, accumulate);
    case Format::Q8_0: {
      const int8_t* q = static_cast<const int8_t*>(W.w);
      const Int16Rows xr = quantize_rows(x, M, K, 32, /*pair_order=*/false);
      parallel_rows(N, std::max<int64_t>(64, row_grain(K)), [&](int64_t n0, int64_t n1) {
        for (int64_t t0 = n0; t0 < n1; t0 += Q8_TILE)
          for (int64_t m = 0; m < M; ++m)
            q8_0_tile(xr, m, K, q, W.aux, N, t0, std::min(n1, t0 + Q8_TILE), y + m * ldy, accumulate);
      });
      return;
    }
  }
}

Tensor linear(const Tensor& x, const Tensor& w, const std::optional<Tensor>& aux) {
  const Weights W = weights_of(w, aux, "linear");
  TORCH_CHECK(x.size(-1) == W.K, "linear: input has ", x.size(-1), " features, the weights take ", W.K);
  Tensor xf = x.reshape({-1, W.K}).to(at::kFloat).contiguous();
  const int64_t M = xf.size(0);
  Tensor y = at::empty({M, W.N}, xf.options());
  matmul(W, xf.data_ptr<float>(), M, y.data_ptr<float>(), W.N, false);
  auto sizes = x.sizes().vec();
  sizes.back() = W.N;
  return y.view(sizes).to(x.scalar_type());
}

// linear() through the portable scalar code for GGUF blocks, whatever the CPU (tests compare against it).
Tensor gguf_linear_reference(const Tensor& x, const Tensor& w, const Tensor& info) {
  const Weights W = weights_of(w, info, "gguf_linear_reference");
  TORCH_CHECK(W.format == Format::GGUF, "gguf_linear_reference: takes GGUF blocks");
  TORCH_CHECK(x.size(-1) == W.K, "gguf_linear_reference: input has ", x.size(-1), " features, the weights take ", W.K);
  Tensor xf = x.reshape({-1, W.K}).to(at::kFloat).contiguous();
  Tensor y = at::empty({xf.size(0), W.N}, xf.options());
  gguf_matmul(W.qtype, static_cast<const uint8_t*>(W.w), W.N, W.K, xf.data_ptr<float>(), xf.size(0),
              y.data_ptr<float>(), W.N, false, /*reference=*/true);
  auto sizes = x.sizes().vec();
  sizes.back() = W.N;
  return y.view(sizes).to(x.scalar_type());
}

// The decode step's other pieces (float32 activations) -----------------------------------------------------
// model.RMSNorm: x / sqrt(mean(x^2) + eps) * weight, per row of x [R, D].
void rms_norm(const float* x, const float* w, int64_t R, int64_t D, float eps, float* y) {
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = x + r * D;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < D; ++i) ss += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(ss / D + eps);
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) y[r * D + i] = xr[i] * inv * w[i];
  }
}

// SwiGLU's gate: g [R, 2H] -> y [R, H] = silu(g[:, :H]) * g[:, H:].
void silu_mul(const float* g, int64_t R, int64_t H, float* y) {
  for (int64_t r = 0; r < R; ++r) {
    const float *a = g + r * 2 * H, *b = a + H;
    float* out = y + r * H;
    int64_t i = 0;
#ifdef __AVX2__
    for (; i + 8 <= H; i += 8) {
      const __m256 av = _mm256_loadu_ps(a + i);
      const __m256 den = _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), av)));
      _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(av, den), _mm256_loadu_ps(b + i)));
    }
#endif
    for (; i < H; ++i) out[i] = a[i] / (1.f + std::exp(-a[i])) * b[i];
  }
}

// KV-cache row formats: a cached key or value (D numbers) as stored. width(D): stored elements per row;
// get(row, d, D) / load8(row, d, D): number d (8 numbers from d) as float32; store(row, x, D): write D floats.
template <class E>  // float32 / float16 / bfloat16 rows: the numbers themselves
struct Plain {
  using T = typename E::T;
  static int64_t width(int64_t D) { return D; }
  static float get(const T* row, int64_t d, int64_t) { return E::get(row + d); }
#ifdef __AVX2__
  static __m256 load8(const T* row, int64_t d, int64_t) { return E::load8(row + d); }
#endif
  static void store(T* row, const float* x, int64_t D) {
    for (int64_t d = 0; d < D; ++d) row[d] = static_cast<T>(x[d]);
  }
};

// q8_0 rows (llama.cpp's --cache-type q8_0 arithmetic): D int8 numbers, then one float16 scale per 32 of them;
// scale = max|x| / 127, q = round(x / scale) (x times the float32 reciprocal, rounded half to even).
struct Q8Row {
  using T = int8_t;
  static int64_t width(int64_t D) { return D + D / 16; }
  static float scale(const T* row, int64_t d, int64_t D) {
    return static_cast<float>(reinterpret_cast<const at::Half*>(row + D)[d / 32]);
  }
  static float get(const T* row, int64_t d, int64_t D) { return static_cast<float>(row[d]) * scale(row, d, D); }
#ifdef __AVX2__
  static __m256 load8(const T* row, int64_t d, int64_t D) {
    const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + d))));
    return _mm256_mul_ps(q, _mm256_set1_ps(scale(row, d, D)));
  }
#endif
  static void store(T* row, const float* x, int64_t D) {
    at::Half* scales = reinterpret_cast<at::Half*>(row + D);
    for (int64_t g = 0; g < D / 32; ++g) {
      float amax = 0.f;
      for (int64_t i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[g * 32 + i]));
      const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
      for (int64_t i = 0; i < 32; ++i) row[g * 32 + i] = static_cast<int8_t>(std::nearbyint(x[g * 32 + i] * id));
      scales[g] = static_cast<at::Half>(d);
    }
  }
};

// Attention of NG query heads sharing a KV head over n cached keys/values of one slice of the context. The
// cache is paged: key j lies at kb[j / BS] + (j % BS) D (and value j likewise in vb), one pointer per block of
// BS positions. For each query g, parts[g] receives {m, l, o[D]}: the slice's largest score m, the sum l of
// exp(score - m), and o = the exp(score - m)-weighted sum of the values (unnormalized; slices are merged
// afterwards). scores: room for NG * n floats.
//
// Plain loops, one query at a time (any D, any CPU).
template <class W>
void attend_plain(int64_t NG, const float* q, const typename W::T* const* kb, const typename W::T* const* vb,
                  int64_t BS, int64_t n, int64_t D, float* scores, float* const* parts) {
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  for (int64_t g = 0; g < NG; ++g) {
    const float* qg = q + g * D;
    float mx = -INFINITY, total = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      const typename W::T* kj = kb[j / BS] + (j % BS) * W::width(D);
      float s = 0.f;
      for (int64_t d = 0; d < D; ++d) s += qg[d] * W::get(kj, d, D);
      scores[j] = s * scale;
      mx = std::max(mx, scores[j]);
    }
    for (int64_t j = 0; j < n; ++j) total += (scores[j] = std::exp(scores[j] - mx));
    float* o = parts[g] + 2;
    std::fill(o, o + D, 0.f);
    for (int64_t j = 0; j < n; ++j) {
      const typename W::T* vj = vb[j / BS] + (j % BS) * W::width(D);
      const float p = scores[j];
      for (int64_t d = 0; d < D; ++d) o[d] += p * W::get(vj, d, D);
    }
    parts[g][0] = mx, parts[g][1] = total;
  }
}

#ifdef __AVX2__
// o[g][d0 .. d0 + 8 NV) for the NG queries: each value vector is loaded (and converted) once for all of them.
template <class W, int NG, int NV>
inline void weigh_values(const float* p, const typename W::T* const* vb, int64_t BS, int64_t n, int64_t D, int64_t d0,
                         float* const* parts) {
  __m256 acc[NG][NV];
  for (int g = 0; g < NG; ++g)
    for (int v = 0; v < NV; ++v) acc[g][v] = _mm256_setzero_ps();
  for (int64_t b0 = 0; b0 < n; b0 += BS) {
    const typename W::T* block = vb[b0 / BS];
    const int64_t m = std::min(BS, n - b0), width = W::width(D);
    for (int64_t jj = 0; jj < m; ++jj) {
      __m256 vv[NV];
      for (int v = 0; v < NV; ++v) vv[v] = W::load8(block + jj * width, d0 + 8 * v, D);
      for (int g = 0; g < NG; ++g) {
        const __m256 pb = _mm256_broadcast_ss(p + g * n + b0 + jj);
        for (int v = 0; v < NV; ++v) acc[g][v] = _mm256_fmadd_ps(pb, vv[v], acc[g][v]);
      }
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(parts[g] + 2 + d0 + 8 * v, acc[g][v]);
}

// AVX2, D a multiple of 8: each key and value row is loaded and converted once for the NG queries, and the
// dot products run as 2 NG independent FMA chains (two keys at a time within a block).
template <class W, int NG>
void attend_group(const float* q, const typename W::T* const* kb, const typename W::T* const* vb, int64_t BS,
                  int64_t n, int64_t D, float* scores, float* const* parts) {
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const int64_t width = W::width(D);
  for (int64_t b0 = 0; b0 < n; b0 += BS) {
    const typename W::T* kc = kb[b0 / BS];
    const int64_t m = std::min(BS, n - b0);
    int64_t jj = 0;
    for (; jj + 2 <= m; jj += 2) {
      __m256 acc[NG][2];
      for (int g = 0; g < NG; ++g) acc[g][0] = acc[g][1] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 k0 = W::load8(kc + jj * width, d, D), k1 = W::load8(kc + (jj + 1) * width, d, D);
        for (int g = 0; g < NG; ++g) {
          const __m256 qv = _mm256_loadu_ps(q + g * D + d);
          acc[g][0] = _mm256_fmadd_ps(qv, k0, acc[g][0]);
          acc[g][1] = _mm256_fmadd_ps(qv, k1, acc[g][1]);
        }
      }
      for (int g = 0; g < NG; ++g)
        scores[g * n + b0 + jj] = hsum(acc[g][0]) * scale, scores[g * n + b0 + jj + 1] = hsum(acc[g][1]) * scale;
    }
    for (; jj < m; ++jj)
      for (int g = 0; g < NG; ++g) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8)
          acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + d), W::load8(kc + jj * width, d, D), acc);
        scores[g * n + b0 + jj] = hsum(acc) * scale;
      }
  }
  for (int g = 0; g < NG; ++g) {  // softmax numerators in place
    float* s = scores + g * n;
    float mx = -INFINITY;
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, s[i]);
    int64_t i = 0;
    __m256 sum = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), _mm256_set1_ps(mx)));
      _mm256_storeu_ps(s + i, e);
      sum = _mm256_add_ps(sum, e);
    }
    float total = hsum(sum);
    for (; i < n; ++i) total += (s[i] = std::exp(s[i] - mx));
    parts[g][0] = mx, parts[g][1] = total;
  }
  constexpr int NV = NG == 1 ? 8 : (NG == 2 ? 4 : 2);  // column vectors per pass: at most 8 accumulators
  int64_t d0 = 0;
  for (; d0 + 8 * NV <= D; d0 += 8 * NV) weigh_values<W, NG, NV>(scores, vb, BS, n, D, d0, parts);
  for (; d0 < D; d0 += 8) weigh_values<W, NG, 1>(scores, vb, BS, n, D, d0, parts);
}
#endif

// The G query heads of one KV head over one slice, up to 4 heads per pass over the keys and values.
template <class W>
void attend_heads(int64_t G, const float* q, const typename W::T* const* kb, const typename W::T* const* vb,
                  int64_t BS, int64_t n, int64_t D, float* scores, float* const* parts) {
#ifdef __AVX2__
  if (D % 8 == 0 && D <= 256) {
    for (int64_t g = 0; g < G; g += 4) {
      const float* qg = q + g * D;
      float* const* pg = parts + g;
      switch (std::min<int64_t>(G - g, 4)) {
        case 1: attend_group<W, 1>(qg, kb, vb, BS, n, D, scores, pg); break;
        case 2: attend_group<W, 2>(qg, kb, vb, BS, n, D, scores, pg); break;
        case 3: attend_group<W, 3>(qg, kb, vb, BS, n, D, scores, pg); break;
        default: attend_group<W, 4>(qg, kb, vb, BS, n, D, scores, pg); break;
      }
    }
    return;
  }
#endif
  attend_plain<W>(G, q, kb, vb, BS, n, D, scores, parts);
}

// Where the step's attention reads and writes. The caches are block pools [n_blocks, Hkv, BS, D]; each query
// row r (a token: one per sequence when decoding, several when verifying drafts or prefilling a short chunk)
// has its position pos[r] and its sequence's block table table[r, 0..NB): position p is slot p % BS of block
// table[r, p / BS].
struct Batch {
  int64_t R, H, Hkv, D, BS, NB;
  const int64_t *pos, *table;
  const float *cos, *sin;  // [R, D/2] at each row's position
};

// One query per row: qkv [R, (H + 2 Hkv) D] (q, k, v heads). RoPE (model.apply_rope: adjacent pairs) on q
// and k; every row's k/v are written to its cache slot first, then each row attends (softmax) over the
// positions 0..pos[r] of its sequence, so rows of one sequence at consecutive positions see each other
// causally. Result y [R, H D].
//
// Work is split by row, KV head and slice of the context (flash-decoding): a task attends the G = H/Hkv query
// heads sharing a KV head over one slice (whole blocks), so each key and value is read from memory once per
// KV head and stays in cache for the other G - 1 queries; the slices' partial softmaxes are merged exactly.
template <class W>
void attention(const float* qkv, typename W::T* kc, typename W::T* vc, const Batch& a, float* q_rot, float* y) {
  using T = typename W::T;
  const int64_t R = a.R, H = a.H, Hkv = a.Hkv, D = a.D, BS = a.BS, NB = a.NB, half = D / 2, G = H / Hkv;
  const int64_t width = (H + 2 * Hkv) * D;
  const int64_t rw = W::width(D);  // stored elements per cached row
  auto slot = [&](T* cache, int64_t r, int64_t h, int64_t p) {
    return cache + ((a.table[r * NB + p / BS] * Hkv + h) * BS + p % BS) * rw;
  };
  std::vector<float> k_rot(static_cast<size_t>(D));
  int64_t longest = 1;
  for (int64_t r = 0; r < R; ++r) {
    const float *src = qkv + r * width, *c = a.cos + r * half, *s = a.sin + r * half;
    const int64_t p = a.pos[r];
    longest = std::max(longest, p + 1);
    for (int64_t h = 0; h < H + Hkv; ++h) {
      float* dst = h < H ? q_rot + (r * H + h) * D : k_rot.data();
      for (int64_t i = 0; i < half; ++i) {
        const float x0 = src[h * D + 2 * i], x1 = src[h * D + 2 * i + 1];
        dst[2 * i] = x0 * c[i] - x1 * s[i], dst[2 * i + 1] = x0 * s[i] + x1 * c[i];
      }
      if (h >= H) W::store(slot(kc, r, h - H, p), k_rot.data(), D);
    }
    for (int64_t h = 0; h < Hkv; ++h) W::store(slot(vc, r, h, p), src + (H + Hkv + h) * D, D);
  }
  // Slices of whole blocks: enough for ~8 tasks per thread (even shares), none shorter than 32 keys.
  const int64_t blocks = (longest + BS - 1) / BS;
  const int64_t want = (8 * at::get_num_threads() + R * Hkv - 1) / (R * Hkv);
  const int64_t n_slices = std::max<int64_t>(1, std::min({want, longest / 32, blocks}));
  const int64_t slice_blocks = (blocks + n_slices - 1) / n_slices;
  const int64_t slice = slice_blocks * BS;
  std::vector<float> parts(static_cast<size_t>(R * H * n_slices * (D + 2)));  // per (r, h, slice): m, l, o[D]
  at::parallel_for(0, R * Hkv * n_slices, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(static_cast<size_t>(std::min<int64_t>(G, 4) * slice));
    std::vector<float*> part(static_cast<size_t>(G));
    std::vector<const T*> kb(static_cast<size_t>(slice_blocks)), vb(static_cast<size_t>(slice_blocks));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / (Hkv * n_slices), kvh = (t / n_slices) % Hkv, sl = t % n_slices;
      const int64_t len = a.pos[r] + 1;
      const int64_t j0 = std::min(len, sl * slice), j1 = std::min(len, j0 + slice);
      for (int64_t g = 0; g < G; ++g) part[g] = parts.data() + ((r * H + kvh * G + g) * n_slices + sl) * (D + 2);
      if (j1 > j0) {
        for (int64_t b = 0; b * BS < j1 - j0; ++b) {
          const int64_t block = a.table[r * NB + j0 / BS + b];
          kb[b] = kc + (block * Hkv + kvh) * BS * rw;
          vb[b] = vc + (block * Hkv + kvh) * BS * rw;
        }
        attend_heads<W>(G, q_rot + (r * H + kvh * G) * D, kb.data(), vb.data(), BS, j1 - j0, D, scores.data(),
                        part.data());
      } else {  // an empty slice (a sequence shorter than the longest): no weight in the merge
        for (float* pg : part) pg[0] = -INFINITY, pg[1] = 0.f, std::fill(pg + 2, pg + 2 + D, 0.f);
      }
    }
  });
  for (int64_t i = 0; i < R * H; ++i) {  // merge: rescale each slice to the common maximum
    const float* p = parts.data() + i * n_slices * (D + 2);
    float mx = -INFINITY, total = 0.f;
    for (int64_t sl = 0; sl < n_slices; ++sl) mx = std::max(mx, p[sl * (D + 2)]);
    float* out = y + i * D;
    std::fill(out, out + D, 0.f);
    for (int64_t sl = 0; sl < n_slices; ++sl) {
      const float* part = p + sl * (D + 2);
      if (part[1] == 0.f) continue;
      const float w = std::exp(part[0] - mx);
      total += w * part[1];
      for (int64_t d = 0; d < D; ++d) out[d] += w * part[2 + d];
    }
    const float inv = 1.f / total;
    for (int64_t d = 0; d < D; ++d) out[d] *= inv;
  }
}

// The whole decode step ---------------------------------------------------------------------------------------
// A projection: one or more linears sharing the input, their outputs side by side (a model whose q, k and v
// are stored in different formats keeps them apart).
struct Projection {
  std::vector<Weights> parts;
  int64_t N = 0;

  std::vector<llamaforge::GGUFPart> gguf;  // every part, when all of them are GGUF blocks

  void apply(const float* x, int64_t M, float* y, bool accumulate) const {
    if (gguf.size() > 1)
      return llamaforge::gguf_matmul_parts(gguf.data(), gguf.size(), parts[0].K, x, M, y, N, accumulate);
    int64_t offset = 0;
    for (const Weights& W : parts) matmul(W, x, M, y + offset, N, accumulate), offset += W.N;
  }
};

struct Layer {
  const float *attention_norm, *ffn_norm;
  Projection qkv, wo, w13, w2;
};

// params: per layer the attention_norm and ffn_norm weights, then the weights and scales (None for
// float weights) of each part of qkv, wo, w13 (w1 and w3 rows) and w2, with parts[4 l + i] parts in
// projection i of layer l; last, the final norm's weight. Everything is checked before anything is written.
std::vector<Layer> layers_of(const c10::List<std::optional<Tensor>>& params, at::IntArrayRef parts, int64_t L,
                             int64_t dim, int64_t q_width, int64_t qkv_width, const float*& final_norm,
                             std::vector<Tensor>& norms) {
  TORCH_CHECK(static_cast<int64_t>(parts.size()) == 4 * L, "decode_step: expected 4 part counts per layer for ", L,
              " layers, got ", parts.size());
  for (int64_t n : parts) TORCH_CHECK(n >= 1, "decode_step: a projection needs at least one part");
  std::vector<Layer> layers(L);
  size_t i = 0;
  auto next = [&]() -> std::optional<Tensor> {
    TORCH_CHECK(i < params.size(), "decode_step: too few parameters for the given parts");
    return params.get(i++);
  };
  auto norm = [&]() -> const float* {
    const std::optional<Tensor> w = next();
    TORCH_CHECK(w.has_value() && w->is_floating_point() && w->numel() == dim,
                "decode_step: norm weights must be floating point [", dim, "]");
    norms.push_back(w->to(at::kFloat).contiguous());  // float32 ones as they are, no copy
    return norms.back().data_ptr<float>();
  };
  auto projection = [&](int64_t n_parts, int64_t K, const char* name) {
    Projection p;
    for (int64_t j = 0; j < n_parts; ++j) {
      const std::optional<Tensor> w = next();
      TORCH_CHECK(w.has_value(), "decode_step: missing ", name, " weight");
      p.parts.push_back(weights_of(*w, next(), name));
      TORCH_CHECK(p.parts.back().K == K, "decode_step: ", name, " takes ", p.parts.back().K, " inputs, expected ", K);
      p.N += p.parts.back().N;
    }
    bool all_gguf = true;
    for (const Weights& W : p.parts) all_gguf = all_gguf && W.format == Format::GGUF;
    if (all_gguf)
      for (const Weights& W : p.parts) p.gguf.push_back({W.qtype, static_cast<const uint8_t*>(W.w), W.N});
    return p;
  };
  for (int64_t l = 0; l < L; ++l) {
    Layer& layer = layers[l];
    layer.attention_norm = norm();
    layer.ffn_norm = norm();
    layer.qkv = projection(parts[4 * l], dim, "qkv");
    layer.wo = projection(parts[4 * l + 1], q_width, "wo");
    layer.w13 = projection(parts[4 * l + 2], dim, "w13");
    layer.w2 = projection(parts[4 * l + 3], layer.w13.N / 2, "w2");
    TORCH_CHECK(layer.qkv.N == qkv_width && layer.wo.N == dim && layer.w13.N % 2 == 0 && layer.w2.N == dim,
                "decode_step: layer ", l, " projections have ", layer.qkv.N, ", ", layer.wo.N, ", ", layer.w13.N, ", ",
                layer.w2.N, " outputs; expected ", qkv_width, ", ", dim, ", 2 * hidden, ", dim);
  }
  final_norm = norm();
  TORCH_CHECK(i == params.size(), "decode_step: ", params.size() - i, " parameters left over");
  return layers;
}

// x [R, dim] token embeddings of R query rows; returns the final normalized hidden state [R, dim].
Tensor decode_step(const Tensor& x, const Tensor& cos, const Tensor& sin, const Tensor& positions,
                   const Tensor& block_table, const c10::List<std::optional<Tensor>>& params, at::IntArrayRef parts,
                   at::TensorList k_caches, at::TensorList v_caches, int64_t n_heads, int64_t n_kv_heads, double eps) {
  const int64_t L = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(v_caches.size()) == L, "decode_step: one k and one v cache per layer");
  const at::Tensor& k0 = k_caches[0];
  TORCH_CHECK(k0.dim() == 4, "decode_step: KV caches must be block pools [n_blocks, Hkv, block_size, D]");
  for (int64_t l = 0; l < L; ++l)
    TORCH_CHECK(k_caches[l].is_contiguous() && v_caches[l].is_contiguous() && k_caches[l].sizes() == k0.sizes() &&
                    v_caches[l].sizes() == k0.sizes() && k_caches[l].scalar_type() == k0.scalar_type() &&
                    v_caches[l].scalar_type() == k0.scalar_type(),
                "decode_step: every layer's k/v cache must be contiguous, of one shape and dtype");
  // q8_0 caches (int8) store D numbers and D/32 float16 scales per row: D + D/16 bytes.
  const bool q8 = k0.scalar_type() == at::kChar;
  const int64_t H = n_heads, Hkv = n_kv_heads, N = k0.size(0), BS = k0.size(2);
  const int64_t D = q8 ? k0.size(3) * 16 / 17 : k0.size(3);
  TORCH_CHECK(!q8 || (D % 32 == 0 && Q8Row::width(D) == k0.size(3)), "decode_step: a q8_0 cache row must hold D + D/16 ",
              "bytes with D a multiple of 32, got ", k0.size(3));
  TORCH_CHECK(k0.size(1) == Hkv && H % Hkv == 0 && D % 2 == 0, "decode_step: head counts do not fit the caches");

  Tensor h = x.to(at::kFloat).contiguous().clone();  // the residual stream, updated in place
  TORCH_CHECK(h.dim() == 2, "decode_step: x must be [R, dim]");
  const int64_t R = h.size(0), dim = h.size(1);
  Tensor c = cos.to(at::kFloat).contiguous(), s = sin.to(at::kFloat).contiguous();
  Tensor p = positions.to(at::kLong).contiguous(), t = block_table.to(at::kLong).contiguous();
  TORCH_CHECK(t.dim() == 2 && t.size(0) == R && t.size(1) >= 1, "decode_step: block_table must be [R, blocks]");
  TORCH_CHECK(c.numel() == R * D / 2 && s.numel() == R * D / 2 && p.numel() == R,
              "decode_step: one position, block-table row and cos/sin per row");
  const int64_t NB = t.size(1);
  const Batch batch{R, H, Hkv, D, BS, NB, p.data_ptr<int64_t>(), t.data_ptr<int64_t>(), c.data_ptr<float>(),
                    s.data_ptr<float>()};
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(batch.pos[r] >= 0 && batch.pos[r] / BS < NB, "decode_step: position ", batch.pos[r],
                " is outside the block table's ", NB, " blocks of ", BS);
    for (int64_t b = 0; b <= batch.pos[r] / BS; ++b)
      TORCH_CHECK(batch.table[r * NB + b] >= 0 && batch.table[r * NB + b] < N, "decode_step: block ",
                  batch.table[r * NB + b], " is outside the pool of ", N, " blocks");
  }
  const int64_t width = (H + 2 * Hkv) * D;
  const float* final_norm = nullptr;
  std::vector<Tensor> norms;  // norm weights in float32 (16-bit models' converted here, each step)
  const std::vector<Layer> layers = layers_of(params, parts, L, dim, H * D, width, final_norm, norms);

  int64_t hidden = 0;
  for (const Layer& layer : layers) hidden = std::max(hidden, layer.w13.N / 2);
  std::vector<float> xn(R * dim), qkv(R * width), q_rot(R * H * D), att(R * H * D), g(R * 2 * hidden),
      act(R * hidden);
  float* hp = h.data_ptr<float>();
  const float e = static_cast<float>(eps);
  for (int64_t l = 0; l < L; ++l) {
    const Layer& layer = layers[l];
    rms_norm(hp, layer.attention_norm, R, dim, e, xn.data());
    layer.qkv.apply(xn.data(), R, qkv.data(), false);
    switch (k0.scalar_type()) {
      case at::kFloat:
        attention<Plain<F32>>(qkv.data(), k_caches[l].data_ptr<float>(), v_caches[l].data_ptr<float>(), batch,
                              q_rot.data(), att.data());
        break;
      case at::kHalf:
        attention<Plain<F16>>(qkv.data(), k_caches[l].data_ptr<at::Half>(), v_caches[l].data_ptr<at::Half>(), batch,
                              q_rot.data(), att.data());
        break;
      case at::kBFloat16:
        attention<Plain<BF16>>(qkv.data(), k_caches[l].data_ptr<at::BFloat16>(), v_caches[l].data_ptr<at::BFloat16>(),
                               batch, q_rot.data(), att.data());
        break;
      case at::kChar:
        attention<Q8Row>(qkv.data(), k_caches[l].data_ptr<int8_t>(), v_caches[l].data_ptr<int8_t>(), batch,
                         q_rot.data(), att.data());
        break;
      default: TORCH_CHECK(false, "decode_step: unsupported cache dtype ", k0.scalar_type());
    }
    layer.wo.apply(att.data(), R, hp, true);
    rms_norm(hp, layer.ffn_norm, R, dim, e, xn.data());
    const int64_t hl = layer.w13.N / 2;
    layer.w13.apply(xn.data(), R, g.data(), false);
    silu_mul(g.data(), R, hl, act.data());
    layer.w2.apply(act.data(), R, hp, true);
  }
  Tensor out = at::empty_like(h);
  rms_norm(hp, final_norm, R, dim, e, out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY(llamaforge, m) {
  m.def("linear(Tensor x, Tensor w, Tensor? scales=None) -> Tensor");
  m.def("gguf_linear_reference(Tensor x, Tensor w, Tensor info) -> Tensor");
  m.def(
      "decode_step(Tensor x, Tensor cos, Tensor sin, Tensor positions, Tensor block_table, Tensor?[] params, "
      "int[] parts, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, int n_heads, int n_kv_heads, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(llamaforge, CPU, m) {
  m.impl("linear", &linear);
  m.impl("gguf_linear_reference", &gguf_linear_reference);
  m.impl("decode_step", &decode_step);
}
