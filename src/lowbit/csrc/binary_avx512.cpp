// AVX-512 VPOPCNTDQ path: register-blocked XOR-popcount GEMM on row-interleaved weights
// (kernels.md §2.4; layout in binary.h).
//
// Microkernel: RB blocks of 8 weight rows x T tokens, accumulators in 64-bit lanes (lane r of
// acc[t][b] is output (token t, row 8b + r)). Per 64-bit word of K: RB weight loads and T
// broadcast activation loads feed 3 * RB * T ALU ops (xor, popcnt, add), so with 4 x 6 the loop
// is ALU-bound (~2 zmm ops/cycle on Zen 4 -> ~340 binary MAC/cycle), not load-bound. There are
// no horizontal reductions (lanes are outputs) and no K tail (one word per step), which is what
// short-K convolutions (K = 9 * C) need.
#include <immintrin.h>
#include <string.h>

#include "binary.h"

namespace {

template <int RB, int T>
static void micro(const uint8_t* a, int64_t a_stride, const uint8_t* w, int64_t words, int32_t* pop,
                  int64_t pop_stride) {
    __m512i acc[T][RB];
    for (int t = 0; t < T; ++t)
        for (int b = 0; b < RB; ++b) acc[t][b] = _mm512_setzero_si512();
    const int64_t block = words * 64;
    for (int64_t i = 0; i < words; ++i) {
        __m512i wv[RB];
        for (int b = 0; b < RB; ++b) wv[b] = _mm512_loadu_si512(w + b * block + 64 * i);
        for (int t = 0; t < T; ++t) {
            long long word;
            memcpy(&word, a + t * a_stride + 8 * i, 8);
            const __m512i av = _mm512_set1_epi64(word);
            for (int b = 0; b < RB; ++b)
                acc[t][b] = _mm512_add_epi64(acc[t][b], _mm512_popcnt_epi64(_mm512_xor_si512(av, wv[b])));
        }
    }
    for (int t = 0; t < T; ++t)
        for (int b = 0; b < RB; ++b)
            _mm256_storeu_si256((__m256i*)(pop + t * pop_stride + 8 * b), _mm512_cvtepi64_epi32(acc[t][b]));
}

template <int RB>
static void micro_t(int t, const uint8_t* a, int64_t a_stride, const uint8_t* w, int64_t words, int32_t* pop,
                    int64_t pop_stride) {
    switch (t) {
        case 6: micro<RB, 6>(a, a_stride, w, words, pop, pop_stride); break;
        case 5: micro<RB, 5>(a, a_stride, w, words, pop, pop_stride); break;
        case 4: micro<RB, 4>(a, a_stride, w, words, pop, pop_stride); break;
        case 3: micro<RB, 3>(a, a_stride, w, words, pop, pop_stride); break;
        case 2: micro<RB, 2>(a, a_stride, w, words, pop, pop_stride); break;
        default: micro<RB, 1>(a, a_stride, w, words, pop, pop_stride); break;
    }
}

// One token (GEMV, a batch-1 layer): memory-bound, so the weights are read as one sequential
// stream (block after block; a block's words are contiguous) with four independent
// accumulators along K, instead of four interleaved block streams. The hardware prefetcher
// keeps one stream ahead more easily; 4096 x 4096 (2 MiB of bits, L3-resident) is what it is for.
static void gemv(const uint8_t* a, const uint8_t* w, int64_t words, int64_t n_blocks, int32_t* pop) {
    for (int64_t b = 0; b < n_blocks; ++b) {
        const uint8_t* wb = w + b * words * 64;
        __m512i acc0 = _mm512_setzero_si512(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
        int64_t i = 0;
        for (; i + 4 <= words; i += 4) {
            long long x0, x1, x2, x3;
            memcpy(&x0, a + 8 * i, 8);
            memcpy(&x1, a + 8 * i + 8, 8);
            memcpy(&x2, a + 8 * i + 16, 8);
            memcpy(&x3, a + 8 * i + 24, 8);
            const __m512i w0 = _mm512_loadu_si512(wb + 64 * i), w1 = _mm512_loadu_si512(wb + 64 * i + 64);
            const __m512i w2 = _mm512_loadu_si512(wb + 64 * i + 128), w3 = _mm512_loadu_si512(wb + 64 * i + 192);
            acc0 = _mm512_add_epi64(acc0, _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_set1_epi64(x0), w0)));
            acc1 = _mm512_add_epi64(acc1, _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_set1_epi64(x1), w1)));
            acc2 = _mm512_add_epi64(acc2, _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_set1_epi64(x2), w2)));
            acc3 = _mm512_add_epi64(acc3, _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_set1_epi64(x3), w3)));
        }
        for (; i < words; ++i) {
            long long x0;
            memcpy(&x0, a + 8 * i, 8);
            const __m512i w0 = _mm512_loadu_si512(wb + 64 * i);
            acc0 = _mm512_add_epi64(acc0, _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_set1_epi64(x0), w0)));
        }
        const __m512i acc = _mm512_add_epi64(_mm512_add_epi64(acc0, acc1), _mm512_add_epi64(acc2, acc3));
        _mm256_storeu_si256((__m256i*)(pop + 8 * b), _mm512_cvtepi64_epi32(acc));
    }
}

void popcount_gemm(const uint8_t* a, int64_t a_stride, const uint8_t* w, int64_t words, int64_t m_rows,
                   int64_t n_blocks, int32_t* pop, int64_t pop_stride) {
    if (m_rows == 1) {
        gemv(a, w, words, n_blocks, pop);
        return;
    }
    for (int64_t b = 0; b < n_blocks; b += 4) {
        const int64_t rb = n_blocks - b < 4 ? n_blocks - b : 4;
        const uint8_t* wb = w + b * words * 64;
        for (int64_t m = 0; m < m_rows; m += 6) {
            const int t = m_rows - m < 6 ? (int)(m_rows - m) : 6;
            const uint8_t* am = a + m * a_stride;
            int32_t* p = pop + m * pop_stride + 8 * b;
            if (rb == 4) micro_t<4>(t, am, a_stride, wb, words, p, pop_stride);
            else if (rb == 3) micro_t<3>(t, am, a_stride, wb, words, p, pop_stride);
            else if (rb == 2) micro_t<2>(t, am, a_stride, wb, words, p, pop_stride);
            else micro_t<1>(t, am, a_stride, wb, words, p, pop_stride);
        }
    }
}


// Bit epilogue, 16 outputs per step: two compares and a per-lane select by the flip mask give
// the 16 sign bits of the next layer's packed input directly (kernels.md §2.4 "bitpacked output").
static void bits_epilogue(const int32_t* pop, int64_t len, int32_t k, const int32_t* corr, const int32_t* thr,
                          const uint8_t* flip, uint8_t* out) {
    const __m512i kv = _mm512_set1_epi32(k);
    const __m128i zero8 = _mm_setzero_si128();
    for (int64_t i = 0; i < len; i += 16) {
        const int64_t left = len - i;
        const __mmask16 valid = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
        __m512i d = _mm512_sub_epi32(kv, _mm512_slli_epi32(_mm512_maskz_loadu_epi32(valid, pop + i), 1));
        if (corr) d = _mm512_add_epi32(d, _mm512_maskz_loadu_epi32(valid, corr + i));
        const __m512i t = _mm512_maskz_loadu_epi32(valid, thr + i);
        const __mmask16 fl = _mm_cmpneq_epi8_mask(_mm_maskz_loadu_epi8(valid, flip + i), zero8);
        const __mmask16 lt = _mm512_cmplt_epi32_mask(d, t), gt = _mm512_cmpgt_epi32_mask(d, t);
        const uint16_t bits = (uint16_t)(((lt & ~fl) | (gt & fl)) & valid);
        memcpy(out + i / 8, &bits, 2);
    }
    // Whole 64-bit words: zero the bytes of the last word past len (they hold padding bits).
    const int64_t written = ((len + 15) / 16) * 2, total = ((len + 63) / 64) * 8;
    if (total > written) memset(out + written, 0, (size_t)(total - written));
}

const lowbit_binary_table kTable = {"avx512", popcount_gemm, bits_epilogue};

}  // namespace

extern "C" const lowbit_binary_table* lowbit_binary_avx512(void) { return &kTable; }
