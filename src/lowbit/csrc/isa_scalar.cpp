// Portable reference path: plain C++, compiled for the baseline x86-64 (or any) target.
#include <string.h>

#include "kernels.h"

namespace {

void pack_signs_f32(const float* src, int64_t rows, int64_t k, int64_t src_stride, uint8_t* dst,
                    int64_t dst_stride) {
    for (int64_t r = 0; r < rows; ++r) {
        const float* x = src + r * src_stride;
        uint8_t* out = dst + r * dst_stride;
        memset(out, 0, (size_t)dst_stride);
        for (int64_t j = 0; j < k; ++j) {
            if (x[j] < 0.0f) out[j >> 3] |= (uint8_t)(1u << (j & 7));
        }
    }
}

uint64_t load_word(const uint8_t* p) {
    uint64_t v;
    memcpy(&v, p, 8);  // unaligned-safe; little-endian x86 gives the documented bit order
    return v;
}

void binary_gemm(const uint8_t* a, int64_t a_stride, const uint8_t* w, int64_t w_stride,
                 int64_t m_rows, int64_t n0, int64_t n1, int64_t words, int64_t k, int32_t* out,
                 int64_t out_stride) {
    for (int64_t m = 0; m < m_rows; ++m) {
        const uint8_t* am = a + m * a_stride;
        for (int64_t n = n0; n < n1; ++n) {
            const uint8_t* wn = w + n * w_stride;
            int64_t pop = 0;
            for (int64_t i = 0; i < words; ++i)
                pop += __builtin_popcountll(load_word(am + 8 * i) ^ load_word(wn + 8 * i));
            out[m * out_stride + n] = (int32_t)(k - 2 * pop);
        }
    }
}

const lowbit_isa_table kTable = {"scalar", pack_signs_f32, binary_gemm};

}  // namespace

extern "C" const lowbit_isa_table* lowbit_isa_scalar(void) { return &kTable; }
