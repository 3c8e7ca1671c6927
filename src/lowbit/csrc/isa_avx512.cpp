// AVX-512 F/BW/VL/DQ + VNNI + VPOPCNTDQ path (Ice Lake and later, Zen 4 and later).
#include <immintrin.h>
#include <string.h>

#include "group_sums.h"
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

// ---- ternary x int8 ------------------------------------------------------------------------
// Everything below has internal linkage (anonymous namespace, no std:: templates), so none of
// it can be merged with baseline code by the linker.

void absmax_f32(const float* x, int64_t rows, int64_t k, int64_t x_stride, float* amax) {
    for (int64_t r = 0; r < rows; ++r) {
        const float* xr = x + r * x_stride;
        // the maximum of the bit patterns of |x| (a NaN wins and stays; see isa_avx2.cpp)
        const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
        __m512i m = _mm512_setzero_si512();
        for (int64_t j = 0; j < k; j += 16) {
            const int64_t left = k - j;
            const __mmask16 valid = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
            m = _mm512_max_epi32(m, _mm512_and_si512(_mm512_maskz_loadu_epi32(valid, xr + j), abs_mask));
        }
        const int32_t best = _mm512_reduce_max_epi32(m);
        memcpy(amax + r, &best, 4);
    }
}

void quantize_i8(const float* x, int64_t rows, int64_t k, int64_t x_stride, const float* mult,
                 float lo, float hi_f, int8_t* q, int64_t q_stride, int64_t kq, int64_t group,
                 int32_t* sums, int64_t sums_stride) {
    // vpmovdb truncates to the low byte: 0..255 (unsigned mode) is stored as its uint8 byte.
    const __m512 vlo = _mm512_set1_ps(lo), hi = _mm512_set1_ps(hi_f);
    const bool u8 = hi_f > 127.0f;
    for (int64_t r = 0; r < rows; ++r) {
        const float* xr = x + r * x_stride;
        int8_t* qr = q + r * q_stride;
        const __m512 s = _mm512_set1_ps(mult[r]);
        __m512i total = _mm512_setzero_si512();
        for (int64_t j = 0; j < kq; j += 16) {
            const int64_t left = k - j, qleft = kq - j;
            const __mmask16 valid =
                left >= 16 ? (__mmask16)0xFFFF : (left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1u));
            const __mmask16 store = qleft >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << qleft) - 1u);
            __m512 t = _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, xr + j), s);
            t = _mm512_min_ps(_mm512_max_ps(t, vlo), hi);
            // Explicit round-to-nearest-even, independent of MXCSR (torch.round is half-to-even).
            const __m512i v = _mm512_cvt_roundps_epi32(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            total = _mm512_add_epi32(total, v);
            _mm_mask_storeu_epi8(qr + j, store, _mm512_cvtepi32_epi8(v));
        }
        int32_t* sr = sums + r * sums_stride;
        if (group <= 0) {
            sr[0] = _mm512_reduce_add_epi32(total);
        } else {
            row_group_sums(qr, kq, group, u8, sr);
        }
    }
}

inline __m512i bcast4(const int8_t* p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

inline __mmask16 lane_mask(int64_t n_valid, int64_t base) {
    const int64_t left = n_valid - base;
    return left >= 16 ? (__mmask16)0xFFFF : (left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1u));
}

// Stores one 16-row x 1-token result (integer or fused float epilogue).
inline void store_out(const lowbit_t2_args* p, int64_t m, int64_t n0, __m512i d, __m512i h) {
    const __mmask16 mask = lane_mask(p->n_valid, n0);
    if (p->out_i32) {
        _mm512_mask_storeu_epi32(p->out_i32 + m * p->out_i32_stride + n0, mask, d);
        if (p->asym) _mm512_mask_storeu_epi32(p->out_p32 + m * p->out_i32_stride + n0, mask, h);
        return;
    }
    const __m512 ai = _mm512_set1_ps(p->a_inv[m]);
    const __m512 b = p->bias ? _mm512_loadu_ps(p->bias + n0) : _mm512_setzero_ps();
    __m512 y;
    if (p->asym) {
        const __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(p->scale + n0),
                                         _mm512_mul_ps(_mm512_cvtepi32_ps(h), _mm512_loadu_ps(p->scale2 + n0)));
        y = _mm512_fmadd_ps(t, ai, b);
    } else {
        y = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(_mm512_loadu_ps(p->scale + n0), ai), b);
    }
    if (p->relu) y = _mm512_max_ps(_mm512_setzero_ps(), y);  // NaN stays NaN (maxps returns its 2nd operand)
    _mm512_mask_storeu_ps(p->out_f32 + m * p->out_f32_stride + n0, mask, y);
}

// Distance (bytes) of the software prefetch along each row block's weight stream: weights
// are read once per GEMV, so they come from DRAM unless the layer is hot in L2/L3.
constexpr int64_t kPrefetch = 1024;

// Weight formats share one tile geometry: 64 bytes = 16 rows x 4 bytes. BITS = 2 (ternary,
// code = w + 1, 4 planes of 4 k per tile) or 4 (int4, code = w + 8, 2 planes of 4 k per tile).
// The code offset ("zero") is removed once per token with zero * sum(a).
template <int BITS>
struct Fmt {
    static constexpr int planes = 8 / BITS;        // 4-k planes per tile
    static constexpr int tile_k = 4 * planes;      // k per tile
    static constexpr int mask = (1 << BITS) - 1;   // code mask
    static constexpr int zero = BITS == 2 ? 1 : 8;  // code offset (w + 1 or w + 8)
};

// RB row blocks x NR tokens, whole K. CH = independent accumulator chains per output.
template <int RB, int NR, bool ASYM, int CH, int BITS>
void block_kernel(const lowbit_t2_args* p, int64_t rb, int64_t m) {
    using F = Fmt<BITS>;
    const int64_t kt = p->kp / F::tile_k, rbs = kt * 64;
    const uint8_t* w = p->w + rb * rbs;
    const int8_t* a = p->a + m * p->a_stride;
    const int64_t as = p->a_stride;
    const __m512i mcode = _mm512_set1_epi8((char)F::mask), m1 = _mm512_set1_epi8(1);
    __m512i d[CH][RB][NR], h[CH][RB][NR];
#pragma GCC unroll 16
    for (int c = 0; c < CH; ++c)
#pragma GCC unroll 16
        for (int r = 0; r < RB; ++r)
#pragma GCC unroll 16
            for (int n = 0; n < NR; ++n) d[c][r][n] = h[c][r][n] = _mm512_setzero_si512();
    for (int64_t t = 0; t < kt; ++t) {
        __m512i v[RB];
#pragma GCC unroll 16
        for (int r = 0; r < RB; ++r) {
            const uint8_t* wt = w + r * rbs + t * 64;
            _mm_prefetch((const char*)(wt + kPrefetch), _MM_HINT_T0);
            v[r] = _mm512_loadu_si512(wt);
        }
        const int8_t* at = a + t * F::tile_k;
#pragma GCC unroll 16
        for (int pl = 0; pl < F::planes; ++pl) {
            const int c = pl % CH;
            __m512i code[RB], high[RB];
#pragma GCC unroll 16
            for (int r = 0; r < RB; ++r) {
                code[r] = _mm512_and_si512(_mm512_srli_epi16(v[r], BITS * pl), mcode);
                if (ASYM) high[r] = _mm512_and_si512(_mm512_srli_epi16(v[r], BITS * pl + 1), m1);
            }
#pragma GCC unroll 16
            for (int n = 0; n < NR; ++n) {
                const __m512i b = bcast4(at + n * as + 4 * pl);
#pragma GCC unroll 16
                for (int r = 0; r < RB; ++r) {
                    d[c][r][n] = _mm512_dpbusd_epi32(d[c][r][n], code[r], b);
                    if (ASYM) h[c][r][n] = _mm512_dpbusd_epi32(h[c][r][n], high[r], b);
                }
            }
        }
    }
#pragma GCC unroll 16
    for (int n = 0; n < NR; ++n) {
        const __m512i sa = _mm512_set1_epi32(F::zero * p->a_sums[(m + n) * p->sums_stride]);
#pragma GCC unroll 16
        for (int r = 0; r < RB; ++r) {
            __m512i dd = d[0][r][n], hh = h[0][r][n];
#pragma GCC unroll 16
            for (int c = 1; c < CH; ++c) {
                dd = _mm512_add_epi32(dd, d[c][r][n]);
                hh = _mm512_add_epi32(hh, h[c][r][n]);
            }
            store_out(p, m + n, (rb + r) * 16, _mm512_sub_epi32(dd, sa), hh);
        }
    }
}

// GEMV (one token), RB row blocks. Instead of shifting each plane down, it is masked in place:
// (tile & (mask << BITS*p)) holds code * 2^(BITS*p), so plane p accumulates 2^(BITS*p) times
// its dot product in its own register (independent vpdpbusd chains, and one AND per plane
// instead of a shift + an AND), and the exact sum is sum_p acc_p >> (BITS*p) (arithmetic
// shifts of exact multiples). Bound on the top plane: ternary 64*2*128*kp/4 = 4096*kp, int4
// 240*128*4*kp/8 = 15360*kp; both < 2^31 for the kp limits in gemv_ok(), longer rows take
// block_kernel.
template <int RB, bool ASYM, int BITS>
void gemv_kernel(const lowbit_t2_args* p, int64_t rb, int64_t m) {
    using F = Fmt<BITS>;
    const int64_t kt = p->kp / F::tile_k, rbs = kt * 64;
    const uint8_t* w = p->w + rb * rbs;
    const int8_t* a = p->a + m * p->a_stride;
    __m512i mk[F::planes], hk[F::planes];
#pragma GCC unroll 4
    for (int pl = 0; pl < F::planes; ++pl) {
        mk[pl] = _mm512_set1_epi8((char)(F::mask << (BITS * pl)));
        // High bit of each ternary code (w = +1) for asymmetric ternary: 2 * 4^p * [w = +1].
        hk[pl] = _mm512_set1_epi8((char)(2 << (BITS * pl)));
    }
    __m512i d[RB][F::planes], h[RB][F::planes];
#pragma GCC unroll 16
    for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
        for (int pl = 0; pl < F::planes; ++pl) d[r][pl] = h[r][pl] = _mm512_setzero_si512();
    for (int64_t t = 0; t < kt; ++t) {
        __m512i b[F::planes];
#pragma GCC unroll 4
        for (int pl = 0; pl < F::planes; ++pl) b[pl] = bcast4(a + t * F::tile_k + 4 * pl);
#pragma GCC unroll 16
        for (int r = 0; r < RB; ++r) {
            const uint8_t* wt = w + r * rbs + t * 64;
            // Two-level software prefetch for weights streamed from DRAM: into L2 4 KiB ahead
            // (more lines in flight than the L1 fill buffers allow) and into L1 512 B ahead.
            // Measured cold (17 layers cycled): 0.26 ms vs 0.31 ms with one L1 prefetch 1 KiB ahead.
            _mm_prefetch((const char*)(wt + 4096), _MM_HINT_T1);
            _mm_prefetch((const char*)(wt + 512), _MM_HINT_T0);
            const __m512i v = _mm512_loadu_si512(wt);
#pragma GCC unroll 4
            for (int pl = 0; pl < F::planes; ++pl) {
                d[r][pl] = _mm512_dpbusd_epi32(d[r][pl], _mm512_and_si512(v, mk[pl]), b[pl]);
                if (ASYM) h[r][pl] = _mm512_dpbusd_epi32(h[r][pl], _mm512_and_si512(v, hk[pl]), b[pl]);
            }
        }
    }
    const __m512i sa = _mm512_set1_epi32(F::zero * p->a_sums[m * p->sums_stride]);
#pragma GCC unroll 16
    for (int r = 0; r < RB; ++r) {
        __m512i dd = d[r][0], hh = _mm512_srai_epi32(h[r][0], 1);
#pragma GCC unroll 4
        for (int pl = 1; pl < F::planes; ++pl) {
            dd = _mm512_add_epi32(dd, _mm512_srai_epi32(d[r][pl], BITS * pl));
            if (ASYM) hh = _mm512_add_epi32(hh, _mm512_srai_epi32(h[r][pl], BITS * pl + 1));
        }
        store_out(p, m, (rb + r) * 16, _mm512_sub_epi32(dd, sa), hh);
    }
}

// Per-group scales: int32 dot products per group of group_k (a multiple of 4) k, each turned
// into float and scaled by its group's 16 row scales (one zmm load), accumulated in fp32.
// U (unsigned activations, a_unsigned): the activations are vpdpbusd's unsigned operand and the
// weights, decoded to signed bytes (code - zero), its signed one: D_g = sum w * u directly, no
// activation-sum correction per group.
template <int RB, int NR, int BITS, bool U>
void group_kernel(const lowbit_t2_args* p, int64_t rb, int64_t m) {
    using F = Fmt<BITS>;
    const int64_t kt = p->kp / F::tile_k, rbs = kt * 64;
    const int64_t gp = p->group_k / 4, n_planes = p->kp / 4;
    const int64_t n_groups = (p->kp + p->group_k - 1) / p->group_k;
    const uint8_t* w = p->w + rb * rbs;
    const int8_t* a = p->a + m * p->a_stride;
    const int64_t as = p->a_stride;
    const __m512i mcode = _mm512_set1_epi8((char)F::mask), zero8 = _mm512_set1_epi8((char)F::zero);
    __m512 f[RB][NR];
#pragma GCC unroll 16
    for (int r = 0; r < RB; ++r)
#pragma GCC unroll 16
        for (int n = 0; n < NR; ++n) f[r][n] = _mm512_setzero_ps();
    for (int64_t g = 0; g < n_groups; ++g) {
        const int64_t q0 = g * gp, q1 = q0 + gp < n_planes ? q0 + gp : n_planes;
        __m512i d[RB][NR];
#pragma GCC unroll 16
        for (int r = 0; r < RB; ++r)
#pragma GCC unroll 16
            for (int n = 0; n < NR; ++n) d[r][n] = _mm512_setzero_si512();
        for (int64_t q = q0; q < q1; ++q) {
            const int64_t tile = q / F::planes, pl = q % F::planes;
            const __m128i shift = _mm_cvtsi32_si128((int)(BITS * pl));
            __m512i code[RB];
#pragma GCC unroll 16
            for (int r = 0; r < RB; ++r) {
                const uint8_t* wt = w + r * rbs + tile * 64;
                if (pl == 0) _mm_prefetch((const char*)(wt + kPrefetch), _MM_HINT_T0);
                code[r] = _mm512_and_si512(_mm512_srl_epi16(_mm512_loadu_si512(wt), shift), mcode);
                if (U) code[r] = _mm512_sub_epi8(code[r], zero8);
            }
#pragma GCC unroll 16
            for (int n = 0; n < NR; ++n) {
                const __m512i b = bcast4(a + n * as + 4 * q);
#pragma GCC unroll 16
                for (int r = 0; r < RB; ++r)
                    d[r][n] = U ? _mm512_dpbusd_epi32(d[r][n], b, code[r]) : _mm512_dpbusd_epi32(d[r][n], code[r], b);
            }
        }
#pragma GCC unroll 16
        for (int r = 0; r < RB; ++r) {
            const __m512 sc = _mm512_loadu_ps(p->scale + ((rb + r) * n_groups + g) * 16);
#pragma GCC unroll 16
            for (int n = 0; n < NR; ++n) {
                const __m512i dd =
                    U ? d[r][n]
                      : _mm512_sub_epi32(d[r][n], _mm512_set1_epi32(F::zero * p->a_sums[(m + n) * p->sums_stride + g]));
                f[r][n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dd), sc, f[r][n]);
            }
        }
    }
#pragma GCC unroll 16
    for (int n = 0; n < NR; ++n) {
        const __m512 ai = _mm512_set1_ps(p->a_inv[m + n]);
#pragma GCC unroll 16
        for (int r = 0; r < RB; ++r) {
            const int64_t n0 = (rb + r) * 16;
            const __m512 b = p->bias ? _mm512_loadu_ps(p->bias + n0) : _mm512_setzero_ps();
            __m512 y = _mm512_fmadd_ps(f[r][n], ai, b);
            if (p->relu) y = _mm512_max_ps(_mm512_setzero_ps(), y);  // NaN stays NaN (maxps returns its 2nd operand)
            _mm512_mask_storeu_ps(p->out_f32 + (m + n) * p->out_f32_stride + n0, lane_mask(p->n_valid, n0), y);
        }
    }
}

// Groups of exactly 4 k (FGQ's N = 4) with unsigned activations: every 4-k plane is one group,
// so each vpdpbusd result is converted and scaled at once (no int32 accumulators kept across
// planes), which leaves registers for 8 tokens x 2 row blocks of fp32 accumulators; the tile is
// loaded once for all its planes.
template <int RB, int NR, int BITS>
void group4u_kernel(const lowbit_t2_args* p, int64_t rb, int64_t m) {
    using F = Fmt<BITS>;
    const int64_t kt = p->kp / F::tile_k, rbs = kt * 64, n_groups = p->kp / 4;
    const uint8_t* w = p->w + rb * rbs;
    const int8_t* a = p->a + m * p->a_stride;
    const int64_t as = p->a_stride;
    const __m512i mcode = _mm512_set1_epi8((char)F::mask), zero8 = _mm512_set1_epi8((char)F::zero);
    __m512 f[RB][NR];
#pragma GCC unroll 16
    for (int r = 0; r < RB; ++r)
#pragma GCC unroll 16
        for (int n = 0; n < NR; ++n) f[r][n] = _mm512_setzero_ps();
    for (int64_t t = 0; t < kt; ++t) {
        __m512i v[RB];
#pragma GCC unroll 16
        for (int r = 0; r < RB; ++r) {
            const uint8_t* wt = w + r * rbs + t * 64;
            _mm_prefetch((const char*)(wt + kPrefetch), _MM_HINT_T0);
            v[r] = _mm512_loadu_si512(wt);
        }
#pragma GCC unroll 4
        for (int pl = 0; pl < F::planes; ++pl) {
            const int64_t g = t * F::planes + pl;
            __m512i code[RB];
            __m512 sc[RB];
#pragma GCC unroll 16
            for (int r = 0; r < RB; ++r) {
                code[r] = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v[r], BITS * pl), mcode), zero8);
                sc[r] = _mm512_loadu_ps(p->scale + ((rb + r) * n_groups + g) * 16);
            }
#pragma GCC unroll 16
            for (int n = 0; n < NR; ++n) {
                const __m512i b = bcast4(a + n * as + 4 * g);
#pragma GCC unroll 16
                for (int r = 0; r < RB; ++r) {
                    const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), b, code[r]);
                    f[r][n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc[r], f[r][n]);
                }
            }
        }
    }
#pragma GCC unroll 16
    for (int n = 0; n < NR; ++n) {
        const __m512 ai = _mm512_set1_ps(p->a_inv[m + n]);
#pragma GCC unroll 16
        for (int r = 0; r < RB; ++r) {
            const int64_t n0 = (rb + r) * 16;
            const __m512 b = p->bias ? _mm512_loadu_ps(p->bias + n0) : _mm512_setzero_ps();
            __m512 y = _mm512_fmadd_ps(f[r][n], ai, b);
            if (p->relu) y = _mm512_max_ps(_mm512_setzero_ps(), y);  // NaN stays NaN (maxps returns its 2nd operand)
            _mm512_mask_storeu_ps(p->out_f32 + (m + n) * p->out_f32_stride + n0, lane_mask(p->n_valid, n0), y);
        }
    }
}

enum Mode { kBlock, kBlockAsym, kGroup, kGroupU, kGroup4U, kGemv, kGemvAsym };

// Kernel selection for a block of rbn <= RB row blocks and mn <= NR tokens (tails included).
template <int RB, int NR, int MODE, int BITS>
void run_block(const lowbit_t2_args* p, int64_t rb, int64_t m, int64_t rbn, int64_t mn) {
    if constexpr (RB > 1) {
        if (rbn < RB) return run_block<RB - 1, NR, MODE, BITS>(p, rb, m, rbn, mn);
    }
    if constexpr (NR > 1) {
        if (mn < NR) return run_block<RB, NR - 1, MODE, BITS>(p, rb, m, rbn, mn);
    }
    if constexpr (MODE == kBlock) block_kernel<RB, NR, false, (NR == 1 ? 2 : 1), BITS>(p, rb, m);
    if constexpr (MODE == kBlockAsym) block_kernel<RB, NR, true, (NR == 1 ? 2 : 1), BITS>(p, rb, m);
    if constexpr (MODE == kGroup) group_kernel<RB, NR, BITS, false>(p, rb, m);
    if constexpr (MODE == kGroupU) group_kernel<RB, NR, BITS, true>(p, rb, m);
    if constexpr (MODE == kGroup4U) group4u_kernel<RB, NR, BITS>(p, rb, m);
    if constexpr (MODE == kGemv) gemv_kernel<RB, false, BITS>(p, rb, m);
    if constexpr (MODE == kGemvAsym) gemv_kernel<RB, true, BITS>(p, rb, m);
}

template <int RB, int NR, int MODE, int BITS>
void drive(const lowbit_t2_args* p) {
    for (int64_t rb = p->rb0; rb < p->rb1; rb += RB) {
        const int64_t rbn = p->rb1 - rb < RB ? p->rb1 - rb : RB;
        for (int64_t m = p->m0; m < p->m1; m += NR) {
            const int64_t mn = p->m1 - m < NR ? p->m1 - m : NR;
            run_block<RB, NR, MODE, BITS>(p, rb, m, rbn, mn);
        }
    }
}

// Block shapes measured on the Zen 4 VM (CPU time, 4096x4096): GEMM 2 row blocks x 8 tokens
// (16 accumulators; 3x8 and 2x12 spill and were 10-20% slower), asymmetric 2x4, GEMV 2 row
// blocks (4 spilled; 1 was slower hot).
template <int BITS>
void gemm_bits(const lowbit_t2_args* p) {
    const bool gemv = p->m1 - p->m0 == 1;
    const bool gemv_ok = p->kp < (BITS == 2 ? ((int64_t)1 << 19) : ((int64_t)1 << 17));
    if (p->group_k == 4 && p->a_unsigned) {
        if (gemv) drive<4, 1, kGroup4U, BITS>(p);
        else drive<2, 8, kGroup4U, BITS>(p);
    } else if (p->group_k > 0 && p->a_unsigned) {
        if (gemv) drive<4, 1, kGroupU, BITS>(p);
        else drive<2, 4, kGroupU, BITS>(p);
    } else if (p->group_k > 0) {
        if (gemv) drive<4, 1, kGroup, BITS>(p);
        else drive<2, 4, kGroup, BITS>(p);
    } else if (p->asym) {
        if (gemv && gemv_ok) drive<2, 1, kGemvAsym, BITS>(p);
        else if (gemv) drive<4, 1, kBlockAsym, BITS>(p);
        else drive<2, 4, kBlockAsym, BITS>(p);
    } else {
        if (gemv && gemv_ok) drive<2, 1, kGemv, BITS>(p);
        else if (gemv) drive<4, 1, kBlock, BITS>(p);
        else drive<2, 8, kBlock, BITS>(p);
    }
}

void ternary_gemm(const lowbit_t2_args* p) {
    if (p->bits == 4) gemm_bits<4>(p);
    else gemm_bits<2>(p);
}

// ---- exact float path ----------------------------------------------------------------------
// fp32 activations (x rows zero-padded to kp by the driver). For k = 4q + j of plane q, lane r
// of (tile >> (8j + BITS*pl)) holds row r's code in its low bits with the next plane's code
// above it; vpermps looks at 4 index bits, so a 16-entry table indexed by (code + 2^BITS *
// next) maps it straight to the float weight: one shift, one permute, one FMA per 16 weights.
template <int RB, int NR, int BITS, bool ASYM, bool GROUP>
void float_kernel(const lowbit_t2_args* p, int64_t rb, int64_t m) {
    using F = Fmt<BITS>;
    const int64_t kt = p->kp / F::tile_k, rbs = kt * 64;
    const uint8_t* w = p->w + rb * rbs;
    const float* x = p->x + m * p->x_stride;
    const int64_t xs = p->x_stride;
    const int64_t gp = GROUP ? p->group_k / 4 : 0;
    const int64_t n_groups = GROUP ? (p->kp + p->group_k - 1) / p->group_k : 1;
    alignas(64) float lw[16], lp[16];
    for (int i = 0; i < 16; ++i) {
        lw[i] = (float)((i & F::mask) - F::zero);
        lp[i] = (i & 3) == 2 ? 1.0f : 0.0f;  // asymmetric ternary: [w = +1]
    }
    const __m512 lut = _mm512_load_ps(lw), lutp = _mm512_load_ps(lp);
    __m512 f[RB][NR], h[RB][NR], tot[RB][NR];
#pragma GCC unroll 16
    for (int r = 0; r < RB; ++r)
#pragma GCC unroll 16
        for (int n = 0; n < NR; ++n) f[r][n] = h[r][n] = tot[r][n] = _mm512_setzero_ps();
    int64_t g = 0;
    for (int64_t t = 0; t < kt; ++t) {
        __m512i v[RB];
#pragma GCC unroll 16
        for (int r = 0; r < RB; ++r) {
            const uint8_t* wt = w + r * rbs + t * 64;
            _mm_prefetch((const char*)(wt + kPrefetch), _MM_HINT_T0);
            v[r] = _mm512_loadu_si512(wt);
        }
#pragma GCC unroll 4
        for (int pl = 0; pl < F::planes; ++pl) {
            const float* xk = x + t * F::tile_k + 4 * pl;
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j) {
                __m512 wv[RB], hv[RB];
#pragma GCC unroll 16
                for (int r = 0; r < RB; ++r) {
                    const __m512i idx = _mm512_srli_epi32(v[r], 8 * j + BITS * pl);
                    wv[r] = _mm512_permutexvar_ps(idx, lut);
                    if (ASYM) hv[r] = _mm512_permutexvar_ps(idx, lutp);
                }
#pragma GCC unroll 16
                for (int n = 0; n < NR; ++n) {
                    const __m512 xb = _mm512_set1_ps(xk[n * xs + j]);
#pragma GCC unroll 16
                    for (int r = 0; r < RB; ++r) {
                        f[r][n] = _mm512_fmadd_ps(wv[r], xb, f[r][n]);
                        if (ASYM) h[r][n] = _mm512_fmadd_ps(hv[r], xb, h[r][n]);
                    }
                }
            }
            if (GROUP) {
                const int64_t q = t * F::planes + pl;
                if ((q + 1) % gp == 0 || q + 1 == p->kp / 4) {
#pragma GCC unroll 16
                    for (int r = 0; r < RB; ++r) {
                        const __m512 sc = _mm512_loadu_ps(p->scale + ((rb + r) * n_groups + g) * 16);
#pragma GCC unroll 16
                        for (int n = 0; n < NR; ++n) {
                            tot[r][n] = _mm512_fmadd_ps(f[r][n], sc, tot[r][n]);
                            f[r][n] = _mm512_setzero_ps();
                        }
                    }
                    ++g;
                }
            }
        }
    }
#pragma GCC unroll 16
    for (int r = 0; r < RB; ++r) {
        const int64_t n0 = (rb + r) * 16;
        const __m512 b = p->bias ? _mm512_loadu_ps(p->bias + n0) : _mm512_setzero_ps();
        const __m512 sc = GROUP ? _mm512_setzero_ps() : _mm512_loadu_ps(p->scale + n0);
        const __m512 sc2 = ASYM ? _mm512_loadu_ps(p->scale2 + n0) : _mm512_setzero_ps();
#pragma GCC unroll 16
        for (int n = 0; n < NR; ++n) {
            __m512 y;
            if (GROUP) y = _mm512_add_ps(tot[r][n], b);
            else if (ASYM) y = _mm512_fmadd_ps(f[r][n], sc, _mm512_fmadd_ps(h[r][n], sc2, b));
            else y = _mm512_fmadd_ps(f[r][n], sc, b);
            if (p->relu) y = _mm512_max_ps(_mm512_setzero_ps(), y);  // NaN stays NaN (maxps returns its 2nd operand)
            _mm512_mask_storeu_ps(p->out_f32 + (m + n) * p->out_f32_stride + n0, lane_mask(p->n_valid, n0), y);
        }
    }
}

template <int RB, int NR, int BITS, bool ASYM, bool GROUP>
void run_float(const lowbit_t2_args* p, int64_t rb, int64_t m, int64_t rbn, int64_t mn) {
    if constexpr (RB > 1) {
        if (rbn < RB) return run_float<RB - 1, NR, BITS, ASYM, GROUP>(p, rb, m, rbn, mn);
    }
    if constexpr (NR > 1) {
        if (mn < NR) return run_float<RB, NR - 1, BITS, ASYM, GROUP>(p, rb, m, rbn, mn);
    }
    float_kernel<RB, NR, BITS, ASYM, GROUP>(p, rb, m);
}

template <int RB, int NR, int BITS, bool ASYM, bool GROUP>
void drive_float(const lowbit_t2_args* p) {
    for (int64_t rb = p->rb0; rb < p->rb1; rb += RB) {
        const int64_t rbn = p->rb1 - rb < RB ? p->rb1 - rb : RB;
        for (int64_t m = p->m0; m < p->m1; m += NR) {
            const int64_t mn = p->m1 - m < NR ? p->m1 - m : NR;
            run_float<RB, NR, BITS, ASYM, GROUP>(p, rb, m, rbn, mn);
        }
    }
}

template <int BITS>
void float_bits(const lowbit_t2_args* p) {
    const bool gemv = p->m1 - p->m0 == 1;
    if (p->group_k > 0) {
        if (gemv) drive_float<4, 1, BITS, false, true>(p);
        else drive_float<2, 6, BITS, false, true>(p);
    } else if (p->asym) {
        if (gemv) drive_float<4, 1, BITS, true, false>(p);
        else drive_float<2, 6, BITS, true, false>(p);
    } else {
        if (gemv) drive_float<4, 1, BITS, false, false>(p);
        else drive_float<2, 8, BITS, false, false>(p);
    }
}

void ternary_gemm_f32(const lowbit_t2_args* p) {
    if (p->bits == 4) float_bits<4>(p);
    else float_bits<2>(p);
}

const lowbit_isa_table kTable = {"avx512", pack_signs_f32, binary_gemm, absmax_f32, quantize_i8,
                                 ternary_gemm, ternary_gemm_f32};

}  // namespace

extern "C" const lowbit_isa_table* lowbit_isa_avx512(void) { return &kTable; }
