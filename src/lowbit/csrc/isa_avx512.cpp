// AVX-512 F/BW/VL/DQ + VNNI + VPOPCNTDQ path (Ice Lake and later, Zen 4 and later).
#include <immintrin.h>
#include <string.h>

#include "kernels.h"

namespace {

void pack_signs_f32(const float* src, int64_t rows, int64_t k, int64_t src_stride, uint8_t* dst,
                    int64_t dst_stride) {
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t r = 0; r < rows; ++r) {
        const float* x = src + r * src_stride;
        uint8_t* out = dst + r * dst_stride;
        memset(out, 0, (size_t)dst_stride);
        for (int64_t j = 0; j < k; j += 16) {
            int64_t left = k - j;
            __mmask16 valid = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
            __m512 v = _mm512_maskz_loadu_ps(valid, x + j);
            // Ordered, non-signalling less-than: NaN and -0.0 give 0 (i.e. +1).
            __mmask16 lt = _mm512_mask_cmp_ps_mask(valid, v, zero, _CMP_LT_OQ);
            uint16_t bits = (uint16_t)lt;
            memcpy(out + (j >> 3), &bits, left >= 16 ? 2 : (size_t)((left + 7) >> 3));
        }
    }
}

// popcount(a ^ w) over `words` 64-bit words, 8 words per zmm, masked tail.
void binary_gemm(const uint8_t* a, int64_t a_stride, const uint8_t* w, int64_t w_stride,
                 int64_t m_rows, int64_t n0, int64_t n1, int64_t words, int64_t k, int32_t* out,
                 int64_t out_stride) {
    const int64_t full = words / 8;
    const __mmask8 tail = (__mmask8)((1u << (words % 8)) - 1u);
    for (int64_t m = 0; m < m_rows; ++m) {
        const uint8_t* am = a + m * a_stride;
        int32_t* om = out + m * out_stride;
        int64_t n = n0;
        for (; n + 4 <= n1; n += 4) {
            const uint8_t* w0 = w + (n + 0) * w_stride;
            const uint8_t* w1 = w + (n + 1) * w_stride;
            const uint8_t* w2 = w + (n + 2) * w_stride;
            const uint8_t* w3 = w + (n + 3) * w_stride;
            __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0;
            for (int64_t i = 0; i < full; ++i) {
                __m512i av = _mm512_loadu_si512(am + 64 * i);
                c0 = _mm512_add_epi64(c0, _mm512_popcnt_epi64(_mm512_xor_si512(av, _mm512_loadu_si512(w0 + 64 * i))));
                c1 = _mm512_add_epi64(c1, _mm512_popcnt_epi64(_mm512_xor_si512(av, _mm512_loadu_si512(w1 + 64 * i))));
                c2 = _mm512_add_epi64(c2, _mm512_popcnt_epi64(_mm512_xor_si512(av, _mm512_loadu_si512(w2 + 64 * i))));
                c3 = _mm512_add_epi64(c3, _mm512_popcnt_epi64(_mm512_xor_si512(av, _mm512_loadu_si512(w3 + 64 * i))));
            }
            if (tail) {
                const int64_t o = 64 * full;
                __m512i av = _mm512_maskz_loadu_epi64(tail, am + o);
                c0 = _mm512_add_epi64(c0, _mm512_popcnt_epi64(_mm512_xor_si512(av, _mm512_maskz_loadu_epi64(tail, w0 + o))));
                c1 = _mm512_add_epi64(c1, _mm512_popcnt_epi64(_mm512_xor_si512(av, _mm512_maskz_loadu_epi64(tail, w1 + o))));
                c2 = _mm512_add_epi64(c2, _mm512_popcnt_epi64(_mm512_xor_si512(av, _mm512_maskz_loadu_epi64(tail, w2 + o))));
                c3 = _mm512_add_epi64(c3, _mm512_popcnt_epi64(_mm512_xor_si512(av, _mm512_maskz_loadu_epi64(tail, w3 + o))));
            }
            om[n + 0] = (int32_t)(k - 2 * _mm512_reduce_add_epi64(c0));
            om[n + 1] = (int32_t)(k - 2 * _mm512_reduce_add_epi64(c1));
            om[n + 2] = (int32_t)(k - 2 * _mm512_reduce_add_epi64(c2));
            om[n + 3] = (int32_t)(k - 2 * _mm512_reduce_add_epi64(c3));
        }
        for (; n < n1; ++n) {
            const uint8_t* wn = w + n * w_stride;
            __m512i c = _mm512_setzero_si512();
            for (int64_t i = 0; i < full; ++i)
                c = _mm512_add_epi64(c, _mm512_popcnt_epi64(_mm512_xor_si512(
                                            _mm512_loadu_si512(am + 64 * i), _mm512_loadu_si512(wn + 64 * i))));
            if (tail) {
                const int64_t o = 64 * full;
                c = _mm512_add_epi64(c, _mm512_popcnt_epi64(_mm512_xor_si512(
                                            _mm512_maskz_loadu_epi64(tail, am + o), _mm512_maskz_loadu_epi64(tail, wn + o))));
            }
            om[n] = (int32_t)(k - 2 * _mm512_reduce_add_epi64(c));
        }
    }
}

const lowbit_isa_table kTable = {"avx512", pack_signs_f32, binary_gemm};

}  // namespace

extern "C" const lowbit_isa_table* lowbit_isa_avx512(void) { return &kTable; }
