// lowbit C kernel interface.
//
// Every ISA translation unit (isa_scalar.cpp, isa_avx2.cpp, isa_avx512.cpp) fills one
// lowbit_isa_table with plain C function pointers. Nothing else crosses between the ISA
// units and the baseline code: no inline functions, no templates, no STL. That keeps
// AVX-512 instructions from leaking into the generic path through ODR merging
// (../shared/reference/kernels.md §5, "ODR leak").
//
// Bit conventions shared by every path (and by lowbit.kernels' NumPy references):
//   * binary packing: element j of a row goes to bit (j % 64) of 64-bit little-endian word
//     j / 64, and the bit is 1 exactly when x < 0 (so sign(0) = sign(-0.0) = +1 and NaN = +1).
//   * padding bits past K are 0 in both operands, so they cancel in popcount(a ^ w).
//   * binary dot product: dot(a, w) = K - 2 * popcount(a ^ w).
#ifndef LOWBIT_KERNELS_H
#define LOWBIT_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Arguments of the ternary GEMM (one struct so that every ISA path has the same entry point).
//
// Weights: `w` holds ceil(N/16) row blocks of kp/16 tiles of 64 bytes (tile (rb, kt) at byte
// (rb * (kp/16) + kt) * 64). In a tile, byte 4*r + j (r = row in block, j = 0..3) holds in bits
// 2p..2p+1 the code (w + 1, in {0, 1, 2}) of row 16*rb + r at k = 16*kt + 4*p + j, so that
// (tile >> 2p) & 3 is exactly the unsigned operand of vpdpbusd for k = 16*kt + 4p .. +3.
//
// 4-bit weights (bits = 4, codes w in [-8, 7], 3-bit codes in the same container) use the same
// 64-byte tiles with 8 k each: tile (rb, kt) at byte (rb * (kp/8) + kt) * 64, byte 4*r + j holds
// code w + 8 of row 16*rb + r at k = 8*kt + j in its low nibble and at k = 8*kt + 4 + j in its
// high nibble. D = sum (code - 8) * a = sum code * a - 8 * sum a.
//
// Activations: `a` is int8, row m at a + m * a_stride, zero-padded up to kp;
// a_sums[m * sums_stride + g] = sum of row m's activations in group g (see group_k).
//
// Each output is D[m, n] = sum_k (code - 1) * a = sum_k code * a - sum_k a (the "code trick"),
// and for asymmetric ternary (TTQ) also P[m, n] = sum over k with code == 2 of a (the high bit
// of the code): then W = Wp*[w=+1] - Wn*[w=-1] gives y = Wn * D + (Wp - Wn) * P.
typedef struct lowbit_t2_args {
    const int8_t* a;
    int64_t a_stride;
    const int32_t* a_sums;
    int64_t sums_stride;
    int64_t m0, m1;
    const uint8_t* w;
    int64_t kp;        // padded K (multiple of 16)
    int64_t rb0, rb1;  // row blocks of 16 output rows
    int64_t n_valid;   // real N: outputs at n >= n_valid are never written
    int64_t group_k;   // 0: per-row scales (integer path); else K per scale group (multiple of 4)
    int asym;          // 1: also accumulate P (asymmetric ternary; bits == 2 only)
    int bits;          // 2: ternary tiles (code = w + 1); 4: int4 tiles (code = w + 8)
    // 1: `a` holds unsigned activations u in [0, 255] (unsigned 8-bit DFP) and the grouped
    // kernel (group_k > 0 only) computes D_g = sum (code - zero) * u directly, with the
    // activations as vpdpbusd's unsigned operand and the decoded weights as its signed one:
    // no code trick, a_sums unused.
    int a_unsigned;
    // Integer outputs (float path when out_i32 == NULL): D and, when asym, P.
    int32_t* out_i32;
    int32_t* out_p32;
    int64_t out_i32_stride;
    // Float path: y[m, n] = epilogue(...) * a_inv[m] + bias[n], optional ReLU.
    //   per-row:  y = D * (scale[n] * a_inv[m]) + bias[n]
    //   asym:     y = (D * scale[n] + P * scale2[n]) * a_inv[m] + bias[n]  (scale = Wn, scale2 = Wp - Wn)
    //   grouped:  y = (sum_g D_g * scale[((n/16) * n_groups + g) * 16 + n%16]) * a_inv[m] + bias[n]
    //             with n_groups = ceil(kp / group_k) (groups past K have scale 0) and D_g the
    //             group's dot product minus its activation sum a_sums[m * sums_stride + g].
    // scale/scale2/bias are padded to 16 * ceil(N/16) entries (per row) and bias may be NULL.
    const float* scale;
    const float* scale2;
    const float* a_inv;
    // Optional, grouped path with 8-bit fixed-point group scales (FGQ scale_bits = 8): the scale of
    // row n's group g is m_g * row_mult[n], m_g in 0..255; gscale_i holds (m_g << 16) | m_g (an
    // int16 pair) at the same index as `scale`, and row_mult is padded like bias. The AVX2 kernel
    // for groups of 4 with unsigned inputs (ternary, kp <= 32768) then sums m_g * D_g exactly in
    // int32 (|sum| <= kp * 255 * 255 < 2^31) and applies row_mult once per output:
    //   y = float(sum_g m_g * D_g) * row_mult[n] * a_inv[m] + bias[n].
    // Every other path reads `scale`, which must hold the same values m_g * row_mult[n].
    const int32_t* gscale_i;
    const float* row_mult;
    // Exact float path (ternary_gemm_f32): fp32 activations instead of `a`, row m at
    // x + m * x_stride (k floats, no padding needed); a, a_sums and a_inv are unused.
    const float* x;
    int64_t x_stride;
    int64_t k;
    const float* bias;
    int relu;
    float* out_f32;
    int64_t out_f32_stride;
} lowbit_t2_args;

typedef struct lowbit_isa_table {
    const char* name;

    // Packs the sign bits of `rows` float rows of length k (row stride src_stride elements)
    // into dst (row stride dst_stride bytes, dst_stride >= 8 * ceil(k / 64)); the padding
    // bits up to dst_stride are written as 0.
    void (*pack_signs_f32)(const float* src, int64_t rows, int64_t k, int64_t src_stride,
                           uint8_t* dst, int64_t dst_stride);

    // out[m, n] = k - 2 * popcount(a[m, :] ^ w[n, :]) for m in [0, m_rows), n in [n0, n1).
    // a and w hold `words` 64-bit words per row (strides in bytes, multiples of 8 not required).
    void (*binary_gemm)(const uint8_t* a, int64_t a_stride, const uint8_t* w, int64_t w_stride,
                        int64_t m_rows, int64_t n0, int64_t n1, int64_t words, int64_t k,
                        int32_t* out, int64_t out_stride);

    // ---- ternary (2-bit) weights x int8 activations: layout in ternary.h / docs/format.md ----

    // Absolute maximum of each of `rows` float rows of length k (row stride x_stride elements).
    void (*absmax_f32)(const float* x, int64_t rows, int64_t k, int64_t x_stride, float* amax);

    // q[r, j] = clamp(round_half_even(x[r, j] * mult[r]), lo, hi) for j < k and 0 for
    // k <= j < kq (the zero padding keeps padded weight codes out of the dot products and out of
    // the sums); sums[r * sums_stride + g] = sum of q[r, j] over j in group g, where groups are
    // `group` consecutive k (group = 0: one group, the whole row). (lo, hi) is (-127, 127)
    // (symmetric absmax), (-128, 127) (dynamic fixed point uses the full int8 range) or (0, 255)
    // (unsigned 8-bit DFP: q is then stored as uint8 bytes).
    void (*quantize_i8)(const float* x, int64_t rows, int64_t k, int64_t x_stride,
                        const float* mult, float lo, float hi, int8_t* q, int64_t q_stride,
                        int64_t kq, int64_t group, int32_t* sums, int64_t sums_stride);

    // Ternary GEMM over tokens [m0, m1) and row blocks [rb0, rb1) (see lowbit_t2_args).
    void (*ternary_gemm)(const struct lowbit_t2_args* args);

    // Exact float path: fp32 activations x packed ternary / int4 weights -> fp32 (float path
    // fields of lowbit_t2_args; D and P are accumulated in fp32, so the result differs from a
    // float64 reference only by summation order).
    void (*ternary_gemm_f32)(const struct lowbit_t2_args* args);
} lowbit_isa_table;

const lowbit_isa_table* lowbit_isa_scalar(void);
const lowbit_isa_table* lowbit_isa_avx2(void);
const lowbit_isa_table* lowbit_isa_avx512(void);

#ifdef __cplusplus
}
#endif

#endif  // LOWBIT_KERNELS_H
