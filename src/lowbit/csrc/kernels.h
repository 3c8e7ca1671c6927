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
} lowbit_isa_table;

const lowbit_isa_table* lowbit_isa_scalar(void);
const lowbit_isa_table* lowbit_isa_avx2(void);
const lowbit_isa_table* lowbit_isa_avx512(void);

#ifdef __cplusplus
}
#endif

#endif  // LOWBIT_KERNELS_H
