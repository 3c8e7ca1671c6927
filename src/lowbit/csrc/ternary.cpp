#include "ternary.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "threadpool.h"

namespace lowbit {

void ternary_pack(const int8_t* codes, int64_t n, int64_t k, int64_t stride, uint8_t* dst) {
    const int64_t kp = ternary_kp(k), kt = kp / 16, nrb = ternary_row_blocks(n);
    // Code 1 (= weight 0) in every 2-bit field: 0b01010101.
    std::memset(dst, 0x55, (size_t)(nrb * kt * 64));
    for (int64_t row = 0; row < n; ++row) {
        const int8_t* c = codes + row * stride;
        const int64_t rb = row / 16, r = row % 16;
        for (int64_t kk = 0; kk < k; ++kk) {
            const int v = c[kk];
            if (v < -1 || v > 1)
                throw std::invalid_argument("ternary codes must be -1, 0 or 1; row " + std::to_string(row) +
                                            " has " + std::to_string(v) + " at column " + std::to_string(kk));
            uint8_t* byte = dst + (rb * kt + kk / 16) * 64 + 4 * r + (kk & 3);
            const int shift = 2 * (int)((kk % 16) >> 2);
            *byte = (uint8_t)((*byte & ~(3u << shift)) | ((unsigned)(v + 1) << shift));
        }
    }
}

void ternary_unpack(const uint8_t* src, int64_t n, int64_t k, int8_t* codes) {
    const int64_t kt = ternary_kp(k) / 16;
    for (int64_t row = 0; row < n; ++row) {
        const int64_t rb = row / 16, r = row % 16;
        for (int64_t kk = 0; kk < k; ++kk) {
            const uint8_t byte = src[(rb * kt + kk / 16) * 64 + 4 * r + (kk & 3)];
            codes[row * k + kk] = (int8_t)(((byte >> (2 * ((kk % 16) >> 2))) & 3) - 1);
        }
    }
}

void int4_pack(const int8_t* codes, int64_t n, int64_t k, int64_t stride, uint8_t* dst) {
    const int64_t kp = ternary_kp(k), kt = kp / 8, nrb = ternary_row_blocks(n);
    std::memset(dst, 0x88, (size_t)(nrb * kt * 64));  // code 8 (= weight 0) in both nibbles
    for (int64_t row = 0; row < n; ++row) {
        const int8_t* c = codes + row * stride;
        const int64_t rb = row / 16, r = row % 16;
        for (int64_t kk = 0; kk < k; ++kk) {
            const int v = c[kk];
            if (v < -8 || v > 7)
                throw std::invalid_argument("4-bit codes must be in [-8, 7]; row " + std::to_string(row) + " has " +
                                            std::to_string(v) + " at column " + std::to_string(kk));
            uint8_t* byte = dst + (rb * kt + kk / 8) * 64 + 4 * r + (kk & 3);
            const int shift = 4 * (int)((kk % 8) >> 2);
            *byte = (uint8_t)((*byte & ~(15u << shift)) | ((unsigned)(v + 8) << shift));
        }
    }
}

void int4_unpack(const uint8_t* src, int64_t n, int64_t k, int8_t* codes) {
    const int64_t kt = ternary_kp(k) / 8;
    for (int64_t row = 0; row < n; ++row) {
        const int64_t rb = row / 16, r = row % 16;
        for (int64_t kk = 0; kk < k; ++kk) {
            const uint8_t byte = src[(rb * kt + kk / 8) * 64 + 4 * r + (kk & 3)];
            codes[row * k + kk] = (int8_t)(((byte >> (4 * ((kk % 8) >> 2))) & 15) - 8);
        }
    }
}

namespace {

// Smallest E with round_half_even(amax * 2^-E) <= 127, i.e. amax < 127.5 * 2^E (the rule of
// lowbit.functional.dfp_exponent), bounded so that 2^-E stays a finite float.
int dfp_exponent(float amax) {
    if (!(amax > 0.0f)) return 0;
    int ex;
    std::frexp(amax, &ex);  // amax = f * 2^ex, f in [0.5, 1); 127.5 * 2^(ex-7) < 2^ex
    const int e = (double)amax < std::ldexp(127.5, ex - 7) ? ex - 7 : ex - 6;
    return std::max(e, -126);
}

}  // namespace

float act_multiplier(float amax, int mode, int exponent, float* a_inv) {
    if (mode == kActAbsmax) {
        // BitNet's recipe; the 1e-5 floor keeps the scale finite for all-zero tokens.
        const float s = 127.0f / std::max(amax, 1e-5f);
        *a_inv = 1.0f / s;
        return s;
    }
    const int e = (mode == kActDfpFixed || mode == kActUdfpFixed) ? exponent : dfp_exponent(amax);
    if (e < -126 || e > 127) throw std::invalid_argument("DFP exponent must be in [-126, 127]");
    *a_inv = std::ldexp(1.0f, e);
    return std::ldexp(1.0f, -e);
}

void quantize_activations(const lowbit_isa_table& t, const float* x, int64_t m, int64_t k,
                          int64_t x_stride, int mode, int exponent, int64_t kq, int64_t group,
                          int8_t* q, int64_t q_stride, int32_t* sums, int64_t n_groups, float* a_inv,
                          int n_threads) {
    std::vector<float> amax((size_t)m, 0.0f), mult((size_t)m);
    // absmax is symmetric (BitNet); dynamic fixed point uses the whole int8 range, like
    // lowbit.functional.dfp_quantize.
    const float lo = mode == kActAbsmax ? -127.0f : (mode == kActUdfpFixed ? 0.0f : -128.0f);
    const float hi = mode == kActUdfpFixed ? 255.0f : 127.0f;
    // A token of 4096 floats quantizes in ~1 us: threads only pay off for batches.
    const int threads = m * k >= (1 << 16) ? n_threads : 1;
    if (mode != kActDfpFixed && mode != kActUdfpFixed)
        parallel_for(m, threads, 8, [&](int64_t b, int64_t e) {
            t.absmax_f32(x + b * x_stride, e - b, k, x_stride, amax.data() + b);
        });
    if (mode == kActDfpTensor) {
        float all = 0.0f;
        for (float v : amax) all = std::max(all, v);
        std::fill(amax.begin(), amax.end(), all);
    }
    for (int64_t i = 0; i < m; ++i) mult[(size_t)i] = act_multiplier(amax[(size_t)i], mode, exponent, a_inv + i);
    parallel_for(m, threads, 8, [&](int64_t b, int64_t e) {
        t.quantize_i8(x + b * x_stride, e - b, k, x_stride, mult.data() + b, lo, hi, q + b * q_stride, q_stride, kq, group,
                      sums + b * n_groups, n_groups);
    });
}

void ternary_gemm_run(const lowbit_isa_table& t, const lowbit_t2_args& args, int64_t m,
                      int64_t row_blocks, int n_threads, bool float_path) {
    void (*kernel)(const lowbit_t2_args*) = float_path ? t.ternary_gemm_f32 : t.ternary_gemm;
    const int64_t macs = m * row_blocks * 16 * args.kp;
    // Waking a pool thread costs a few microseconds: small problems run on the caller.
    if (macs < ((int64_t)1 << 21)) n_threads = 1;
    if (row_blocks >= 2 * (int64_t)n_threads || m < 16) {
        // Split the weights: each thread streams its own rows (GEMV and most GEMMs).
        const int64_t grain = 4;  // whole 2-row-block kernel blocks per thread
        parallel_for(row_blocks, n_threads, grain, [&](int64_t b, int64_t e) {
            lowbit_t2_args a = args;
            a.rb0 = b;
            a.rb1 = e;
            a.m0 = 0;
            a.m1 = m;
            kernel(&a);
        });
    } else {
        // Few output rows, many tokens: split the tokens.
        parallel_for(m, n_threads, 8, [&](int64_t b, int64_t e) {
            lowbit_t2_args a = args;
            a.rb0 = 0;
            a.rb1 = row_blocks;
            a.m0 = b;
            a.m1 = e;
            kernel(&a);
        });
    }
}

}  // namespace lowbit
