// Portable popcount GEMM (baseline target: __builtin_popcountll may become a libgcc call).
#include <string.h>

#include "binary.h"

namespace {

uint64_t load_word(const uint8_t* p) {
    uint64_t v;
    memcpy(&v, p, 8);  // unaligned-safe; little-endian x86 gives the documented bit order
    return v;
}

void popcount_gemm(const uint8_t* a, int64_t a_stride, const uint8_t* w, int64_t w_stride,
                   int64_t words, int64_t m_rows, int64_t n_rows, int32_t* pop,
                   int64_t pop_stride) {
    for (int64_t m = 0; m < m_rows; ++m) {
        const uint8_t* am = a + m * a_stride;
        for (int64_t n = 0; n < n_rows; ++n) {
            const uint8_t* wn = w + n * w_stride;
            int64_t p = 0;
            for (int64_t i = 0; i < words; ++i)
                p += __builtin_popcountll(load_word(am + 8 * i) ^ load_word(wn + 8 * i));
            pop[m * pop_stride + n] = (int32_t)p;
        }
    }
}

const lowbit_binary_table kTable = {"scalar", popcount_gemm};

}  // namespace

extern "C" const lowbit_binary_table* lowbit_binary_scalar(void) { return &kTable; }
