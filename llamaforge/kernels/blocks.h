// GGUF (ggml) block formats multiplied as stored: the interface blocks.cpp gives kernels.cpp.
#pragma once

#include <cstdint>

namespace llamaforge {

// Bytes of one row of K weights in ggml type `qtype` (ggml's type ids), or -1 when the type has no kernel here
// or K is not a whole number of its blocks.
int64_t gguf_row_bytes(int64_t qtype, int64_t K);

// y[M, N] (row stride ldy) = x[M, K] @ W^T, or y += it, for W [N, row_bytes] of ggml blocks. Activations are
// rounded to 8 bits per 32 columns, as llama.cpp's CPU backend does. Threads: at::parallel_for.
// `reference`: the portable scalar code whatever the CPU (tests compare the vector kernels against it).
void gguf_matmul(int64_t qtype, const uint8_t* w, int64_t N, int64_t K, const float* x, int64_t M, float* y,
                 int64_t ldy, bool accumulate, bool reference = false);

// Several matrices that share the input x, their outputs side by side in y (part i's from column N_0 + .. +
// N_{i-1}): for a few rows of x, one rounding of x per kind of activations and one parallel region for all rows.
struct GGUFPart {
  int64_t qtype;
  const uint8_t* w;
  int64_t N;
};
void gguf_matmul_parts(const GGUFPart* parts, int64_t n_parts, int64_t K, const float* x, int64_t M, float* y,
                       int64_t ldy, bool accumulate);

}  // namespace llamaforge
