// AVX-512 VPOPCNTDQ path: register-blocked XOR-popcount GEMM (kernels.md §2.4).
//
// Microkernel: R weight rows x T tokens of 64-bit-lane accumulators (4 x 6 = 24 zmm), one
// 512-bit chunk of K per step: R + T loads feed 3 * R * T ALU ops (xor, popcnt, add), so the
// loop is ALU-bound (~2 zmm ops/cycle on Zen 4 -> ~340 binary MAC/cycle) rather than load-bound.
// Horizontal reductions are deferred to the end of K (one per output). The K tail (words % 8)
// uses masked zero-filling loads: zero words cancel in a ^ w.
#include <immintrin.h>

#include "binary.h"

namespace {

template <int R, int T>
static void micro(const uint8_t* a, int64_t a_stride, const uint8_t* w, int64_t w_stride,
                  int64_t words, int32_t* pop, int64_t pop_stride) {
    __m512i acc[T][R];
    for (int t = 0; t < T; ++t)
        for (int r = 0; r < R; ++r) acc[t][r] = _mm512_setzero_si512();
    const int64_t full = words / 8;
    for (int64_t i = 0; i < full; ++i) {
        __m512i wv[R];
        for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_si512(w + r * w_stride + 64 * i);
        for (int t = 0; t < T; ++t) {
            const __m512i av = _mm512_loadu_si512(a + t * a_stride + 64 * i);
            for (int r = 0; r < R; ++r)
                acc[t][r] = _mm512_add_epi64(acc[t][r], _mm512_popcnt_epi64(_mm512_xor_si512(av, wv[r])));
        }
    }
    if (words % 8) {
        const __mmask8 tail = (__mmask8)((1u << (words % 8)) - 1u);
        const int64_t o = 64 * full;
        __m512i wv[R];
        for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_epi64(tail, w + r * w_stride + o);
        for (int t = 0; t < T; ++t) {
            const __m512i av = _mm512_maskz_loadu_epi64(tail, a + t * a_stride + o);
            for (int r = 0; r < R; ++r)
                acc[t][r] = _mm512_add_epi64(acc[t][r], _mm512_popcnt_epi64(_mm512_xor_si512(av, wv[r])));
        }
    }
    for (int t = 0; t < T; ++t)
        for (int r = 0; r < R; ++r) pop[t * pop_stride + r] = (int32_t)_mm512_reduce_add_epi64(acc[t][r]);
}

template <int R>
static void micro_t(int t, const uint8_t* a, int64_t a_stride, const uint8_t* w, int64_t w_stride,
                    int64_t words, int32_t* pop, int64_t pop_stride) {
    switch (t) {
        case 6: micro<R, 6>(a, a_stride, w, w_stride, words, pop, pop_stride); break;
        case 5: micro<R, 5>(a, a_stride, w, w_stride, words, pop, pop_stride); break;
        case 4: micro<R, 4>(a, a_stride, w, w_stride, words, pop, pop_stride); break;
        case 3: micro<R, 3>(a, a_stride, w, w_stride, words, pop, pop_stride); break;
        case 2: micro<R, 2>(a, a_stride, w, w_stride, words, pop, pop_stride); break;
        default: micro<R, 1>(a, a_stride, w, w_stride, words, pop, pop_stride); break;
    }
}

void popcount_gemm(const uint8_t* a, int64_t a_stride, const uint8_t* w, int64_t w_stride,
                   int64_t words, int64_t m_rows, int64_t n_rows, int32_t* pop,
                   int64_t pop_stride) {
    if (m_rows == 1) {
        // GEMV: one token, 8 weight rows per pass so each activation load feeds 8 popcounts.
        int64_t n = 0;
        for (; n + 8 <= n_rows; n += 8) micro<8, 1>(a, a_stride, w + n * w_stride, w_stride, words, pop + n, pop_stride);
        for (; n < n_rows; ++n) micro<1, 1>(a, a_stride, w + n * w_stride, w_stride, words, pop + n, pop_stride);
        return;
    }
    for (int64_t n = 0; n < n_rows; n += 4) {
        const int64_t r = n_rows - n < 4 ? n_rows - n : 4;
        const uint8_t* wn = w + n * w_stride;
        for (int64_t m = 0; m < m_rows; m += 6) {
            const int t = m_rows - m < 6 ? (int)(m_rows - m) : 6;
            const uint8_t* am = a + m * a_stride;
            int32_t* p = pop + m * pop_stride + n;
            if (r == 4) micro_t<4>(t, am, a_stride, wn, w_stride, words, p, pop_stride);
            else if (r == 3) micro_t<3>(t, am, a_stride, wn, w_stride, words, p, pop_stride);
            else if (r == 2) micro_t<2>(t, am, a_stride, wn, w_stride, words, p, pop_stride);
            else micro_t<1>(t, am, a_stride, wn, w_stride, words, p, pop_stride);
        }
    }
}

const lowbit_binary_table kTable = {"avx512", popcount_gemm};

}  // namespace

extern "C" const lowbit_binary_table* lowbit_binary_avx512(void) { return &kTable; }
