// GGUF (ggml) block formats multiplied as stored, the way llama.cpp's CPU backend runs them: the activations are
// rounded to 8 bits per 32 columns (a scale each), integer dot products per block, float scales after.
//
// Activations: x = dx * q with int8 q and one scale dx per 32 columns for the 32-weight types (llama.cpp's Q8_0),
// per 256 for the K-quants (its Q8_K, so that their integer sub-block scales apply before any float arithmetic).
//
// Every type is described once, as "canonical groups": 256 weights (one K-quant super-block, or 8 blocks of a
// 32-weight type) become unsigned 8-bit codes u and, per sub-block j of 16 or 32 weights, a float scale a[j] and
// min b[j], so that w = a[j] (u - Z) + b[j] with the type's integer offset Z (8 for Q4_0, 32 for Q6_K, 128 for
// the signed codes of Q8_0 and IQ4_*, stored as code + 128; 0 for the types with mins). A sub-block's dot product
// is then a[j] dx (sum(u q) - Z sum(q)) + b[j] dx sum(q): the offset applies to the integer sums, exactly, as
// llama.cpp computes it, so that results agree with llama.cpp's to float rounding.
//
// Three kernels:
// - decode (few rows of x, memory-bound; AVX2): each weight row is streamed once, its blocks unpacked into
//   registers and multiplied with every row of x: per block of the 32-weight types an integer dot product and
//   one float multiply-add; per K-quant block integer products weighted by the sub-block scales, one float
//   multiply-add for the block (and one for the mins);
// - GEMM (prefill, many rows of x; AVX-512 VNNI): 16 weight rows are unpacked into a canonical panel whose
//   vector lanes are the 16 rows (4 codes each), then every row of x is multiplied with one vpdpbusd per 4
//   columns, x's 4 codes broadcast: the unpacking is paid once per panel, not once per row of x;
// - reference: plain loops over the canonical form, on any CPU (the vector kernels are tested against it).

#include "blocks.h"
#include "parallel.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LF_AVX2 1
#endif
#if defined(LF_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512VNNI__)
#define LF_VNNI 1
#endif

namespace llamaforge {
namespace {

constexpr int64_t QK = 256;  // weights per canonical group

// ggml's type ids.
enum : int64_t {
  T_Q4_0 = 2,
  T_Q4_1 = 3,
  T_Q5_0 = 6,
  T_Q5_1 = 7,
  T_Q8_0 = 8,
  T_Q2_K = 10,
  T_Q3_K = 11,
  T_Q4_K = 12,
  T_Q5_K = 13,
  T_Q6_K = 14,
  T_IQ4_NL = 20,
  T_IQ4_XS = 23,
};

inline float half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#ifdef __F16C__
  return _cvtsh_ss(h);  // one instruction; the portable conversion is a dozen
#else
  return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
}

inline uint32_t u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// IQ4_NL / IQ4_XS: the 16 values a 4-bit code stands for (a non-uniform grid, from the GGUF specification).
constexpr int8_t IQ4_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// Q4_K / Q5_K: the 8 six-bit scales and mins packed in 12 bytes.
inline void k4_scales(const uint8_t* s, uint8_t sc[8], uint8_t mn[8]) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 63, mn[j] = s[j + 4] & 63;
    sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
    mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
  }
}

// Q3_K: the 16 six-bit scales packed in 12 bytes (low nibbles in bytes 0..7, high bit pairs in 8..11), minus 32.
inline void k3_scales(const uint8_t* s, int sc[16]) {
  for (int t = 0; t < 16; ++t) {
    const int lo = t < 8 ? (s[t] & 0x0F) : (s[t - 8] >> 4);
    const int hi = (s[8 + t % 4] >> (2 * (t / 4))) & 3;
    sc[t] = (lo | (hi << 4)) - 32;
  }
}

// Types ---------------------------------------------------------------------------------------------------------
// BLOCK weights per block, BYTES per block, SB weights per sub-block; SIGNED: codes are signed int8 values.
// canon(p, nb, u, a, b): the canonical group at p (nb blocks of a 32-weight type, one K-quant block), plain C++.
struct Q4_0 {
  static constexpr int64_t BLOCK = 32, BYTES = 18;
  static constexpr int SB = 32;
  static constexpr bool MIN = false;
  static constexpr bool SIGNED = false;
  static constexpr int Z = 8;
  static void canon(const uint8_t* p, int nb, uint8_t* u, float* a, float* b) {
    for (int v = 0; v < nb; ++v, p += BYTES) {
      for (int i = 0; i < 16; ++i) u[32 * v + i] = p[2 + i] & 15, u[32 * v + 16 + i] = p[2 + i] >> 4;
      a[v] = half(p), b[v] = 0.f;
    }
  }
};
struct Q4_1 {
  static constexpr int64_t BLOCK = 32, BYTES = 20;
  static constexpr int SB = 32;
  static constexpr bool MIN = true;
  static constexpr bool SIGNED = false;
  static constexpr int Z = 0;
  static void canon(const uint8_t* p, int nb, uint8_t* u, float* a, float* b) {
    for (int v = 0; v < nb; ++v, p += BYTES) {
      for (int i = 0; i < 16; ++i) u[32 * v + i] = p[4 + i] & 15, u[32 * v + 16 + i] = p[4 + i] >> 4;
      a[v] = half(p), b[v] = half(p + 2);
    }
  }
};
struct Q5_0 {
  static constexpr int64_t BLOCK = 32, BYTES = 22;
  static constexpr int SB = 32;
  static constexpr bool MIN = false;
  static constexpr bool SIGNED = false;
  static constexpr int Z = 16;
  static void canon(const uint8_t* p, int nb, uint8_t* u, float* a, float* b) {
    for (int v = 0; v < nb; ++v, p += BYTES) {
      const uint32_t qh = u32(p + 2);
      for (int i = 0; i < 16; ++i) {
        u[32 * v + i] = (p[6 + i] & 15) | (((qh >> i) & 1) << 4);
        u[32 * v + 16 + i] = (p[6 + i] >> 4) | (((qh >> (16 + i)) & 1) << 4);
      }
      a[v] = half(p), b[v] = 0.f;
    }
  }
};
struct Q5_1 {
  static constexpr int64_t BLOCK = 32, BYTES = 24;
  static constexpr int SB = 32;
  static constexpr bool MIN = true;
  static constexpr bool SIGNED = false;
  static constexpr int Z = 0;
  static void canon(const uint8_t* p, int nb, uint8_t* u, float* a, float* b) {
    for (int v = 0; v < nb; ++v, p += BYTES) {
      const uint32_t qh = u32(p + 4);
      for (int i = 0; i < 16; ++i) {
        u[32 * v + i] = (p[8 + i] & 15) | (((qh >> i) & 1) << 4);
        u[32 * v + 16 + i] = (p[8 + i] >> 4) | (((qh >> (16 + i)) & 1) << 4);
      }
      a[v] = half(p), b[v] = half(p + 2);
    }
  }
};
struct Q8_0 {
  static constexpr int64_t BLOCK = 32, BYTES = 34;
  static constexpr int SB = 32;
  static constexpr bool MIN = false;
  static constexpr bool SIGNED = true;
  static constexpr int Z = 128;
  static void canon(const uint8_t* p, int nb, uint8_t* u, float* a, float* b) {
    for (int v = 0; v < nb; ++v, p += BYTES) {
      for (int i = 0; i < 32; ++i) u[32 * v + i] = static_cast<uint8_t>(p[2 + i] ^ 0x80);  // int8 + 128
      a[v] = half(p), b[v] = 0.f;
    }
  }
};
struct IQ4_NL {
  static constexpr int64_t BLOCK = 32, BYTES = 18;
  static constexpr int SB = 32;
  static constexpr bool MIN = false;
  static constexpr bool SIGNED = true;
  static constexpr int Z = 128;
  static void canon(const uint8_t* p, int nb, uint8_t* u, float* a, float* b) {
    for (int v = 0; v < nb; ++v, p += BYTES) {
      for (int i = 0; i < 16; ++i) {
        u[32 * v + i] = static_cast<uint8_t>(IQ4_VALUES[p[2 + i] & 15] + 128);
        u[32 * v + 16 + i] = static_cast<uint8_t>(IQ4_VALUES[p[2 + i] >> 4] + 128);
      }
      a[v] = half(p), b[v] = 0.f;
    }
  }
};
// Q2_K: scales[16] (4-bit scale | 4-bit min per 16 weights), qs[64] (2 bits each), d, dmin.
struct Q2_K {
  static constexpr int64_t BLOCK = 256, BYTES = 84;
  static constexpr int SB = 16;
  static constexpr bool SIGNED = false;
  static constexpr int Z = 0;
  static constexpr bool MIN = true;
  static void scales(const uint8_t* p, float* a, float* b) {
    const float d = half(p + 80), dmin = half(p + 82);
    for (int t = 0; t < 16; ++t) a[t] = d * (p[t] & 15), b[t] = -dmin * (p[t] >> 4);
  }
  static void canon(const uint8_t* p, int, uint8_t* u, float* a, float* b) {
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 4; ++j)
        for (int l = 0; l < 32; ++l) u[128 * h + 32 * j + l] = (p[16 + 32 * h + l] >> (2 * j)) & 3;
    scales(p, a, b);
  }
};
// Q3_K: hmask[32] (third bits), qs[64] (low 2 bits), scales[12] (16 six-bit), d; w = d (sc - 32) (q - 4 (1 - h)).
struct Q3_K {
  static constexpr int64_t BLOCK = 256, BYTES = 110;
  static constexpr int SB = 16;
  static constexpr bool SIGNED = false;
  static constexpr int Z = 4;
  static constexpr bool MIN = false;
  static void scales(const uint8_t* p, float* a, float* b) {
    const float d = half(p + 108);
    int sc[16];
    k3_scales(p + 96, sc);
    for (int t = 0; t < 16; ++t) a[t] = d * static_cast<float>(sc[t]), b[t] = 0.f;
  }
  static void canon(const uint8_t* p, int, uint8_t* u, float* a, float* b) {
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 4; ++j)
        for (int l = 0; l < 32; ++l)
          u[128 * h + 32 * j + l] = ((p[32 + 32 * h + l] >> (2 * j)) & 3) | (((p[l] >> (4 * h + j)) & 1) << 2);
    scales(p, a, b);
  }
};
// Q4_K: d, dmin, scales[12] (8 six-bit scales and mins), qs[128]; each 32 bytes: two sub-blocks (low, high nibbles).
struct Q4_K {
  static constexpr int64_t BLOCK = 256, BYTES = 144;
  static constexpr int SB = 32;
  static constexpr bool SIGNED = false;
  static constexpr int Z = 0;
  static constexpr bool MIN = true;
  static void scales(const uint8_t* p, float* a, float* b) {
    const float d = half(p), dmin = half(p + 2);
    uint8_t sc[8], mn[8];
    k4_scales(p + 4, sc, mn);
    for (int t = 0; t < 8; ++t) a[t] = d * sc[t], b[t] = -dmin * mn[t];
  }
  static void canon(const uint8_t* p, int, uint8_t* u, float* a, float* b) {
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < 32; ++l) u[64 * j + l] = p[16 + 32 * j + l] & 15, u[64 * j + 32 + l] = p[16 + 32 * j + l] >> 4;
    scales(p, a, b);
  }
};
// Q5_K: as Q4_K plus qh[32]: bit t of qh[l] is the fifth bit of weight l of sub-block t.
struct Q5_K {
  static constexpr int64_t BLOCK = 256, BYTES = 176;
  static constexpr int SB = 32;
  static constexpr bool SIGNED = false;
  static constexpr int Z = 0;
  static constexpr bool MIN = true;
  static void scales(const uint8_t* p, float* a, float* b) { Q4_K::scales(p, a, b); }  // the same 12 bytes
  static void canon(const uint8_t* p, int, uint8_t* u, float* a, float* b) {
    const uint8_t *qh = p + 16, *qs = p + 48;
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < 32; ++l) {
        u[64 * j + l] = (qs[32 * j + l] & 15) | (((qh[l] >> (2 * j)) & 1) << 4);
        u[64 * j + 32 + l] = (qs[32 * j + l] >> 4) | (((qh[l] >> (2 * j + 1)) & 1) << 4);
      }
    scales(p, a, b);
  }
};
// Q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), scales int8[16], d; w = d sc (q - 32).
struct Q6_K {
  static constexpr int64_t BLOCK = 256, BYTES = 210;
  static constexpr int SB = 16;
  static constexpr bool SIGNED = false;
  static constexpr int Z = 32;
  static constexpr bool MIN = false;
  static void scales(const uint8_t* p, float* a, float* b) {
    const float d = half(p + 208);
    for (int t = 0; t < 16; ++t) a[t] = d * static_cast<float>(static_cast<int8_t>(p[192 + t])), b[t] = 0.f;
  }
  static void canon(const uint8_t* p, int, uint8_t* u, float* a, float* b) {
    for (int h = 0; h < 2; ++h) {
      const uint8_t *ql = p + 64 * h, *qh = p + 128 + 32 * h;
      uint8_t* y = u + 128 * h;
      for (int l = 0; l < 32; ++l) {
        y[l] = (ql[l] & 15) | ((qh[l] & 3) << 4);
        y[l + 32] = (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4);
        y[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
        y[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
      }
    }
    scales(p, a, b);
  }
};
// IQ4_XS: d, scales_h (2 high bits of 8 six-bit scales), scales_l[4] (low nibbles), qs[128] (IQ4_NL codes).
struct IQ4_XS {
  static constexpr int64_t BLOCK = 256, BYTES = 136;
  static constexpr int SB = 32;
  static constexpr bool SIGNED = true;
  static constexpr int Z = 128;
  static constexpr bool MIN = false;
  static void scales(const uint8_t* p, float* a, float* b) {
    const float d = half(p);
    const uint16_t sh = static_cast<uint16_t>(p[2] | (p[3] << 8));
    for (int t = 0; t < 8; ++t) {
      const int ls = ((p[4 + t / 2] >> (4 * (t % 2))) & 15) | (((sh >> (2 * t)) & 3) << 4);
      a[t] = d * static_cast<float>(ls - 32), b[t] = 0.f;
    }
  }
  static void canon(const uint8_t* p, int, uint8_t* u, float* a, float* b) {
    scales(p, a, b);
    for (int t = 0; t < 8; ++t) {
      const uint8_t* q = p + 8 + 16 * t;
      for (int i = 0; i < 16; ++i) {
        u[32 * t + i] = static_cast<uint8_t>(IQ4_VALUES[q[i] & 15] + 128);
        u[32 * t + 16 + i] = static_cast<uint8_t>(IQ4_VALUES[q[i] >> 4] + 128);
      }
    }
  }
};

// A row's groups: a 32-weight type has 8 blocks per group (fewer in the last one when K % 256 != 0).
template <class T>
constexpr int64_t group_bytes() {
  return T::BLOCK == 32 ? 8 * T::BYTES : T::BYTES;
}
template <class T>
inline int group_blocks(int64_t K, int64_t g) {
  return T::BLOCK == 32 ? static_cast<int>(std::min<int64_t>(8, K / 32 - 8 * g)) : 1;
}

// Activations ---------------------------------------------------------------------------------------------------
// Rows of x rounded to int8 with one scale per `span` columns, as llama.cpp rounds them: 32 for the 32-weight types
// (its Q8_0 blocks, whose scale is stored as float16), 256 for the K-quants (its Q8_K, a float scale: their integer
// sub-block scales then apply before any float arithmetic). Zero-padded to a multiple of 256 columns (Kp).
//   q [M, Kp]; d [M, Kp/span] the scales; bs [M, Kp/16] sums of q per 16 columns (int16; float in fbs16) and per
//   32 (s32, and negated in neg_s32; float in fbs32); bx [M, Kp/32] for the 32-weight types: the block's sum of activations d * sum(q), or, for the types
//   with a min (llama.cpp's Q8_1 activations), float16(unrounded scale * sum(q)).
struct XRows {
  int64_t M, Kp, span;
  const int8_t* q;
  const float* d;
  const int16_t* bs;
  const int32_t *s32, *neg_s32;
  const float *fbs16, *fbs32, *bx;
};

// The storage of one rounding of x (thread_local ones are reused from call to call: no allocation per step).
struct XBuffers {
  std::vector<int8_t> q;
  std::vector<int16_t> bs;
  std::vector<int32_t> s32;
  std::vector<float> f;
};

// max |x| and the sum of x over n values (the sum only to spot NaN and inf).
inline void span_stats(const float* x, int64_t n, float& mx, float& total) {
  int64_t i = 0;
  mx = 0.f, total = 0.f;
#ifdef LF_AVX2
  __m256 m = _mm256_setzero_ps(), s = _mm256_setzero_ps();
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    m = _mm256_max_ps(m, _mm256_and_ps(v, magnitude)), s = _mm256_add_ps(s, v);
  }
  alignas(32) float mv[8], sv[8];
  _mm256_store_ps(mv, m), _mm256_store_ps(sv, s);
  for (int j = 0; j < 8; ++j) mx = std::max(mx, mv[j]), total += sv[j];
#endif
  for (; i < n; ++i) mx = std::max(mx, std::fabs(x[i])), total += x[i];
}

// q[i] = round-half-even(x[i] * inv), as nearbyint under the default rounding mode (and _mm256_cvtps_epi32).
inline void round_span(const float* x, int64_t n, float inv, int8_t* q) {
  int64_t i = 0;
#ifdef LF_AVX2
  const __m256 vi = _mm256_set1_ps(inv);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (; i + 32 <= n; i += 32) {
    __m256i c[4];
    for (int j = 0; j < 4; ++j) c[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * j), vi));
    // packs work within 128-bit lanes: pack, then put the 4-byte groups back in order
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), _mm256_permutevar8x32_epi32(p, order));
  }
#endif
  for (; i < n; ++i) q[i] = static_cast<int8_t>(std::nearbyint(x[i] * inv));
}

XRows quantize_x(const float* x, int64_t M, int64_t K, int64_t span, bool q8_1, XBuffers& buf) {
  auto& [q, bs, s32, f] = buf;
  const int64_t Kp = (K + QK - 1) / QK * QK, nd = Kp / span, n16 = Kp / 16, n32 = Kp / 32;
  q.assign(M * Kp, 0), bs.assign(M * n16, 0), s32.assign(2 * M * n32, 0), f.assign(M * (nd + n16 + 2 * n32), 0.f);
  int32_t* neg_s32 = s32.data() + M * n32;
  float *d = f.data(), *fbs16 = d + M * nd, *fbs32 = fbs16 + M * n16, *bx = fbs32 + M * n32;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < K; c += span) {  // K is a multiple of 32 (the blocks); a partial last span is zero-padded
      const int64_t n = std::min(span, K - c);
      const float* xc = x + m * K + c;
      float mx, total;
      span_stats(xc, n, mx, total);
      if (!std::isfinite(total) || !std::isfinite(mx)) {  // NaN/inf in x: NaN outputs, as a float matmul gives
        d[m * nd + c / span] = std::nanf("");
        if (span == 32) bx[m * n32 + c / 32] = std::nanf("");
        continue;
      }
      const float scale = mx / 127.f, inv = mx > 0.f ? 127.f / mx : 0.f;
      d[m * nd + c / span] = span == 32 ? static_cast<float>(c10::Half(scale)) : scale;
      int8_t* qc = q.data() + m * Kp + c;
      round_span(xc, n, inv, qc);
      for (int64_t i = 0; i < n; i += 16) {
        int s = 0;
        for (int j = 0; j < 16; ++j) s += qc[i + j];
        const int64_t t = m * n16 + (c + i) / 16;
        bs[t] = static_cast<int16_t>(s), fbs16[t] = static_cast<float>(s);
        s32[t / 2] += s, neg_s32[t / 2] -= s, fbs32[t / 2] += static_cast<float>(s);
      }
      if (span == 32) {
        const float sum = fbs32[m * n32 + c / 32];
        bx[m * n32 + c / 32] = q8_1 ? static_cast<float>(c10::Half(scale * sum)) : d[m * nd + c / 32] * sum;
      }
    }
  return {M, Kp, span, q.data(), d, bs.data(), s32.data(), neg_s32, fbs16, fbs32, bx};
}

XRows quantize_x(const float* x, int64_t M, int64_t K, int64_t span, bool q8_1) {
  thread_local XBuffers buf;
  return quantize_x(x, M, K, span, q8_1, buf);
}

inline void put(float* y, float v, bool accumulate) { *y = accumulate ? *y + v : v; }

// Reference: canonical groups and plain loops (any CPU) ---------------------------------------------------------
template <class T>
void matmul_reference(const uint8_t* w, int64_t N, int64_t K, const XRows& x, float* y, int64_t ldy, bool acc) {
  const int64_t row_bytes = K / T::BLOCK * T::BYTES, groups = x.Kp / QK, nd = x.Kp / x.span, n16 = x.Kp / 16;
  parallel_rows(N, 1, [&](int64_t n0, int64_t n1) {
    uint8_t u[QK];
    float a[16], b[16];
    std::vector<float> out(x.M);
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(out.begin(), out.end(), 0.f);
      for (int64_t g = 0; g < groups; ++g) {
        std::fill(u, u + QK, 0), std::fill(a, a + 16, 0.f), std::fill(b, b + 16, 0.f);
        T::canon(w + n * row_bytes + g * group_bytes<T>(), group_blocks<T>(K, g), u, a, b);
        for (int64_t m = 0; m < x.M; ++m) {
          const int8_t* q = x.q + m * x.Kp + g * QK;
          float s = 0.f;
          for (int j = 0; j < QK / T::SB; ++j) {
            int32_t isum = 0, qsum = 0;
            for (int i = j * T::SB; i < (j + 1) * T::SB; ++i) isum += int32_t(u[i]) * q[i], qsum += q[i];
            isum -= T::Z * qsum;
            const int64_t col = g * QK + j * T::SB;
            const float dx = x.d[m * nd + col / x.span];
            if constexpr (T::BLOCK == 32) {
              s += a[j] * dx * static_cast<float>(isum) + b[j] * x.bx[m * (x.Kp / 32) + col / 32];
            } else {
              s += dx * (a[j] * static_cast<float>(isum) + b[j] * static_cast<float>(qsum));
            }
          }
          out[m] += s;
        }
      }
      (void)n16;
      for (int64_t m = 0; m < x.M; ++m) put(y + m * ldy + n, out[m], acc);
    }
  });
}

#ifdef LF_AVX2
// Codes in registers --------------------------------------------------------------------------------------------
inline __m256i nibbles32(const uint8_t* p) {  // 16 bytes -> 32 codes: the low nibbles, then the high ones
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(15));
}

inline __m256i bits32(uint32_t bits) {  // byte i = 16 if bit i is set, else 0
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int>(bits)),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i mask = _mm256_set1_epi64x(0x8040201008040201LL);
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, mask), mask), _mm256_set1_epi8(16));
}

inline __m256i iq4_lookup(__m256i codes) {
  const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(IQ4_VALUES));
  return _mm256_shuffle_epi8(_mm256_set_m128i(t, t), codes);
}

inline __m256i load256(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// The 32 codes of one block of a 32-weight type (signed values for SIGNED types).
template <class T>
inline __m256i codes32(const uint8_t* p);
template <>
inline __m256i codes32<Q4_0>(const uint8_t* p) { return nibbles32(p + 2); }
template <>
inline __m256i codes32<Q4_1>(const uint8_t* p) { return nibbles32(p + 4); }
template <>
inline __m256i codes32<Q5_0>(const uint8_t* p) { return _mm256_or_si256(nibbles32(p + 6), bits32(u32(p + 2))); }
template <>
inline __m256i codes32<Q5_1>(const uint8_t* p) { return _mm256_or_si256(nibbles32(p + 8), bits32(u32(p + 4))); }
template <>
inline __m256i codes32<Q8_0>(const uint8_t* p) { return load256(p + 2); }
template <>
inline __m256i codes32<IQ4_NL>(const uint8_t* p) { return iq4_lookup(nibbles32(p + 2)); }

// A group's 256 codes as 8 vectors in weight order (zero past the last block).
template <class T>
inline void codes(const uint8_t* p, int nb, __m256i* c) {
  static_assert(T::BLOCK == 32);
  for (int v = 0; v < 8; ++v) c[v] = v < nb ? codes32<T>(p + v * T::BYTES) : _mm256_setzero_si256();
}
template <>
inline void codes<Q2_K>(const uint8_t* p, int, __m256i* c) {
  const __m256i three = _mm256_set1_epi8(3);
  for (int h = 0; h < 2; ++h) {
    const __m256i q = load256(p + 16 + 32 * h);
    for (int j = 0; j < 4; ++j) c[4 * h + j] = _mm256_and_si256(_mm256_srli_epi16(q, 2 * j), three);
  }
}
template <>
inline void codes<Q3_K>(const uint8_t* p, int, __m256i* c) {
  const __m256i three = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
  const __m256i hm = load256(p);
  for (int h = 0; h < 2; ++h) {
    const __m256i q = load256(p + 32 + 32 * h);
    for (int j = 0; j < 4; ++j) {
      const __m256i hb = _mm256_and_si256(_mm256_srli_epi16(hm, 4 * h + j), one);
      c[4 * h + j] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 2 * j), three), _mm256_slli_epi16(hb, 2));
    }
  }
}
template <>
inline void codes<Q4_K>(const uint8_t* p, int, __m256i* c) {
  const __m256i low = _mm256_set1_epi8(15);
  for (int j = 0; j < 4; ++j) {
    const __m256i q = load256(p + 16 + 32 * j);
    c[2 * j] = _mm256_and_si256(q, low), c[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(q, 4), low);
  }
}
template <>
inline void codes<Q5_K>(const uint8_t* p, int, __m256i* c) {
  const __m256i low = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1);
  const __m256i qh = load256(p + 16);
  for (int j = 0; j < 4; ++j) {
    const __m256i q = load256(p + 48 + 32 * j);
    const __m256i h0 = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * j), one);
    const __m256i h1 = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * j + 1), one);
    c[2 * j] = _mm256_or_si256(_mm256_and_si256(q, low), _mm256_slli_epi16(h0, 4));
    c[2 * j + 1] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), low), _mm256_slli_epi16(h1, 4));
  }
}
template <>
inline void codes<Q6_K>(const uint8_t* p, int, __m256i* c) {
  const __m256i low = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(3), m12 = _mm256_set1_epi8(12),
                m48 = _mm256_set1_epi8(48);
  for (int h = 0; h < 2; ++h) {
    const __m256i l0 = load256(p + 64 * h), l1 = load256(p + 64 * h + 32), qh = load256(p + 128 + 32 * h);
    c[4 * h + 0] = _mm256_or_si256(_mm256_and_si256(l0, low), _mm256_slli_epi16(_mm256_and_si256(qh, m3), 4));
    c[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(l1, low), _mm256_slli_epi16(_mm256_and_si256(qh, m12), 2));
    c[4 * h + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low), _mm256_and_si256(qh, m48));
    c[4 * h + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low),
                                   _mm256_and_si256(_mm256_srli_epi16(qh, 2), m48));
  }
}
template <>
inline void codes<IQ4_XS>(const uint8_t* p, int, __m256i* c) {
  for (int t = 0; t < 8; ++t) c[t] = iq4_lookup(nibbles32(p + 8 + 16 * t));
}

// Q4_K / Q5_K scales and mins as two 8-byte words (the same unpacking as k4_scales, in registers).
inline void k4_scales_packed(const uint8_t* s, int64_t& sc, int64_t& mn) {
  const uint32_t u0 = u32(s), u1 = u32(s + 4), u2 = u32(s + 8);
  const uint32_t sc_hi = (u2 & 0x0f0f0f0fu) | ((u0 >> 2) & 0x30303030u);
  const uint32_t mn_hi = ((u2 >> 4) & 0x0f0f0f0fu) | ((u1 >> 2) & 0x30303030u);
  sc = static_cast<int64_t>((u0 & 0x3f3f3f3fu) | (uint64_t{sc_hi} << 32));
  mn = static_cast<int64_t>((u1 & 0x3f3f3f3fu) | (uint64_t{mn_hi} << 32));
}

inline __m128i widen8(int64_t bytes) { return _mm_cvtepu8_epi16(_mm_cvtsi64_si128(bytes)); }

inline __m256 halves8(const uint8_t* p, int64_t stride, int n) {  // n float16 values `stride` bytes apart
  auto at = [&](int i) -> int {
    uint16_t h = 0;
    if (i < n) std::memcpy(&h, p + i * stride, 2);
    return h;
  };
  const __m128i h = _mm_setr_epi16(static_cast<short>(at(0)), static_cast<short>(at(1)), static_cast<short>(at(2)),
                                   static_cast<short>(at(3)), static_cast<short>(at(4)), static_cast<short>(at(5)),
                                   static_cast<short>(at(6)), static_cast<short>(at(7)));
  return _mm256_cvtph_ps(h);
}

// GEMM packing: a group's codes and float scales a, b (natural sub-block order) --------------------------------
struct Group {
  __m256i c[8];
  alignas(32) float a[16];
  alignas(32) float b[16];
};

template <class T>
inline void unpack(const uint8_t* p, int nb, Group& g) {
  codes<T>(p, nb, g.c);
  if constexpr (T::BLOCK == 32) {
    _mm256_store_ps(g.a, halves8(p, T::BYTES, nb));
    _mm256_store_ps(g.b, T::MIN ? halves8(p + 2, T::BYTES, nb) : _mm256_setzero_ps());
  } else {
    T::scales(p, g.a, g.b);
  }
}

// Decode: weight rows streamed once, integer dot products --------------------------------------------------------
// 8-bit codes times 8-bit activations: vpmaddubsw (unsigned x signed, adjacent pairs summed into int16), then
// vpdpwssd (int16 x int16 -> int32, accumulated) weighted by the 16-bit sub-block scales of the K-quants; or
// vpdpbusd (4 products per int32 lane) for the 32-weight types, whose single scale is applied in float.
inline __m256i pairs(__m256i c, __m256i x) { return _mm256_maddubs_epi16(c, x); }  // codes <= 63: no saturation
inline __m256i pairs_signed(__m256i c, __m256i x) {  // |c| <= 128, |x| <= 127: no saturation
  return _mm256_maddubs_epi16(_mm256_abs_epi8(c), _mm256_sign_epi8(x, c));
}
inline __m256i madd_acc(__m256i acc, __m256i p, __m256i s) {
#ifdef LF_VNNI
  return _mm256_dpwssd_epi32(acc, p, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p, s));
#endif
}
inline __m256i dot4(__m256i acc, __m256i c, __m256i x) {
#ifdef LF_VNNI
  return _mm256_dpbusd_epi32(acc, c, x);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(c, x), _mm256_set1_epi16(1)));
#endif
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// A K-quant block for decoding: its codes, the 16-bit scale of each 16-bit pair sum (sc[v] for codes c[v]), and
// `off`: per 16 columns, the integer that multiplies the activations' sum there (the offset or the min).
struct KGroup {
  __m256i c[8], sc[8], off;
  float d, dmin;
};

// 8 scales of 32-weight sub-blocks (int16 in s16) -> sc[j]: scale j in every lane.
inline void scales32(__m128i s16, __m256i* sc) {
  const __m256i s = _mm256_broadcastsi128_si256(s16);
  for (int j = 0; j < 8; ++j) sc[j] = _mm256_shuffle_epi8(s, _mm256_set1_epi16(static_cast<short>(0x0100 + 0x0202 * j)));
}
// 16 scales of 16-weight sub-blocks (int16 lanes of s16) -> sc[v] = scale 2v in the low half, 2v + 1 in the high.
inline void scales16(__m256i s16, __m256i* sc) {
  const __m256i lo = _mm256_permute2x128_si256(s16, s16, 0x00), hi = _mm256_permute2x128_si256(s16, s16, 0x11);
  for (int v = 0; v < 8; ++v) {
    const int a = (2 * v) % 8, b = (2 * v + 1) % 8;
    const __m256i pick = _mm256_setr_m128i(_mm_set1_epi16(static_cast<short>(0x0100 + 0x0202 * a)),
                                           _mm_set1_epi16(static_cast<short>(0x0100 + 0x0202 * b)));
    sc[v] = _mm256_shuffle_epi8(v < 4 ? lo : hi, pick);
  }
}

template <class T>
inline void kgroup(const uint8_t* p, KGroup& g);
template <>
inline void kgroup<Q4_K>(const uint8_t* p, KGroup& g) {
  codes<Q4_K>(p, 1, g.c);
  int64_t sc, mn;
  k4_scales_packed(p + 4, sc, mn);
  scales32(widen8(sc), g.sc);
  const __m128i m = widen8(mn);
  g.off = _mm256_set_m128i(_mm_unpackhi_epi16(m, m), _mm_unpacklo_epi16(m, m));  // each min for both 16s
  g.d = half(p), g.dmin = half(p + 2);
}
template <>
inline void kgroup<Q5_K>(const uint8_t* p, KGroup& g) {
  codes<Q5_K>(p, 1, g.c);
  int64_t sc, mn;
  k4_scales_packed(p + 4, sc, mn);
  scales32(widen8(sc), g.sc);
  const __m128i m = widen8(mn);
  g.off = _mm256_set_m128i(_mm_unpackhi_epi16(m, m), _mm_unpacklo_epi16(m, m));
  g.d = half(p), g.dmin = half(p + 2);
}
template <>
inline void kgroup<IQ4_XS>(const uint8_t* p, KGroup& g) {
  codes<IQ4_XS>(p, 1, g.c);
  const uint32_t sh = static_cast<uint32_t>(p[2] | (p[3] << 8));
  auto ls = [&](int t) { return static_cast<short>((((p[4 + t / 2] >> (4 * (t % 2))) & 15) | (((sh >> (2 * t)) & 3) << 4)) - 32); };
  scales32(_mm_setr_epi16(ls(0), ls(1), ls(2), ls(3), ls(4), ls(5), ls(6), ls(7)), g.sc);
  g.d = half(p), g.dmin = 0.f;
}
template <>
inline void kgroup<Q6_K>(const uint8_t* p, KGroup& g) {
  codes<Q6_K>(p, 1, g.c);
  const __m256i s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 192)));
  scales16(s16, g.sc);
  g.off = s16;  // w = d sc (q - 32): the activations' sum per 16 columns times sc, times 32
  g.d = half(p + 208), g.dmin = 0.f;
}
template <>
inline void kgroup<Q3_K>(const uint8_t* p, KGroup& g) {
  codes<Q3_K>(p, 1, g.c);
  int s[16];
  k3_scales(p + 96, s);
  const __m256i s16 = _mm256_setr_epi16(
      static_cast<short>(s[0]), static_cast<short>(s[1]), static_cast<short>(s[2]), static_cast<short>(s[3]),
      static_cast<short>(s[4]), static_cast<short>(s[5]), static_cast<short>(s[6]), static_cast<short>(s[7]),
      static_cast<short>(s[8]), static_cast<short>(s[9]), static_cast<short>(s[10]), static_cast<short>(s[11]),
      static_cast<short>(s[12]), static_cast<short>(s[13]), static_cast<short>(s[14]), static_cast<short>(s[15]));
  scales16(s16, g.sc);
  g.off = s16;  // w = d sc (q - 4)
  g.d = half(p + 108), g.dmin = 0.f;
}
template <>
inline void kgroup<Q2_K>(const uint8_t* p, KGroup& g) {
  codes<Q2_K>(p, 1, g.c);
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i low = _mm_set1_epi8(15);
  scales16(_mm256_cvtepu8_epi16(_mm_and_si128(b, low)), g.sc);
  g.off = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), low));  // the mins
  g.d = half(p + 80), g.dmin = half(p + 82);
}

// Weight rows are streamed once each: software prefetch this far ahead (one sequential stream per thread).
constexpr int64_t PREFETCH = 1024;  // 2 and 4 KB measured no faster

inline void prefetch(const uint8_t* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(p) + PREFETCH + o, _MM_HINT_T0);
}

// One weight row times rows m0 .. m0 + R of x (R <= 4), accumulators in registers: out[r] = dot(row, x[m0 + r]).
template <class T, int R>
inline void row_k(const uint8_t* row, int64_t groups, const XRows& x, int64_t m0, float* out) {
  const int64_t n16 = x.Kp / 16, nd = x.Kp / QK;
  __m256 acc[R], accm[R];
  for (int r = 0; r < R; ++r) acc[r] = accm[r] = _mm256_setzero_ps();
  KGroup kg;
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* p = row + g * T::BYTES;
    if (R == 1 || m0 == 0) prefetch(p, T::BYTES);
    kgroup<T>(p, kg);
    for (int r = 0; r < R; ++r) {
      const int64_t m = m0 + r;
      const int8_t* q = x.q + m * x.Kp + g * QK;
      // Two integer chains (even and odd vectors): one would wait on each multiply-add's latency.
      __m256i s = _mm256_setzero_si256(), s_odd = _mm256_setzero_si256();
      for (int v = 0; v < 8; v += 2) {
        const __m256i x0 = load256(q + 32 * v), x1 = load256(q + 32 * v + 32);
        s = madd_acc(s, T::SIGNED ? pairs_signed(kg.c[v], x0) : pairs(kg.c[v], x0), kg.sc[v]);
        s_odd = madd_acc(s_odd, T::SIGNED ? pairs_signed(kg.c[v + 1], x1) : pairs(kg.c[v + 1], x1), kg.sc[v + 1]);
      }
      s = _mm256_add_epi32(s, s_odd);
      const float dx = x.d[m * nd + g];
      if constexpr (T::MIN || (T::Z != 0 && !T::SIGNED)) {  // mins, or the codes' offset, times the activation sums
        const __m256i o = _mm256_madd_epi16(kg.off, load256(x.bs + m * n16 + g * 16));
        if constexpr (T::MIN) {
          accm[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(o), _mm256_set1_ps(-kg.dmin * dx), accm[r]);
        } else {
          s = _mm256_sub_epi32(s, _mm256_slli_epi32(o, std::countr_zero(static_cast<unsigned>(T::Z))));
        }
      }
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(kg.d * dx), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(_mm256_add_ps(acc[r], accm[r]));
}

template <class T, int R>
inline void row_32(const uint8_t* row, int64_t blocks, const XRows& x, int64_t m0, float* out) {
  const int64_t n32 = x.Kp / 32;
  // Two accumulators per row of x, for even and odd blocks (named, so that they stay in registers): the block's
  // integer sums scaled in float, and its min times the block's sum of activations.
  __m256 acc[2][R];
  __m256 off[2][R];
  for (int e = 0; e < 2; ++e)
    for (int r = 0; r < R; ++r) acc[e][r] = off[e][r] = _mm256_setzero_ps();
  auto block = [&](int64_t b, __m256* a, __m256* o) {
    const uint8_t* p = row + b * T::BYTES;
    const __m256i c = codes32<T>(p);
    const __m256 dw = _mm256_set1_ps(half(p));
    for (int r = 0; r < R; ++r) {
      const int64_t i = (m0 + r) * n32 + b;
      const __m256i xv = load256(x.q + (m0 + r) * x.Kp + 32 * b);
      __m256i s;
      if constexpr (T::SIGNED) {  // |code| times x with the code's sign: no offset
        s = dot4(_mm256_setzero_si256(), _mm256_abs_epi8(c), _mm256_sign_epi8(xv, c));
      } else {  // sum(u q) - Z sum(q), exactly: each of the 8 lanes starts at -Z/8 sum(q)
        __m256i start = _mm256_setzero_si256();
        if constexpr (T::Z != 0) start = _mm256_slli_epi32(_mm256_set1_epi32(x.neg_s32[i]), std::countr_zero(T::Z / 8u));
        s = dot4(start, c, xv);
      }
      a[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, _mm256_set1_ps(x.d[i])), a[r]);
      // w = d u + m: the min times the block's activation sum, an eighth in each lane.
      if constexpr (T::MIN) o[r] = _mm256_fmadd_ps(_mm256_set1_ps(half(p + 2) / 8.f), _mm256_set1_ps(x.bx[i]), o[r]);
    }
  };
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) {
    if (R == 1 || m0 == 0) prefetch(row + b * T::BYTES, 2 * T::BYTES);
    block(b, acc[0], off[0]);
    block(b + 1, acc[1], off[1]);
  }
  if (b < blocks) block(b, acc[0], off[0]);
  for (int r = 0; r < R; ++r)
    out[r] = hsum(_mm256_add_ps(_mm256_add_ps(acc[0][r], acc[1][r]), _mm256_add_ps(off[0][r], off[1][r])));
}

// Rows n0 .. n1 of W times every row of x, on the calling thread.
template <class T>
void decode_rows(const uint8_t* w, int64_t K, const XRows& x, float* y, int64_t ldy, bool accumulate, int64_t n0,
                 int64_t n1) {
  const int64_t row_bytes = K / T::BLOCK * T::BYTES, M = x.M;
  float out[4];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int R = static_cast<int>(std::min<int64_t>(4, M - m0));
      auto tile = [&]<int TR>() {
        if constexpr (T::BLOCK == 32) row_32<T, TR>(row, K / 32, x, m0, out);
        else row_k<T, TR>(row, K / QK, x, m0, out);
      };
      switch (R) {
        case 1: tile.template operator()<1>(); break;
        case 2: tile.template operator()<2>(); break;
        case 3: tile.template operator()<3>(); break;
        default: tile.template operator()<4>(); break;
      }
      for (int r = 0; r < R; ++r) put(y + (m0 + r) * ldy + n, out[r], accumulate);
    }
  }
}

// Rows per task: ~16 KB of weights, so that handing out a task costs little beside streaming it.
inline int64_t decode_grain(int64_t row_bytes) { return std::max<int64_t>(1, 16384 / row_bytes); }

template <class T>
void matmul_decode(const uint8_t* w, int64_t N, int64_t K, const XRows& x, float* y, int64_t ldy, bool accumulate) {
  parallel_rows(N, decode_grain(K / T::BLOCK * T::BYTES),
                  [&](int64_t n0, int64_t n1) { decode_rows<T>(w, K, x, y, ldy, accumulate, n0, n1); });
}
#endif  // LF_AVX2

#ifdef LF_VNNI
// GEMM: panels of 16 weight rows, the vector lanes being the rows ----------------------------------------------
// Panel layout: codes [Kp/4][16 rows][4] (one 64-byte vector per 4 columns), a and b [Kp/SB][16 rows].
constexpr int PANEL = 16;
constexpr int TILE = 6;  // rows of x per pass over a panel

template <class T>
void pack_panel(const uint8_t* w, int64_t N, int64_t K, int64_t Kp, int64_t n0, uint8_t* codes, float* a, float* b) {
  const int64_t row_bytes = K / T::BLOCK * T::BYTES, groups = Kp / QK;
  constexpr int NSB = QK / T::SB;
  Group grp;
  alignas(64) uint8_t u[QK];
  for (int r = 0; r < PANEL; ++r) {
    const int64_t n = n0 + r;
    for (int64_t g = 0; g < groups; ++g) {
      if (n < N) {
        unpack<T>(w + n * row_bytes + g * group_bytes<T>(), group_blocks<T>(K, g), grp);
        for (int v = 0; v < 8; ++v) {
          const __m256i c = T::SIGNED ? _mm256_xor_si256(grp.c[v], _mm256_set1_epi8(static_cast<char>(0x80))) : grp.c[v];
          _mm256_store_si256(reinterpret_cast<__m256i*>(u + 32 * v), c);
        }
      } else {
        std::fill(u, u + QK, 0), std::fill(grp.a, grp.a + 16, 0.f), std::fill(grp.b, grp.b + 16, 0.f);
      }
      uint32_t* dst = reinterpret_cast<uint32_t*>(codes) + g * (QK / 4) * PANEL + r;
      for (int k4 = 0; k4 < QK / 4; ++k4) std::memcpy(dst + k4 * PANEL, u + 4 * k4, 4);
      for (int j = 0; j < NSB; ++j) {
        a[(g * NSB + j) * PANEL + r] = grp.a[j];
        b[(g * NSB + j) * PANEL + r] = grp.b[j];
      }
    }
  }
}

// Rows m0 .. m0 + R of x times one packed panel -> y[m, n0 .. n0 + 16) (the first `width` of them).
template <class T, int R>
void panel_tile(const uint8_t* codes, const float* a, const float* b, const XRows& x, int64_t m0, float* y,
                int64_t ldy, int64_t n0, int width, bool accumulate) {
  constexpr int NSB = QK / T::SB, STEPS = T::SB / 4;
  const int64_t groups = x.Kp / QK, nd = x.Kp / x.span, n16 = x.Kp / 16, n32 = x.Kp / 32;
  const int8_t* xq[R];
  for (int r = 0; r < R; ++r) xq[r] = x.q + (m0 + r) * x.Kp;
  __m512 acc[R], accg[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    for (int r = 0; r < R; ++r) accg[r] = _mm512_setzero_ps();
    for (int j = 0; j < NSB; ++j) {
      const int64_t k0 = g * QK + j * T::SB;  // first column of the sub-block
      const uint8_t* cw = codes + (k0 / 4) * 64;
      __m512i s[R];
      for (int r = 0; r < R; ++r) s[r] = _mm512_setzero_si512();
      for (int k4 = 0; k4 < STEPS; ++k4) {
        const __m512i wv = _mm512_load_si512(cw + 64 * k4);
        for (int r = 0; r < R; ++r) {
          int32_t x4;
          std::memcpy(&x4, xq[r] + k0 + 4 * k4, 4);
          s[r] = _mm512_dpbusd_epi32(s[r], wv, _mm512_set1_epi32(x4));
        }
      }
      const __m512 av = _mm512_load_ps(a + (g * NSB + j) * PANEL), bv = _mm512_load_ps(b + (g * NSB + j) * PANEL);
      for (int r = 0; r < R; ++r) {
        const int64_t m = m0 + r;
        if constexpr (T::Z != 0) {  // the codes' offset times the activations' sum, in integers (exact)
          const int32_t qsum = T::SB == 32 ? x.s32[m * n32 + k0 / 32] : x.bs[m * n16 + k0 / 16];
          s[r] = _mm512_sub_epi32(s[r], _mm512_set1_epi32(T::Z * qsum));
        }
        if constexpr (T::BLOCK == 32) {  // an activation scale per block
          acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s[r]), av), _mm512_set1_ps(x.d[m * nd + k0 / 32]), acc[r]);
          if constexpr (T::MIN) acc[r] = _mm512_fmadd_ps(bv, _mm512_set1_ps(x.bx[m * n32 + k0 / 32]), acc[r]);
        } else {  // one per group, applied below
          accg[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r]), av, accg[r]);
          if constexpr (T::MIN) {
            const float qsum = T::SB == 32 ? x.fbs32[m * n32 + k0 / 32] : x.fbs16[m * n16 + k0 / 16];
            accg[r] = _mm512_fmadd_ps(bv, _mm512_set1_ps(qsum), accg[r]);
          }
        }
      }
    }
    if constexpr (T::BLOCK != 32)
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(accg[r], _mm512_set1_ps(x.d[(m0 + r) * nd + g]), acc[r]);
  }
  const __mmask16 mask = static_cast<__mmask16>((1u << width) - 1);
  for (int r = 0; r < R; ++r) {
    float* dst = y + (m0 + r) * ldy + n0;
    __m512 v = acc[r];
    if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, dst));
    _mm512_mask_storeu_ps(dst, mask, v);
  }
}

template <class T>
void matmul_gemm(const uint8_t* w, int64_t N, int64_t K, const XRows& x, float* y, int64_t ldy, bool acc) {
  const int64_t Kp = x.Kp, panels = (N + PANEL - 1) / PANEL, M = x.M;
  parallel_rows(panels, 1, [&](int64_t p0, int64_t p1) {
    thread_local std::vector<uint8_t> buf;
    const size_t code_bytes = static_cast<size_t>(Kp) * PANEL, scale_floats = static_cast<size_t>(Kp / T::SB) * PANEL;
    buf.resize(code_bytes + 2 * 4 * scale_floats + 128);
    uint8_t* codes = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t{63});
    float* a = reinterpret_cast<float*>(codes + code_bytes);
    float* b = a + scale_floats;
    for (int64_t pn = p0; pn < p1; ++pn) {
      const int64_t n0 = pn * PANEL;
      const int width = static_cast<int>(std::min<int64_t>(PANEL, N - n0));
      pack_panel<T>(w, N, K, Kp, n0, codes, a, b);
      int64_t m = 0;
      for (; m + TILE <= M; m += TILE) panel_tile<T, TILE>(codes, a, b, x, m, y, ldy, n0, width, acc);
      switch (M - m) {
        case 5: panel_tile<T, 5>(codes, a, b, x, m, y, ldy, n0, width, acc); break;
        case 4: panel_tile<T, 4>(codes, a, b, x, m, y, ldy, n0, width, acc); break;
        case 3: panel_tile<T, 3>(codes, a, b, x, m, y, ldy, n0, width, acc); break;
        case 2: panel_tile<T, 2>(codes, a, b, x, m, y, ldy, n0, width, acc); break;
        case 1: panel_tile<T, 1>(codes, a, b, x, m, y, ldy, n0, width, acc); break;
        default: break;
      }
    }
  });
}
#endif  // LF_VNNI

// Rows of x at or above which the panel GEMM beats streaming each weight row once per call.
constexpr int64_t GEMM_ROWS = 8;

template <class T>
void run(const uint8_t* w, int64_t N, int64_t K, const float* x, int64_t M, float* y, int64_t ldy, bool acc,
         bool reference) {
  const XRows xr = quantize_x(x, M, K, T::BLOCK, T::BLOCK == 32 && T::MIN);
  if (reference) return matmul_reference<T>(w, N, K, xr, y, ldy, acc);
#ifdef LF_VNNI
  if (M >= GEMM_ROWS) return matmul_gemm<T>(w, N, K, xr, y, ldy, acc);
#endif
#ifdef LF_AVX2
  return matmul_decode<T>(w, N, K, xr, y, ldy, acc);
#else
  return matmul_reference<T>(w, N, K, xr, y, ldy, acc);
#endif
}

template <class F>
bool dispatch(int64_t qtype, F&& f) {
  switch (qtype) {
    case T_Q4_0: f(Q4_0{}); return true;
    case T_Q4_1: f(Q4_1{}); return true;
    case T_Q5_0: f(Q5_0{}); return true;
    case T_Q5_1: f(Q5_1{}); return true;
    case T_Q8_0: f(Q8_0{}); return true;
    case T_Q2_K: f(Q2_K{}); return true;
    case T_Q3_K: f(Q3_K{}); return true;
    case T_Q4_K: f(Q4_K{}); return true;
    case T_Q5_K: f(Q5_K{}); return true;
    case T_Q6_K: f(Q6_K{}); return true;
    case T_IQ4_NL: f(IQ4_NL{}); return true;
    case T_IQ4_XS: f(IQ4_XS{}); return true;
    default: return false;
  }
}

}  // namespace

int64_t gguf_row_bytes(int64_t qtype, int64_t K) {
  int64_t bytes = -1;
  dispatch(qtype, [&](auto t) {
    using T = decltype(t);
    if (K > 0 && K % T::BLOCK == 0) bytes = K / T::BLOCK * T::BYTES;
  });
  return bytes;
}

void gguf_matmul(int64_t qtype, const uint8_t* w, int64_t N, int64_t K, const float* x, int64_t M, float* y,
                 int64_t ldy, bool accumulate, bool reference) {
  dispatch(qtype, [&](auto t) { run<decltype(t)>(w, N, K, x, M, y, ldy, accumulate, reference); });
}

void gguf_matmul_parts(const GGUFPart* parts, int64_t n_parts, int64_t K, const float* x, int64_t M, float* y,
                       int64_t ldy, bool accumulate) {
#ifdef LF_AVX2
#ifdef LF_VNNI
  const bool decode = M < GEMM_ROWS;
#else
  const bool decode = true;
#endif
  bool known = true;
  for (int64_t i = 0; i < n_parts; ++i) known = known && gguf_row_bytes(parts[i].qtype, K) > 0;
  if (decode && known && n_parts > 1) {
    // x rounded once per kind of activations: per 256 columns (K-quants), per 32 with or without Q8_1 sums.
    XBuffers bufs[3];
    XRows xr[3];
    bool made[3] = {false, false, false};
    struct Task {
      int64_t part, n0, n1;
    };
    std::vector<Task> tasks;
    std::vector<int> kind(n_parts);
    std::vector<int64_t> offset(n_parts);
    const int64_t threads = at::get_num_threads();
    for (int64_t i = 0, off = 0; i < n_parts; off += parts[i].N, ++i) {
      dispatch(parts[i].qtype, [&](auto t) {
        using T = decltype(t);
        const int k = T::BLOCK != 32 ? 0 : T::MIN ? 1 : 2;
        if (!made[k]) xr[k] = quantize_x(x, M, K, T::BLOCK, T::BLOCK == 32 && T::MIN, bufs[k]), made[k] = true;
        kind[i] = k, offset[i] = off;
        const int64_t N = parts[i].N;
        const int64_t chunk = std::max(decode_grain(K / T::BLOCK * T::BYTES), (N + 8 * threads - 1) / (8 * threads));
        for (int64_t n0 = 0; n0 < N; n0 += chunk) tasks.push_back({i, n0, std::min(N, n0 + chunk)});
      });
    }
    // One parallel region for all the parts' rows (a region per part waits for its slowest thread each time).
    parallel_rows(static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const Task& task = tasks[t];
        const GGUFPart& part = parts[task.part];
        dispatch(part.qtype, [&](auto q) {
          decode_rows<decltype(q)>(part.w, K, xr[kind[task.part]], y + offset[task.part], ldy, accumulate, task.n0,
                                   task.n1);
        });
      }
    });
    return;
  }
#endif
  for (int64_t i = 0, off = 0; i < n_parts; off += parts[i].N, ++i)
    gguf_matmul(parts[i].qtype, parts[i].w, parts[i].N, K, x, M, y + off, ldy, accumulate);
}

}  // namespace llamaforge
