// AVX2-class path: there is no vector popcount before AVX-512 VPOPCNTDQ, so the count is
// Mula's nibble lookup (kernels.md §2.4): vpshufb of a 16-entry table on the low and the high
// nibbles of each byte, byte counts summed in byte accumulators, and every kFlushWords words
// vpsadbw against zero adds the 8 byte counts of each 64-bit lane. With the row-interleaved
// layout (binary.h) a ymm holds word i of 4 weight rows, so a lane is one output row and the
// sums need no horizontal reduction, exactly as in the AVX-512 kernel: per word and 4 rows x 1
// token, 7 vector ops (xor, 2 and, shift, 2 vpshufb, add) for 256 binary MACs, where a scalar
// `popcnt r64` loop needs 12 (xor, popcnt, add per row).
#include <immintrin.h>
#include <string.h>

#include "binary.h"

namespace {

// A byte accumulator gains at most 8 per word: 31 words keep it <= 248.
constexpr int64_t kFlushWords = 31;

static inline __m256i bcast_word(const uint8_t* p) {
    long long v;
    memcpy(&v, p, 8);
    return _mm256_set1_epi64x(v);
}

// Byte-wise popcount of x (each byte 0..8).
static inline __m256i popcnt_bytes(__m256i x, __m256i lut, __m256i low) {
    const __m256i lo = _mm256_and_si256(x, low);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low);
    return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

// NB blocks of 8 rows (2 ymm each) x T tokens over all words; writes pop for rows 8b..8b+7.
template <int NB, int T>
static void micro(const uint8_t* a, int64_t a_stride, const uint8_t* w, int64_t words, int32_t* pop,
                  int64_t pop_stride) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
    const int64_t block = words * 64;
    __m256i tot[T][2 * NB];  // 64-bit lane sums (touched once per kFlushWords words)
    for (int t = 0; t < T; ++t)
        for (int h = 0; h < 2 * NB; ++h) tot[t][h] = zero;
    for (int64_t i0 = 0; i0 < words; i0 += kFlushWords) {
        const int64_t i1 = i0 + kFlushWords < words ? i0 + kFlushWords : words;
        __m256i acc[T][2 * NB];
        for (int t = 0; t < T; ++t)
            for (int h = 0; h < 2 * NB; ++h) acc[t][h] = zero;
        for (int64_t i = i0; i < i1; ++i) {
            __m256i wv[2 * NB];
            for (int h = 0; h < 2 * NB; ++h) wv[h] = _mm256_loadu_si256((const __m256i*)(w + (h >> 1) * block + 64 * i + 32 * (h & 1)));
            for (int t = 0; t < T; ++t) {
                const __m256i av = bcast_word(a + t * a_stride + 8 * i);
                for (int h = 0; h < 2 * NB; ++h)
                    acc[t][h] = _mm256_add_epi8(acc[t][h], popcnt_bytes(_mm256_xor_si256(av, wv[h]), lut, low));
            }
        }
        for (int t = 0; t < T; ++t)
            for (int h = 0; h < 2 * NB; ++h) tot[t][h] = _mm256_add_epi64(tot[t][h], _mm256_sad_epu8(acc[t][h], zero));
    }
    // 64-bit lanes -> int32: lanes 0, 2, 4, 6 of each half after the permute hold the 4 rows.
    const __m256i pick = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    for (int t = 0; t < T; ++t)
        for (int b = 0; b < NB; ++b) {
            const __m128i lo = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(tot[t][2 * b], pick));
            const __m128i hi = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(tot[t][2 * b + 1], pick));
            _mm256_storeu_si256((__m256i*)(pop + t * pop_stride + 8 * b), _mm256_set_m128i(hi, lo));
        }
}

template <int NB>
static void micro_t(int t, const uint8_t* a, int64_t a_stride, const uint8_t* w, int64_t words, int32_t* pop,
                    int64_t pop_stride) {
    switch (t) {
        case 4: micro<NB, 4>(a, a_stride, w, words, pop, pop_stride); break;
        case 3: micro<NB, 3>(a, a_stride, w, words, pop, pop_stride); break;
        case 2: micro<NB, 2>(a, a_stride, w, words, pop, pop_stride); break;
        default: micro<NB, 1>(a, a_stride, w, words, pop, pop_stride); break;
    }
}

void popcount_gemm(const uint8_t* a, int64_t a_stride, const uint8_t* w, int64_t words, int64_t m_rows,
                   int64_t n_blocks, int32_t* pop, int64_t pop_stride) {
    if (m_rows == 1) {
        // GEMV: 2 blocks (4 ymm of weights) per step, one broadcast activation word.
        int64_t b = 0;
        for (; b + 2 <= n_blocks; b += 2) micro<2, 1>(a, a_stride, w + b * words * 64, words, pop + 8 * b, pop_stride);
        if (b < n_blocks) micro<1, 1>(a, a_stride, w + b * words * 64, words, pop + 8 * b, pop_stride);
        return;
    }
    for (int64_t b = 0; b < n_blocks; ++b) {
        const uint8_t* wb = w + b * words * 64;
        for (int64_t m = 0; m < m_rows; m += 4) {
            const int t = m_rows - m < 4 ? (int)(m_rows - m) : 4;
            micro_t<1>(t, a + m * a_stride, a_stride, wb, words, pop + m * pop_stride + 8 * b, pop_stride);
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
