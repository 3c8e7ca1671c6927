// Portable popcount GEMM (baseline target: __builtin_popcountll may become a libgcc call).
#include <string.h>

#include "binary.h"

namespace {

uint64_t load_word(const uint8_t* p) {
    uint64_t v;
    memcpy(&v, p, 8);  // unaligned-safe; little-endian x86 gives the documented bit order
    return v;
}

void popcount_gemm(const uint8_t* a, int64_t a_stride, const uint8_t* w, int64_t words, int64_t m_rows,
                   int64_t n_blocks, int32_t* pop, int64_t pop_stride) {
    for (int64_t m = 0; m < m_rows; ++m) {
        const uint8_t* am = a + m * a_stride;
        for (int64_t b = 0; b < n_blocks; ++b) {
            const uint8_t* wb = w + b * words * 64;
            for (int r = 0; r < 8; ++r) {
                int64_t p = 0;
                for (int64_t i = 0; i < words; ++i)
                    p += __builtin_popcountll(load_word(am + 8 * i) ^ load_word(wb + 64 * i + 8 * r));
                pop[m * pop_stride + 8 * b + r] = (int32_t)p;
            }
        }
    }
}


// Portable bit epilogue (see binary.h); compiled per ISA file, internal linkage.
static void bits_epilogue(const int32_t* pop, int64_t len, int32_t k, const int32_t* corr, const int32_t* thr,
                          const uint8_t* flip, uint8_t* out) {
    for (int64_t w0 = 0; w0 < len; w0 += 64) {
        uint64_t word = 0;
        const int64_t e = len < w0 + 64 ? len : w0 + 64;
        for (int64_t i = w0; i < e; ++i) {
            const int32_t d = k - 2 * pop[i] + (corr ? corr[i] : 0);
            const bool neg = flip[i] ? d > thr[i] : d < thr[i];
            word |= (uint64_t)neg << (i - w0);
        }
        memcpy(out + w0 / 8, &word, 8);
    }
}

const lowbit_binary_table kTable = {"scalar", popcount_gemm, bits_epilogue};

}  // namespace

extern "C" const lowbit_binary_table* lowbit_binary_scalar(void) { return &kTable; }
