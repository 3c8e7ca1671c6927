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

// Rows r0..r0+3 of one 8-row block (w points at the block) x T tokens.
template <int T>
static void micro(const uint8_t* a, int64_t a_stride, const uint8_t* w, int r0, int64_t words, int32_t* pop,
                  int64_t pop_stride) {
    uint64_t acc[T][4] = {};
    for (int64_t i = 0; i < words; ++i) {
        uint64_t wv[4];
        for (int r = 0; r < 4; ++r) wv[r] = load_word(w + 64 * i + 8 * (r0 + r));
        for (int t = 0; t < T; ++t) {
            const uint64_t av = load_word(a + t * a_stride + 8 * i);
            for (int r = 0; r < 4; ++r) acc[t][r] += (uint64_t)_mm_popcnt_u64(av ^ wv[r]);
        }
    }
    for (int t = 0; t < T; ++t)
        for (int r = 0; r < 4; ++r) pop[t * pop_stride + r0 + r] = (int32_t)acc[t][r];
}

void popcount_gemm(const uint8_t* a, int64_t a_stride, const uint8_t* w, int64_t words, int64_t m_rows,
                   int64_t n_blocks, int32_t* pop, int64_t pop_stride) {
    for (int64_t b = 0; b < n_blocks; ++b) {
        const uint8_t* wb = w + b * words * 64;
        for (int64_t m = 0; m < m_rows; m += 2) {
            const uint8_t* am = a + m * a_stride;
            int32_t* p = pop + m * pop_stride + 8 * b;
            for (int r0 = 0; r0 < 8; r0 += 4) {
                if (m_rows - m >= 2) micro<2>(am, a_stride, wb, r0, words, p, pop_stride);
                else micro<1>(am, a_stride, wb, r0, words, p, pop_stride);
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

const lowbit_binary_table kTable = {"avx2", popcount_gemm, bits_epilogue};

}  // namespace

extern "C" const lowbit_binary_table* lowbit_binary_avx2(void) { return &kTable; }
