// Binary (±1 x ±1) XNOR-popcount kernels: the ISA table and the baseline drivers.
//
// Bit convention (the same as kernels.h / lowbit.kernels.pack_signs): element j of a packed row
// is bit j % 64 of little-endian 64-bit word j / 64, bit = 1 exactly when x < 0 (sign(0) =
// sign(-0.0) = +1, NaN = +1). Bits past K are 0 in both operands, so they cancel in a ^ w and
// dot(a, w) = K - 2 * popcount(a ^ w).
//
// Only the popcount GEMM differs per ISA (binary_scalar.cpp, binary_avx2.cpp,
// binary_avx512.cpp, each built with its own flags and exporting one plain C function). The
// epilogues, im2col and max-pool are O(outputs), not O(outputs x K), and live in baseline code
// (bindings_binary.cpp), so nothing ISA-specific can leak into the generic path (kernels.md §5).
#ifndef LOWBIT_BINARY_H
#define LOWBIT_BINARY_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct lowbit_binary_table {
    const char* name;
    // pop[m * pop_stride + n] = popcount(a[m, :] ^ w[n, :]) over `words` 64-bit words, for
    // m < m_rows, n < n_rows. Row strides are in bytes; rows need not be aligned.
    void (*popcount_gemm)(const uint8_t* a, int64_t a_stride, const uint8_t* w, int64_t w_stride,
                          int64_t words, int64_t m_rows, int64_t n_rows, int32_t* pop,
                          int64_t pop_stride);
} lowbit_binary_table;

const lowbit_binary_table* lowbit_binary_scalar(void);
const lowbit_binary_table* lowbit_binary_avx2(void);
const lowbit_binary_table* lowbit_binary_avx512(void);

#ifdef __cplusplus
}
#endif

#endif  // LOWBIT_BINARY_H
