// AVX2 + FMA + POPCNT path (Haswell and later, Zen 1 and later).
// There is no vector popcount before AVX-512 VPOPCNTDQ, so the binary GEMM uses scalar
// `popcnt r64`, four weight rows at a time to keep independent dependency chains.
#include <immintrin.h>
#include <string.h>

#include "kernels.h"

namespace {

void pack_signs_f32(const float* src, int64_t rows, int64_t k, int64_t src_stride, uint8_t* dst,
                    int64_t dst_stride) {
    const __m256 zero = _mm256_setzero_ps();
    for (int64_t r = 0; r < rows; ++r) {
        const float* x = src + r * src_stride;
        uint8_t* out = dst + r * dst_stride;
        memset(out, 0, (size_t)dst_stride);
        int64_t j = 0;
        for (; j + 8 <= k; j += 8) {
            // _CMP_LT_OQ: false for NaN and for -0.0, matching the `x < 0` rule.
            __m256 lt = _mm256_cmp_ps(_mm256_loadu_ps(x + j), zero, _CMP_LT_OQ);
            out[j >> 3] = (uint8_t)_mm256_movemask_ps(lt);
        }
        for (; j < k; ++j)
            if (x[j] < 0.0f) out[j >> 3] |= (uint8_t)(1u << (j & 7));
    }
}

inline uint64_t load_word(const uint8_t* p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

void binary_gemm(const uint8_t* a, int64_t a_stride, const uint8_t* w, int64_t w_stride,
                 int64_t m_rows, int64_t n0, int64_t n1, int64_t words, int64_t k, int32_t* out,
                 int64_t out_stride) {
    for (int64_t m = 0; m < m_rows; ++m) {
        const uint8_t* am = a + m * a_stride;
        int32_t* om = out + m * out_stride;
        int64_t n = n0;
        for (; n + 4 <= n1; n += 4) {
            const uint8_t* w0 = w + (n + 0) * w_stride;
            const uint8_t* w1 = w + (n + 1) * w_stride;
            const uint8_t* w2 = w + (n + 2) * w_stride;
            const uint8_t* w3 = w + (n + 3) * w_stride;
            int64_t p0 = 0, p1 = 0, p2 = 0, p3 = 0;
            for (int64_t i = 0; i < words; ++i) {
                uint64_t av = load_word(am + 8 * i);
                p0 += _mm_popcnt_u64(av ^ load_word(w0 + 8 * i));
                p1 += _mm_popcnt_u64(av ^ load_word(w1 + 8 * i));
                p2 += _mm_popcnt_u64(av ^ load_word(w2 + 8 * i));
                p3 += _mm_popcnt_u64(av ^ load_word(w3 + 8 * i));
            }
            om[n + 0] = (int32_t)(k - 2 * p0);
            om[n + 1] = (int32_t)(k - 2 * p1);
            om[n + 2] = (int32_t)(k - 2 * p2);
            om[n + 3] = (int32_t)(k - 2 * p3);
        }
        for (; n < n1; ++n) {
            const uint8_t* wn = w + n * w_stride;
            int64_t p = 0;
            for (int64_t i = 0; i < words; ++i)
                p += _mm_popcnt_u64(load_word(am + 8 * i) ^ load_word(wn + 8 * i));
            om[n] = (int32_t)(k - 2 * p);
        }
    }
}

const lowbit_isa_table kTable = {"avx2", pack_signs_f32, binary_gemm};

}  // namespace

extern "C" const lowbit_isa_table* lowbit_isa_avx2(void) { return &kTable; }
