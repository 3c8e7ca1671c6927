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

// Packed weights are row-interleaved in blocks of 8 rows ("i8" layout): block b (rows 8b..8b+7)
// starts at byte b * words * 64, and word i of row 8b + r is the 64-bit word at byte
// i * 64 + r * 8 inside it. One 512-bit load then holds word i of 8 rows, so the AVX-512
// kernel XORs it with a broadcast activation word and accumulates 8 outputs per lane, with no
// horizontal reductions and no K tail (K advances one 64-bit word at a time). Rows past N
// are zero (their outputs are computed and dropped).
typedef struct lowbit_binary_table {
    const char* name;
    // pop[m * pop_stride + n] = popcount(a[m, :] ^ w_row(n)) over `words` 64-bit words, for
    // m < m_rows and every n < 8 * n_blocks. `a` rows are `a_stride` bytes apart (unaligned ok).
    void (*popcount_gemm)(const uint8_t* a, int64_t a_stride, const uint8_t* w, int64_t words,
                          int64_t m_rows, int64_t n_blocks, int32_t* pop, int64_t pop_stride);
    // Bit epilogue of one output row: for i < len, d = k - 2 * pop[i] + (corr ? corr[i] : 0) and
    // bit i of `out` (little-endian words, len rounded up to whole bytes written) is
    // flip[i] ? d > thr[i] : d < thr[i]. The caller guarantees `out` holds ceil(len / 64) words.
    void (*bits_epilogue)(const int32_t* pop, int64_t len, int32_t k, const int32_t* corr, const int32_t* thr,
                          const uint8_t* flip, uint8_t* out);
} lowbit_binary_table;

const lowbit_binary_table* lowbit_binary_scalar(void);
const lowbit_binary_table* lowbit_binary_avx2(void);
const lowbit_binary_table* lowbit_binary_avx512(void);

#ifdef __cplusplus
}
#endif

#endif  // LOWBIT_BINARY_H
