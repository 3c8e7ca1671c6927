// AVX2-class path: there is no vector popcount before AVX-512 VPOPCNTDQ. `popcnt r64` issues
// on several ALUs per cycle on Zen / recent Intel, so a register-blocked scalar loop
// (4 weight rows x 2 tokens = 8 independent accumulators, 6 loads per 8 popcounts) keeps them
// busy without the byte-counter flushes a nibble-LUT (Mula) kernel needs.
#include <immintrin.h>
#include <string.h>

#include "binary.h"

namespace {

static inline uint64_t load_word(const uint8_t* p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

template <int R, int T>
static void micro(const uint8_t* a, int64_t a_stride, const uint8_t* w, int64_t w_stride,
                  int64_t words, int32_t* pop, int64_t pop_stride) {
    uint64_t acc[T][R] = {};
    for (int64_t i = 0; i < words; ++i) {
        uint64_t wv[R];
        for (int r = 0; r < R; ++r) wv[r] = load_word(w + r * w_stride + 8 * i);
        for (int t = 0; t < T; ++t) {
            const uint64_t av = load_word(a + t * a_stride + 8 * i);
            for (int r = 0; r < R; ++r) acc[t][r] += (uint64_t)_mm_popcnt_u64(av ^ wv[r]);
        }
    }
    for (int t = 0; t < T; ++t)
        for (int r = 0; r < R; ++r) pop[t * pop_stride + r] = (int32_t)acc[t][r];
}

template <int R>
static void micro_t(int t, const uint8_t* a, int64_t a_stride, const uint8_t* w, int64_t w_stride,
                    int64_t words, int32_t* pop, int64_t pop_stride) {
    if (t == 2) micro<R, 2>(a, a_stride, w, w_stride, words, pop, pop_stride);
    else micro<R, 1>(a, a_stride, w, w_stride, words, pop, pop_stride);
}

void popcount_gemm(const uint8_t* a, int64_t a_stride, const uint8_t* w, int64_t w_stride,
                   int64_t words, int64_t m_rows, int64_t n_rows, int32_t* pop,
                   int64_t pop_stride) {
    for (int64_t n = 0; n < n_rows; n += 4) {
        const int64_t r = n_rows - n < 4 ? n_rows - n : 4;
        for (int64_t m = 0; m < m_rows; m += 2) {
            const int t = m_rows - m < 2 ? (int)(m_rows - m) : 2;
            const uint8_t* am = a + m * a_stride;
            const uint8_t* wn = w + n * w_stride;
            int32_t* p = pop + m * pop_stride + n;
            if (r == 4) micro_t<4>(t, am, a_stride, wn, w_stride, words, p, pop_stride);
            else if (r == 3) micro_t<3>(t, am, a_stride, wn, w_stride, words, p, pop_stride);
            else if (r == 2) micro_t<2>(t, am, a_stride, wn, w_stride, words, p, pop_stride);
            else micro_t<1>(t, am, a_stride, wn, w_stride, words, p, pop_stride);
        }
    }
}

const lowbit_binary_table kTable = {"avx2", popcount_gemm};

}  // namespace

extern "C" const lowbit_binary_table* lowbit_binary_avx2(void) { return &kTable; }
