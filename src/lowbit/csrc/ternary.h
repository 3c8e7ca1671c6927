// Ternary (2-bit) weights x int8 activations: packing and the multi-threaded drivers around the
// ISA kernels (baseline code: compiled without ISA flags, calls the kernels via the ISA table).
//
// Packed layout (also in docs/format.md): N is padded to a multiple of 16 (row blocks) and K to
// a multiple of 16 (kp). Row block rb holds kp/16 consecutive 64-byte tiles; in tile (rb, kt),
// byte 4*r + j holds in bits 2p..2p+1 the code (w + 1 in {0, 1, 2}) of row 16*rb + r at
// k = 16*kt + 4*p + j. Padding codes are 1 (weight 0); padded activations are 0 anyway.
#ifndef LOWBIT_TERNARY_H
#define LOWBIT_TERNARY_H

#include <cstdint>

#include "kernels.h"

namespace lowbit {

inline int64_t ternary_kp(int64_t k) { return (k + 15) / 16 * 16; }
inline int64_t ternary_row_blocks(int64_t n) { return (n + 15) / 16; }

// codes: n x k int8 in {-1, 0, 1} (row stride `stride` elements); dst: row_blocks(n) * kp * 4
// bytes. Throws std::invalid_argument on a code outside {-1, 0, 1}.
void ternary_pack(const int8_t* codes, int64_t n, int64_t k, int64_t stride, uint8_t* dst);

// Inverse of ternary_pack (codes written densely, n x k).
void ternary_unpack(const uint8_t* src, int64_t n, int64_t k, int8_t* codes);

// 4-bit weights, codes in [-8, 7] (3-bit codes [-4, 3] use the same container): row blocks of
// kp/8 tiles; byte 4*r + j of tile (rb, kt) holds code + 8 of row 16*rb + r at k = 8*kt + j
// (low nibble) and k = 8*kt + 4 + j (high nibble). Padding codes are 8 (weight 0).
void int4_pack(const int8_t* codes, int64_t n, int64_t k, int64_t stride, uint8_t* dst);
void int4_unpack(const uint8_t* src, int64_t n, int64_t k, int8_t* codes);

// Activation quantization modes.
enum ActMode : int {
    kActAbsmax = 0,     // per token: s = 127 / max(max|x|, 1e-5), q = clamp(round(x * s), ±127)
    kActDfpToken = 1,   // per token power of two: smallest E with round(max|x| * 2^-E) <= 127,
                        // q = clamp(round(x * 2^-E), -128, 127)
    kActDfpTensor = 2,  // one E for the whole batch (same rule over all tokens)
    kActDfpFixed = 3,   // E given by the caller
    // 4 is lowbit.kernels' "float" (the exact path, never a quantizer mode).
    kActUdfpFixed = 5,  // unsigned 8-bit DFP, E given: u = clamp(round(x * 2^-E), 0, 255) stored
                        // as uint8 (grouped kernel with a_unsigned only)
};

// Quantizes m rows of x (k floats, stride x_stride) into q (m rows of kq bytes, zero padded past
// k, row stride q_stride >= kq), the per-group
// sums (m x n_groups, group = 0: whole row) and a_inv[m] (1 / multiplier: the dequantization scale).
void quantize_activations(const lowbit_isa_table& t, const float* x, int64_t m, int64_t k,
                          int64_t x_stride, int mode, int exponent, int64_t kq, int64_t group,
                          int8_t* q, int64_t q_stride, int32_t* sums, int64_t n_groups, float* a_inv,
                          int n_threads);

// The per-token multiplier rule alone (for the Python reference tests and the docs).
float act_multiplier(float amax, int mode, int exponent, float* a_inv);

// Runs t.ternary_gemm over all tokens [0, m) and row blocks of args (rb0/rb1/m0/m1 are set here),
// split over threads by row blocks (or by tokens when there are few row blocks).
void ternary_gemm_run(const lowbit_isa_table& t, const lowbit_t2_args& args, int64_t m,
                      int64_t row_blocks, int n_threads, bool float_path = false);

}  // namespace lowbit

#endif
