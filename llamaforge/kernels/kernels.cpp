// llamaforge native CPU kernels, registered as torch ops (torch.ops.llamaforge.*).
//
// 1. Small-M matmuls y[M, N] = x[M, K] @ W[N, K]^T for every weight format llamaforge stores: float32,
//    float16, bfloat16, int8 per-row scale, 4-bit groups, GGUF Q8_0 blocks. Decoding reads every weight
//    once per token, so these stream the weights once per call (the few rows of x reuse each weight row
//    from L1) and accumulate in float32. Float and int8 weights are converted to float32 in registers;
//    4-bit and Q8_0 weights meet activations rounded to int16 per 32 columns (integer madds: see below).
// 2. Fused decode-step pieces: RMSNorm, SiLU(a) * b, and single-query attention with RoPE and the KV-cache
//    write, each one op instead of ~10 small torch ops. Their math is llamaforge/model.py's (tested there).
//
// AVX2 + FMA (+ F16C) intrinsics under __AVX2__; elsewhere plain loops that compilers vectorize.
// Threads: at::parallel_for, i.e. torch's own OpenMP pool.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

using at::Tensor;

// Rows of W per task: at least ~32K weights so that a thread's share is worth waking it for.
int64_t row_grain(int64_t K) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1)); }

Tensor as_float_rows(const Tensor& x, int64_t K) {
  return x.reshape({-1, K}).to(at::kFloat).contiguous();
}

Tensor shaped_output(const Tensor& y, const Tensor& x, int64_t N) {
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return y.view(sizes).to(x.scalar_type());
}

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

// out[m] = dot(x[m, :K], w[:K]) for MT rows of x (row stride ldx). One pass over w for all MT rows;
// with few rows, several accumulators per row hide the FMA latency.
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

// y[m, n] = scale[n] * dot(x[m], w[n]) (scale 1 when row_scale is null).
template <class W>
void rows_kernel(const float* x, int64_t M, int64_t K, const typename W::T* w, int64_t N, const float* row_scale,
                 float* y) {
  at::parallel_for(0, N, row_grain(K), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const typename W::T* wn = w + n * K;
      const float s = row_scale ? row_scale[n] : 1.f;
      for_row_chunks(M, [&]<int MT>(int64_t m) {
        float out[MT];
        dot_rows<W, MT>(x + m * K, K, wn, K, out);
        for (int i = 0; i < MT; ++i) y[(m + i) * N + n] = out[i] * s;
      });
    }
  });
}

Tensor linear_float(const Tensor& x, const Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "linear_float: weight must be a contiguous [N, K] matrix");
  const int64_t N = w.size(0), K = w.size(1);
  Tensor xf = as_float_rows(x, K);
  const int64_t M = xf.size(0);
  Tensor y = at::empty({M, N}, xf.options());
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (w.scalar_type()) {
    case at::kFloat: rows_kernel<F32>(xp, M, K, w.data_ptr<float>(), N, nullptr, yp); break;
    case at::kHalf: rows_kernel<F16>(xp, M, K, w.data_ptr<at::Half>(), N, nullptr, yp); break;
    case at::kBFloat16: rows_kernel<BF16>(xp, M, K, w.data_ptr<at::BFloat16>(), N, nullptr, yp); break;
    default: TORCH_CHECK(false, "linear_float: unsupported weight dtype ", w.scalar_type());
  }
  return shaped_output(y, x, N);
}

Tensor linear_int8(const Tensor& x, const Tensor& q, const Tensor& scales) {
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == at::kChar, "linear_int8: qweight int8 [N, K]");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == q.size(0),
              "linear_int8: scales float32 [N]");
  const int64_t N = q.size(0), K = q.size(1);
  Tensor xf = as_float_rows(x, K);
  const int64_t M = xf.size(0);
  Tensor y = at::empty({M, N}, xf.options());
  rows_kernel<I8>(xf.data_ptr<float>(), M, K, q.data_ptr<int8_t>(), N, scales.data_ptr<float>(), y.data_ptr<float>());
  return shaped_output(y, x, N);
}

// 4-bit groups -------------------------------------------------------------------------------------------
// Codes: uint8 [N, K/2], byte j = column 2j (low nibble) | column 2j+1 (high nibble). scale_bias: float32
// [N, 2, K/group]: per group s and b = zero - 8 s, so that w = q * s + b and
// dot(x_g, w_g) = s * dot(x_g, q_g) + b * sum(x_g).
// dot(x_g, q_g) is computed in integers: each 32 columns of x are rounded to int16 with their own scale
// (relative error < 2e-5 of the chunk's largest value, far below bfloat16's 4e-3), so that 16 codes
// times 16 activations take one madd instead of float conversions. The int16 copy of x is permuted per
// 32 columns (even columns, then odd ones) to match the nibble order after a plain mask/shift.
struct Int16Rows {
  std::vector<int16_t> q;   // [M, K], permuted per 32 columns
  std::vector<float> scale; // [M, K/32]
  std::vector<float> sum;   // [M, K/group]: exact float sums of x per group, for the bias term
};

Int16Rows quantize_rows(const float* x, int64_t M, int64_t K, int64_t group, bool pair_order = true) {
  Int16Rows r{std::vector<int16_t>(M * K), std::vector<float>(M * K / 32), std::vector<float>(M * K / group, 0.f)};
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < K; c += 32) {
      const float* xc = x + m * K + c;
      float mx = 0.f, sum = 0.f;
      for (int i = 0; i < 32; ++i) mx = std::max(mx, std::fabs(xc[i])), sum += xc[i];
      r.sum[(m * K + c) / group] += sum;
      int16_t* qc = r.q.data() + m * K + c;
      if (!std::isfinite(sum) || !std::isfinite(mx)) {  // NaN/inf in x: a NaN scale makes the outputs NaN, as
        r.scale[(m * K + c) / 32] = std::nanf("");      // a float matmul's would be (no int16 rounding of it)
        std::fill(qc, qc + 32, int16_t{0});
        continue;
      }
      const float inv = mx > 0.f ? 32767.f / mx : 0.f;
      r.scale[(m * K + c) / 32] = mx / 32767.f;
      for (int i = 0; i < 32; ++i) {
        const int j = pair_order ? (i < 16 ? 2 * i : 2 * (i - 16) + 1) : i;
        qc[i] = static_cast<int16_t>(std::nearbyint(xc[j] * inv));
      }
    }
  return r;
}

// out[r] = dot(x row m, w row r) for R consecutive rows of codes q [R, K/2] and their scale_bias sb [R, 2, K/group]:
// the rows share each load of x.
template <int R>
inline void int4_rows(const Int16Rows& xr, int64_t m, int64_t K, int gshift, const uint8_t* q, const float* sb,
                      float* out) {
  const int64_t nc = K / 32, ng = nc >> gshift;
  const int16_t* xq = xr.q.data() + m * K;
  const float* xs = xr.scale.data() + m * nc;
  float res[R] = {};
#ifdef __AVX2__
  const __m128i low4 = _mm_set1_epi8(0x0F);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < nc; ++c) {
    const __m256i* xc = reinterpret_cast<const __m256i*>(xq + c * 32);
    const __m256i x0 = _mm256_loadu_si256(xc), x1 = _mm256_loadu_si256(xc + 1);
    const __m256 xscale = _mm256_broadcast_ss(xs + c);
    for (int r = 0; r < R; ++r) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + r * (K / 2) + c * 16));
      const __m256i lo = _mm256_cvtepu8_epi16(_mm_and_si128(b, low4));
      const __m256i hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), low4));
      const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(lo, x0), _mm256_madd_epi16(hi, x1));
      const __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(p), xscale);                     // activation scale
      acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(sb + r * 2 * ng + (c >> gshift)), t, acc[r]);  // weight scale
    }
  }
  for (int r = 0; r < R; ++r) res[r] = hsum(acc[r]);
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
  const float* xsum = xr.sum.data() + m * ng;
  for (int r = 0; r < R; ++r) {
    float bias = 0.f;
    const float* b = sb + r * 2 * ng + ng;
#pragma omp simd reduction(+ : bias)
    for (int64_t g = 0; g < ng; ++g) bias += b[g] * xsum[g];
    out[r] = res[r] + bias;
  }
}

Tensor linear_int4(const Tensor& x, const Tensor& q, const Tensor& scale_bias, int64_t group) {
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == at::kByte, "linear_int4: qweight uint8 [N, K/2]");
  const int64_t N = q.size(0), K = q.size(1) * 2;
  int gshift = 0;
  while ((int64_t{32} << gshift) < group) ++gshift;
  TORCH_CHECK((int64_t{32} << gshift) == group && K % group == 0, "linear_int4: group must be 32 * 2^i and divide K");
  TORCH_CHECK(scale_bias.scalar_type() == at::kFloat && scale_bias.is_contiguous() &&
                  scale_bias.numel() == N * 2 * (K / group),
              "linear_int4: scale_bias float32 [N, 2, K/group]");
  Tensor xf = as_float_rows(x, K);
  const int64_t M = xf.size(0), ng = K / group;
  const Int16Rows xr = quantize_rows(xf.data_ptr<float>(), M, K, group);
  Tensor y = at::empty({M, N}, xf.options());
  const float* sb = scale_bias.data_ptr<float>();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, row_grain(K), [&](int64_t n0, int64_t n1) {
    float out[4];
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4)
      for (int64_t m = 0; m < M; ++m) {  // the rows' codes stay in L1 across the rows of x
        int4_rows<4>(xr, m, K, gshift, qp + n * (K / 2), sb + n * 2 * ng, out);
        for (int r = 0; r < 4; ++r) yp[m * N + n + r] = out[r];
      }
    for (; n < n1; ++n)
      for (int64_t m = 0; m < M; ++m) {
        int4_rows<1>(xr, m, K, gshift, qp + n * (K / 2), sb + n * 2 * ng, out);
        yp[m * N + n] = out[0];
      }
  });
  return shaped_output(y, x, N);
}

// GGUF Q8_0 in BlockInt8Linear's layout: qweight int8 [K/32, N, 32], scales float32 [K/32, N]. Rows are taken
// in tiles whose blocks are contiguous in memory; each row keeps a vector accumulator across blocks.
// Activations are rounded to int16 per 32 columns as for 4-bit weights, so a block is two madds.
constexpr int64_t Q8_TILE = 64;

void q8_0_tile(const Int16Rows& xr, int64_t m, int64_t K, const int8_t* q, const float* scales, int64_t N,
               int64_t t0, int64_t t1, float* y) {
  const int64_t nb = K / 32;
  const int16_t* xq = xr.q.data() + m * K;
  const float* xs = xr.scale.data() + m * nb;
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
  for (int64_t n = t0; n < t1; ++n) y[n] = hsum(acc[n - t0]);
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
  for (int64_t n = t0; n < t1; ++n) y[n] = acc[n - t0];
#endif
}

Tensor linear_q8_0(const Tensor& x, const Tensor& q, const Tensor& scales) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && q.scalar_type() == at::kChar && q.size(2) == 32,
              "linear_q8_0: qweight int8 [K/32, N, 32]");
  const int64_t nb = q.size(0), N = q.size(1), K = nb * 32;
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == nb * N,
              "linear_q8_0: scales float32 [K/32, N]");
  Tensor xf = as_float_rows(x, K);
  const int64_t M = xf.size(0);
  const Int16Rows xr = quantize_rows(xf.data_ptr<float>(), M, K, 32, /*pair_order=*/false);
  Tensor y = at::empty({M, N}, xf.options());
  const float* sp = scales.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(Q8_TILE, row_grain(K)), [&](int64_t n0, int64_t n1) {
    for (int64_t t0 = n0; t0 < n1; t0 += Q8_TILE)
      for (int64_t m = 0; m < M; ++m) q8_0_tile(xr, m, K, qp, sp, N, t0, std::min(n1, t0 + Q8_TILE), yp + m * N);
  });
  return shaped_output(y, x, N);
}

// Fused decode-step pieces (float32 activations) ---------------------------------------------------------
// model.RMSNorm: x / sqrt(mean(x^2) + eps) * weight, per row of x [R, D].
Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  const int64_t D = x.size(-1);
  Tensor xf = as_float_rows(x, D);
  Tensor wf = weight.to(at::kFloat).contiguous();
  Tensor y = at::empty_like(xf);
  const float *xp = xf.data_ptr<float>(), *wp = wf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < xf.size(0); ++r) {
    const float* xr = xp + r * D;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < D; ++i) ss += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(ss / D + static_cast<float>(eps));
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) yp[r * D + i] = xr[i] * inv * wp[i];
  }
  return y.view(x.sizes());
}

// SwiGLU's gate: g [R, 2H] -> silu(g[:, :H]) * g[:, H:].
Tensor silu_mul(const Tensor& g) {
  const int64_t H2 = g.size(-1), H = H2 / 2;
  Tensor gf = as_float_rows(g, H2);
  const int64_t R = gf.size(0);
  Tensor y = at::empty({R, H}, gf.options());
  const float* gp = gf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) {
    const float *a = gp + r * H2, *b = a + H;
    float* out = yp + r * H;
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
  auto sizes = g.sizes().vec();
  sizes.back() = H;
  return y.view(sizes);
}

// Softmax attention of one query q [D] over len cached keys/values [len, D] (element format W).
template <class W>
void attend_one(const float* q, const typename W::T* kc, const typename W::T* vc, int64_t len, int64_t D,
                float* scores, float* y) {
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  float mx = -INFINITY, total = 0.f;
#ifdef __AVX2__
  if (D % 8 == 0 && D <= 256) {
    int64_t j = 0;
    for (; j + 4 <= len; j += 4) {  // four keys at a time: independent FMA chains, one combined reduction
      const typename W::T* kj = kc + j * D;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        a0 = _mm256_fmadd_ps(qv, W::load8(kj + d), a0);
        a1 = _mm256_fmadd_ps(qv, W::load8(kj + D + d), a1);
        a2 = _mm256_fmadd_ps(qv, W::load8(kj + 2 * D + d), a2);
        a3 = _mm256_fmadd_ps(qv, W::load8(kj + 3 * D + d), a3);
      }
      const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
      const __m128 dots = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
      _mm_storeu_ps(scores + j, _mm_mul_ps(dots, _mm_set1_ps(scale)));
    }
    for (; j < len; ++j) {
      const typename W::T* kj = kc + j * D;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), W::load8(kj + d), acc);
      scores[j] = hsum(acc) * scale;
    }
    for (j = 0; j < len; ++j) mx = std::max(mx, scores[j]);
    j = 0;
    __m256 sum = _mm256_setzero_ps();
    for (; j + 8 <= len; j += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), _mm256_set1_ps(mx)));
      _mm256_storeu_ps(scores + j, e);
      sum = _mm256_add_ps(sum, e);
    }
    total = hsum(sum);
    for (; j < len; ++j) total += (scores[j] = std::exp(scores[j] - mx));
    const __m256 inv = _mm256_set1_ps(1.f / total);
    int64_t d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) {  // 64 columns at a time: 8 accumulators that stay in registers
      __m256 acc[8];
      for (int c = 0; c < 8; ++c) acc[c] = _mm256_setzero_ps();
      for (j = 0; j < len; ++j) {
        const __m256 p = _mm256_broadcast_ss(scores + j);
        const typename W::T* vj = vc + j * D + d0;
        for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(p, W::load8(vj + 8 * c), acc[c]);
      }
      for (int c = 0; c < 8; ++c) _mm256_storeu_ps(y + d0 + 8 * c, _mm256_mul_ps(acc[c], inv));
    }
    for (; d0 < D; d0 += 8) {
      __m256 acc = _mm256_setzero_ps();
      for (j = 0; j < len; ++j) acc = _mm256_fmadd_ps(_mm256_broadcast_ss(scores + j), W::load8(vc + j * D + d0), acc);
      _mm256_storeu_ps(y + d0, _mm256_mul_ps(acc, inv));
    }
    return;
  }
#endif
  for (int64_t j = 0; j < len; ++j) {
    const typename W::T* kj = kc + j * D;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) s += q[d] * W::get(kj + d);
    scores[j] = s * scale;
    mx = std::max(mx, scores[j]);
  }
  for (int64_t j = 0; j < len; ++j) total += (scores[j] = std::exp(scores[j] - mx));
  for (int64_t d = 0; d < D; ++d) y[d] = 0.f;
  for (int64_t j = 0; j < len; ++j) {
    const typename W::T* vj = vc + j * D;
    const float p = scores[j] / total;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) y[d] += p * W::get(vj + d);
  }
}

// One query per sequence: qkv [B, (H + 2 Hkv) D] (q, k, v heads), cos/sin [B, D/2] of its position.
// RoPE (model.apply_rope: adjacent pairs) on q and k, k/v written to cache[rows[b], :, positions[b]],
// then softmax attention over cache slots 0..positions[b] (the causal mask within the first cache_len
// slots). Returns y [B, H D] in float32.
template <class W>
void decode_attention_impl(const float* qkv, const float* cs, const float* sn, typename W::T* kc, typename W::T* vc, const int64_t* pos,
                           const int64_t* rows, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t S,
                           int64_t cache_len, float* q_rot, float* y) {
  using T = typename W::T;
  const int64_t width = (H + 2 * Hkv) * D, half = D / 2;
  for (int64_t b = 0; b < B; ++b) {
    const float *src = qkv + b * width, *c = cs + b * half, *s = sn + b * half;
    const int64_t p = pos[b], r = rows[b];
    for (int64_t h = 0; h < H + Hkv; ++h) {
      float* dst = h < H ? q_rot + (b * H + h) * D : nullptr;
      T* kdst = h < H ? nullptr : kc + ((r * Hkv + (h - H)) * S + p) * D;
      for (int64_t i = 0; i < half; ++i) {
        const float x0 = src[h * D + 2 * i], x1 = src[h * D + 2 * i + 1];
        const float o0 = x0 * c[i] - x1 * s[i], o1 = x0 * s[i] + x1 * c[i];
        if (dst) {
          dst[2 * i] = o0, dst[2 * i + 1] = o1;
        } else {
          kdst[2 * i] = static_cast<T>(o0), kdst[2 * i + 1] = static_cast<T>(o1);
        }
      }
    }
    for (int64_t h = 0; h < Hkv; ++h) {
      T* vdst = vc + ((r * Hkv + h) * S + p) * D;
      for (int64_t d = 0; d < D; ++d) vdst[d] = static_cast<T>(src[(H + Hkv + h) * D + d]);
    }
  }
  const int64_t G = H / Hkv;
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(static_cast<size_t>(cache_len));
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, kvh = h / G;
      const int64_t len = std::min(pos[b] + 1, cache_len);
      const int64_t off = (rows[b] * Hkv + kvh) * S * D;
      attend_one<W>(q_rot + i * D, kc + off, vc + off, len, D, scores.data(), y + i * D);
    }
  });
}

Tensor decode_attention(const Tensor& qkv, const Tensor& cos, const Tensor& sin, Tensor& k_cache, Tensor& v_cache,
                        const Tensor& positions, const Tensor& rows, int64_t n_heads, int64_t n_kv_heads,
                        int64_t cache_len) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.scalar_type() == v_cache.scalar_type() && k_cache.sizes() == v_cache.sizes(),
              "decode_attention: k/v caches must be contiguous [max_batch, Hkv, S, D] of one dtype");
  const int64_t D = k_cache.size(3), S = k_cache.size(2), H = n_heads, Hkv = n_kv_heads;
  TORCH_CHECK(k_cache.size(1) == Hkv && H % Hkv == 0 && D % 2 == 0, "decode_attention: head counts do not fit");
  Tensor x = as_float_rows(qkv, (H + 2 * Hkv) * D);
  const int64_t B = x.size(0);
  Tensor c = cos.to(at::kFloat).contiguous(), s = sin.to(at::kFloat).contiguous();
  Tensor p = positions.to(at::kLong).contiguous(), r = rows.to(at::kLong).contiguous();
  TORCH_CHECK(c.numel() == B * D / 2 && s.numel() == B * D / 2 && p.numel() == B && r.numel() == B,
              "decode_attention: one position (and cos/sin) per sequence");
  TORCH_CHECK(cache_len >= 1 && cache_len <= S, "decode_attention: cache_len out of range");
  const int64_t* pp = p.data_ptr<int64_t>();
  const int64_t* rp = r.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(pp[b] >= 0 && pp[b] < S && rp[b] >= 0 && rp[b] < k_cache.size(0), "decode_attention: position or row out of range");
  Tensor q_rot = at::empty({B, H * D}, x.options());
  Tensor y = at::empty({B, H * D}, x.options());
  auto run = [&]<class W>() {
    decode_attention_impl<W>(x.data_ptr<float>(), c.data_ptr<float>(), s.data_ptr<float>(),
                             k_cache.data_ptr<typename W::T>(), v_cache.data_ptr<typename W::T>(), pp, rp, B, H, Hkv, D,
                             S, cache_len, q_rot.data_ptr<float>(), y.data_ptr<float>());
  };
  switch (k_cache.scalar_type()) {
    case at::kFloat: run.template operator()<F32>(); break;
    case at::kHalf: run.template operator()<F16>(); break;
    case at::kBFloat16: run.template operator()<BF16>(); break;
    default: TORCH_CHECK(false, "decode_attention: unsupported cache dtype ", k_cache.scalar_type());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(llamaforge, m) {
  m.def("linear_float(Tensor x, Tensor w) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor qweight, Tensor scale_bias, int group) -> Tensor");
  m.def("linear_q8_0(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor g) -> Tensor");
  m.def(
      "decode_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor positions, Tensor rows, int n_heads, int n_kv_heads, int cache_len) -> Tensor");
}

TORCH_LIBRARY_IMPL(llamaforge, CPU, m) {
  m.impl("linear_float", &linear_float);
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_int4", &linear_int4);
  m.impl("linear_q8_0", &linear_q8_0);
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("decode_attention", &decode_attention);
}
