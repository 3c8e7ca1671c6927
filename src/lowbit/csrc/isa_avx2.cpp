// AVX2 + FMA + POPCNT path (Haswell and later, Zen 1 and later).
// There is no vector popcount before AVX-512 VPOPCNTDQ, so the binary GEMM uses scalar
// `popcnt r64`, four weight rows at a time to keep independent dependency chains.
#include <immintrin.h>
#include <string.h>

#include "group_sums.h"
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

// ---- ternary x int8 ------------------------------------------------------------------------
// Same tile layout as the AVX-512 path: a 64-byte tile is two ymm, rows 0-7 then rows 8-15.
// vpmaddubsw(code, a) multiplies u8 codes (<= 2) by s8 activations and adds pairs into int16:
// |2 * 2 * 128| = 512 per product pair, so four planes summed in int16 stay <= 2048 (no
// saturation, unlike bitnet.cpp's 128-step int16 accumulation), then vpmaddwd widens to int32.

// max |x| per row as the maximum of the bit patterns of |x|: non-negative floats order like their
// bits, and a NaN (above +inf) wins and stays, so a row with a NaN gets amax NaN and NaN outputs
// (as the PyTorch reference), where a float max would drop it.
void absmax_f32(const float* x, int64_t rows, int64_t k, int64_t x_stride, float* amax) {
    const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
    for (int64_t r = 0; r < rows; ++r) {
        const float* xr = x + r * x_stride;
        __m256i m = _mm256_setzero_si256();
        int64_t j = 0;
        for (; j + 8 <= k; j += 8)
            m = _mm256_max_epi32(m, _mm256_and_si256(_mm256_loadu_si256((const __m256i*)(xr + j)), abs_mask));
        int32_t lanes[8];
        _mm256_storeu_si256((__m256i*)lanes, m);
        int32_t best = 0;
        #pragma GCC unroll 16
        for (int i = 0; i < 8; ++i) best = lanes[i] > best ? lanes[i] : best;
        for (; j < k; ++j) {
            int32_t v;
            memcpy(&v, xr + j, 4);
            v &= 0x7FFFFFFF;
            best = v > best ? v : best;
        }
        memcpy(amax + r, &best, 4);
    }
}

inline int32_t round_clamp(float t, float lo, float hi) {
    t = t < lo ? lo : (t > hi ? hi : t);
    return _mm_cvtss_si32(_mm_round_ss(_mm_setzero_ps(), _mm_set_ss(t), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

void quantize_i8(const float* x, int64_t rows, int64_t k, int64_t x_stride, const float* mult,
                 float lo, float hi_f, int8_t* q, int64_t q_stride, int64_t kq, int64_t group,
                 int32_t* sums, int64_t sums_stride) {
    const __m256 vlo = _mm256_set1_ps(lo), hi = _mm256_set1_ps(hi_f);
    const bool u8 = hi_f > 127.0f;  // unsigned 0..255: pack with unsigned saturation
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t r = 0; r < rows; ++r) {
        const float* xr = x + r * x_stride;
        int8_t* qr = q + r * q_stride;
        const float sf = mult[r];
        const __m256 s = _mm256_set1_ps(sf);
        __m256i total = _mm256_setzero_si256();
        int64_t j = 0;
        for (; j + 32 <= k; j += 32) {
            __m256i v[4];
            #pragma GCC unroll 16
            for (int i = 0; i < 4; ++i) {
                __m256 t = _mm256_mul_ps(_mm256_loadu_ps(xr + j + 8 * i), s);
                t = _mm256_min_ps(_mm256_max_ps(t, vlo), hi);
                v[i] = _mm256_cvtps_epi32(_mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
                total = _mm256_add_epi32(total, v[i]);
            }
            // packs work per 128-bit lane; the final permute restores element order.
            const __m256i w0 = _mm256_packs_epi32(v[0], v[1]), w1 = _mm256_packs_epi32(v[2], v[3]);
            const __m256i b = u8 ? _mm256_packus_epi16(w0, w1) : _mm256_packs_epi16(w0, w1);
            _mm256_storeu_si256((__m256i*)(qr + j), _mm256_permutevar8x32_epi32(b, order));
        }
        int32_t lanes[8];
        _mm256_storeu_si256((__m256i*)lanes, total);
        int32_t sum = 0;
        #pragma GCC unroll 16
        for (int i = 0; i < 8; ++i) sum += lanes[i];
        for (; j < kq; ++j) {
            const int32_t v = j < k ? round_clamp(xr[j] * sf, lo, hi_f) : 0;
            qr[j] = (int8_t)(uint8_t)v;
            sum += v;
        }
        int32_t* sr = sums + r * sums_stride;
        if (group <= 0) {
            sr[0] = sum;
        } else {
            row_group_sums(qr, kq, group, u8, sr);
        }
    }
}

inline __m256i bcast4(const int8_t* p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

// Writes 8 outputs starting at column n0, only those below n_valid.
inline void store8_i32(int32_t* dst, int64_t n0, int64_t n_valid, __m256i v) {
    if (n_valid - n0 >= 8) {
        _mm256_storeu_si256((__m256i*)(dst + n0), v);
        return;
    }
    int32_t tmp[8];
    _mm256_storeu_si256((__m256i*)tmp, v);
    for (int64_t i = 0; i < n_valid - n0; ++i) dst[n0 + i] = tmp[i];
}

inline void store8_f32(float* dst, int64_t n0, int64_t n_valid, __m256 v) {
    if (n_valid - n0 >= 8) {
        _mm256_storeu_ps(dst + n0, v);
        return;
    }
    float tmp[8];
    _mm256_storeu_ps(tmp, v);
    for (int64_t i = 0; i < n_valid - n0; ++i) dst[n0 + i] = tmp[i];
}

inline void store_out(const lowbit_t2_args* p, int64_t m, int64_t n0, __m256i d, __m256i h) {
    if (n0 >= p->n_valid) return;
    if (p->out_i32) {
        store8_i32(p->out_i32 + m * p->out_i32_stride, n0, p->n_valid, d);
        if (p->asym) store8_i32(p->out_p32 + m * p->out_i32_stride, n0, p->n_valid, h);
        return;
    }
    const __m256 ai = _mm256_set1_ps(p->a_inv[m]);
    const __m256 b = p->bias ? _mm256_loadu_ps(p->bias + n0) : _mm256_setzero_ps();
    __m256 y;
    if (p->asym) {
        const __m256 t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_loadu_ps(p->scale + n0),
                                         _mm256_mul_ps(_mm256_cvtepi32_ps(h), _mm256_loadu_ps(p->scale2 + n0)));
        y = _mm256_fmadd_ps(t, ai, b);
    } else {
        y = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(_mm256_loadu_ps(p->scale + n0), ai), b);
    }
    if (p->relu) y = _mm256_max_ps(_mm256_setzero_ps(), y);  // NaN stays NaN (maxps returns its 2nd operand)
    store8_f32(p->out_f32 + m * p->out_f32_stride, n0, p->n_valid, y);
}

constexpr int64_t kPrefetch = 1024;

template <int BITS>
struct Fmt {
    static constexpr int planes = 8 / BITS;       // 4-k planes per tile
    static constexpr int tile_k = 4 * planes;     // k per tile
    static constexpr int mask = (1 << BITS) - 1;  // code mask
    static constexpr int zero = BITS == 2 ? 1 : 8;  // code offset (w + 1 or w + 8)
};

// HB half blocks (8 rows each) x NR tokens over the whole K.
//
// Plane-major order inside a tile: one decoded code vector serves all NR tokens and one broadcast
// of 4 activations all HB half blocks. The vpmaddubsw products are summed in int16 registers over
// kFlushTiles tiles and only then widened by vpmaddwd into the int32 totals (which the compiler
// may keep on the stack: they are touched once per kFlushTiles tiles). Bound of one int16 lane:
// each vpmaddubsw lane is at most 2 * max_code * 128 (|a| <= 128: signed DFP reaches -128),
// ternary 512 and int4 3840, so 8 ternary tiles (32 products: 16384) or 4 int4 tiles (8 products:
// 30720) never saturate. Half the vpmaddwd of a per-tile widening, and no register spills of the
// product sums with 16 ymm registers (ASYM: P sums beside the D sums, so fewer tokens per block).
template <int BITS>
constexpr int kFlushTiles = BITS == 2 ? 8 : 4;

// Integer epilogue of an HB x NR block: D = sum(code * a) - zero * sum(a), then store_out.
template <int HB, int NR, int BITS>
inline void store_block(const lowbit_t2_args* p, int64_t hb, int64_t m, const __m256i (&d)[HB][NR],
                        const __m256i (&h)[HB][NR]) {
#pragma GCC unroll 16
    for (int n = 0; n < NR; ++n) {
        const __m256i sa = _mm256_set1_epi32(Fmt<BITS>::zero * p->a_sums[(m + n) * p->sums_stride]);
#pragma GCC unroll 16
        for (int r = 0; r < HB; ++r) store_out(p, m + n, (hb + r) * 8, _mm256_sub_epi32(d[r][n], sa), h[r][n]);
    }
}

template <int HB, int NR, bool ASYM, int BITS>
void block_kernel(const lowbit_t2_args* p, int64_t hb, int64_t m) {
    using F = Fmt<BITS>;
    const int64_t kt = p->kp / F::tile_k, rbs = kt * 64;
    const int8_t* a = p->a + m * p->a_stride;
    const int64_t as = p->a_stride;
    const __m256i mcode = _mm256_set1_epi8((char)F::mask), m1 = _mm256_set1_epi8(1), ones = _mm256_set1_epi16(1);
    const uint8_t* wr[HB];
#pragma GCC unroll 16
    for (int r = 0; r < HB; ++r) wr[r] = p->w + ((hb + r) >> 1) * rbs + ((hb + r) & 1) * 32;
    __m256i d[HB][NR], h[HB][NR];
#pragma GCC unroll 16
    for (int r = 0; r < HB; ++r)
#pragma GCC unroll 16
        for (int n = 0; n < NR; ++n) d[r][n] = h[r][n] = _mm256_setzero_si256();
    for (int64_t t0 = 0; t0 < kt; t0 += kFlushTiles<BITS>) {
        const int64_t t1 = t0 + kFlushTiles<BITS> < kt ? t0 + kFlushTiles<BITS> : kt;
        __m256i s[HB][NR], sh[HB][NR];
#pragma GCC unroll 16
        for (int r = 0; r < HB; ++r)
#pragma GCC unroll 16
            for (int n = 0; n < NR; ++n) s[r][n] = sh[r][n] = _mm256_setzero_si256();
        for (int64_t t = t0; t < t1; ++t) {
            const int8_t* at = a + t * F::tile_k;
#pragma GCC unroll 16
            for (int r = 0; r < HB; ++r) _mm_prefetch((const char*)(wr[r] + t * 64 + kPrefetch), _MM_HINT_T0);
#pragma GCC unroll 4
            for (int pl = 0; pl < F::planes; ++pl) {
                __m256i code[HB], high[HB];
#pragma GCC unroll 16
                for (int r = 0; r < HB; ++r) {
                    const __m256i v = _mm256_loadu_si256((const __m256i*)(wr[r] + t * 64));
                    code[r] = _mm256_and_si256(_mm256_srli_epi16(v, BITS * pl), mcode);
                    if (ASYM) high[r] = _mm256_and_si256(_mm256_srli_epi16(v, BITS * pl + 1), m1);
                }
#pragma GCC unroll 16
                for (int n = 0; n < NR; ++n) {
                    const __m256i b = bcast4(at + n * as + 4 * pl);
#pragma GCC unroll 16
                    for (int r = 0; r < HB; ++r) {
                        s[r][n] = _mm256_add_epi16(s[r][n], _mm256_maddubs_epi16(code[r], b));
                        if (ASYM) sh[r][n] = _mm256_add_epi16(sh[r][n], _mm256_maddubs_epi16(high[r], b));
                    }
                }
            }
        }
#pragma GCC unroll 16
        for (int r = 0; r < HB; ++r)
#pragma GCC unroll 16
            for (int n = 0; n < NR; ++n) {
                d[r][n] = _mm256_add_epi32(d[r][n], _mm256_madd_epi16(s[r][n], ones));
                if (ASYM) h[r][n] = _mm256_add_epi32(h[r][n], _mm256_madd_epi16(sh[r][n], ones));
            }
    }
    store_block<HB, NR, BITS>(p, hb, m, d, h);
}

// GEMV (one token; NR = 1 in practice): HB half blocks over the whole K, one weight load per tile
// and half block, the planes widened to int32 per tile. The int16 sum of one tile's planes
// is bounded by planes * 2 * max(code) * 128: ternary 4*2*2*128 = 2048, int4 2*2*15*128 = 7680.
template <int HB, int NR, bool ASYM, int BITS>
void gemv_kernel(const lowbit_t2_args* p, int64_t hb, int64_t m) {
    using F = Fmt<BITS>;
    const int64_t kt = p->kp / F::tile_k, rbs = kt * 64;
    const int8_t* a = p->a + m * p->a_stride;
    const int64_t as = p->a_stride;
    const __m256i mcode = _mm256_set1_epi8((char)F::mask), m1 = _mm256_set1_epi8(1), ones = _mm256_set1_epi16(1);
    __m256i d[HB][NR], h[HB][NR];
#pragma GCC unroll 16
    for (int r = 0; r < HB; ++r)
#pragma GCC unroll 16
        for (int n = 0; n < NR; ++n) d[r][n] = h[r][n] = _mm256_setzero_si256();
    for (int64_t t = 0; t < kt; ++t) {
        const int8_t* at = a + t * F::tile_k;
#pragma GCC unroll 16
        for (int r = 0; r < HB; ++r) {
            const int64_t hr = hb + r;
            const uint8_t* wt = p->w + (hr >> 1) * rbs + t * 64 + (hr & 1) * 32;
            _mm_prefetch((const char*)(wt + kPrefetch), _MM_HINT_T0);
            const __m256i v = _mm256_loadu_si256((const __m256i*)wt);
            __m256i code[F::planes], high[F::planes];
#pragma GCC unroll 4
            for (int pl = 0; pl < F::planes; ++pl) {
                code[pl] = _mm256_and_si256(_mm256_srli_epi16(v, BITS * pl), mcode);
                if (ASYM) high[pl] = _mm256_and_si256(_mm256_srli_epi16(v, BITS * pl + 1), m1);
            }
#pragma GCC unroll 16
            for (int n = 0; n < NR; ++n) {
                __m256i s = _mm256_setzero_si256(), sh = _mm256_setzero_si256();
#pragma GCC unroll 4
                for (int pl = 0; pl < F::planes; ++pl) {
                    const __m256i b = bcast4(at + n * as + 4 * pl);
                    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(code[pl], b));
                    if (ASYM) sh = _mm256_add_epi16(sh, _mm256_maddubs_epi16(high[pl], b));
                }
                d[r][n] = _mm256_add_epi32(d[r][n], _mm256_madd_epi16(s, ones));
                if (ASYM) h[r][n] = _mm256_add_epi32(h[r][n], _mm256_madd_epi16(sh, ones));
            }
        }
    }
    store_block<HB, NR, BITS>(p, hb, m, d, h);
}

template <int HB, int NR, int BITS, bool U>
void group_kernel(const lowbit_t2_args* p, int64_t hb, int64_t m) {
    using F = Fmt<BITS>;
    const int64_t kt = p->kp / F::tile_k, rbs = kt * 64;
    const int64_t gp = p->group_k / 4, n_planes = p->kp / 4;
    const int64_t n_groups = (p->kp + p->group_k - 1) / p->group_k;
    const int8_t* a = p->a + m * p->a_stride;
    const int64_t as = p->a_stride;
    const __m256i mcode = _mm256_set1_epi8((char)F::mask), ones = _mm256_set1_epi16(1);
    const __m256i zero8 = _mm256_set1_epi8((char)F::zero);
    __m256 f[HB][NR];
#pragma GCC unroll 16
    for (int r = 0; r < HB; ++r)
#pragma GCC unroll 16
        for (int n = 0; n < NR; ++n) f[r][n] = _mm256_setzero_ps();
    for (int64_t g = 0; g < n_groups; ++g) {
        const int64_t q0 = g * gp, q1 = q0 + gp < n_planes ? q0 + gp : n_planes;
        __m256i d[HB][NR];
#pragma GCC unroll 16
        for (int r = 0; r < HB; ++r)
#pragma GCC unroll 16
            for (int n = 0; n < NR; ++n) d[r][n] = _mm256_setzero_si256();
        for (int64_t q = q0; q < q1; ++q) {
            const int64_t tile = q / F::planes, pl = q % F::planes;
            const __m128i shift = _mm_cvtsi32_si128((int)(BITS * pl));
            __m256i code[HB];
#pragma GCC unroll 16
            for (int r = 0; r < HB; ++r) {
                const int64_t hr = hb + r;
                const uint8_t* wt = p->w + (hr >> 1) * rbs + tile * 64 + (hr & 1) * 32;
                code[r] = _mm256_and_si256(_mm256_srl_epi16(_mm256_loadu_si256((const __m256i*)wt), shift), mcode);
                // Unsigned activations: the weights become the signed operand (code - zero).
                if (U) code[r] = _mm256_sub_epi8(code[r], zero8);
            }
#pragma GCC unroll 16
            for (int n = 0; n < NR; ++n) {
                const __m256i b = bcast4(a + n * as + 4 * q);
#pragma GCC unroll 16
                for (int r = 0; r < HB; ++r) {
                    // u8 x s8 pairs: at most 2 * 255 * 8 = 4080, no int16 saturation.
                    const __m256i pr = U ? _mm256_maddubs_epi16(b, code[r]) : _mm256_maddubs_epi16(code[r], b);
                    d[r][n] = _mm256_add_epi32(d[r][n], _mm256_madd_epi16(pr, ones));
                }
            }
        }
#pragma GCC unroll 16
        for (int r = 0; r < HB; ++r) {
            const int64_t hr = hb + r;
            const __m256 sc = _mm256_loadu_ps(p->scale + ((hr >> 1) * n_groups + g) * 16 + (hr & 1) * 8);
#pragma GCC unroll 16
            for (int n = 0; n < NR; ++n) {
                const __m256i dd =
                    U ? d[r][n]
                      : _mm256_sub_epi32(d[r][n], _mm256_set1_epi32(F::zero * p->a_sums[(m + n) * p->sums_stride + g]));
                f[r][n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dd), sc, f[r][n]);
            }
        }
    }
#pragma GCC unroll 16
    for (int n = 0; n < NR; ++n) {
        const __m256 ai = _mm256_set1_ps(p->a_inv[m + n]);
#pragma GCC unroll 16
        for (int r = 0; r < HB; ++r) {
            const int64_t n0 = (hb + r) * 8;
            if (n0 >= p->n_valid) continue;
            const __m256 b = p->bias ? _mm256_loadu_ps(p->bias + n0) : _mm256_setzero_ps();
            __m256 y = _mm256_fmadd_ps(f[r][n], ai, b);
            if (p->relu) y = _mm256_max_ps(_mm256_setzero_ps(), y);  // NaN stays NaN (maxps returns its 2nd operand)
            store8_f32(p->out_f32 + (m + n) * p->out_f32_stride, n0, p->n_valid, y);
        }
    }
}

// Groups of exactly 4 along K with unsigned activations (FGQ N=4 after a ReLU): every plane is
// one group, so each product is widened, converted and scaled at once (vpmaddubsw, vpmaddwd,
// vcvtdq2ps, FMA into fp32 accumulators): no int32 group totals, no per-group loop. Activations
// are the unsigned operand, the decoded weights (code - zero) the signed one: |pair| <= 2 * 255 * 8.
// INT (8-bit fixed-point group scales, see lowbit_t2_args.gscale_i): vpmaddwd multiplies the
// pairs by the group's mantissa m_g instead of 1 and the int32 products are summed as they are;
// the conversion and the row multiplier come once per output. Ternary only: |m_g * D_g| <=
// 255 * 4 * 255, so the int32 sum holds for kp <= 32768 (gemm_bits checks).
template <int HB, int NR, int BITS, bool INT>
void group4u_kernel(const lowbit_t2_args* p, int64_t hb, int64_t m) {
    using F = Fmt<BITS>;
    const int64_t kt = p->kp / F::tile_k, rbs = kt * 64;
    const int64_t n_groups = p->kp / 4;
    const int8_t* a = p->a + m * p->a_stride;
    const int64_t as = p->a_stride;
    const __m256i mcode = _mm256_set1_epi8((char)F::mask), zero8 = _mm256_set1_epi8((char)F::zero);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 f[HB][NR];
    __m256i acc[HB][NR];
#pragma GCC unroll 16
    for (int r = 0; r < HB; ++r)
#pragma GCC unroll 16
        for (int n = 0; n < NR; ++n) {
            f[r][n] = _mm256_setzero_ps();
            acc[r][n] = _mm256_setzero_si256();
        }
    for (int64_t t = 0; t < kt; ++t) {
#pragma GCC unroll 16
        for (int r = 0; r < HB; ++r) {
            const int64_t hr = hb + r;
            _mm_prefetch((const char*)(p->w + (hr >> 1) * rbs + t * 64 + (hr & 1) * 32 + kPrefetch), _MM_HINT_T0);
        }
#pragma GCC unroll 4
        for (int pl = 0; pl < F::planes; ++pl) {
            const int64_t g = t * F::planes + pl;
            __m256i code[HB];
            const __m256i* mg[HB];  // read as vpmaddwd's memory operand: no register held
            __m256 sc[HB];
#pragma GCC unroll 16
            for (int r = 0; r < HB; ++r) {
                const int64_t hr = hb + r;
                const __m256i v = _mm256_loadu_si256((const __m256i*)(p->w + (hr >> 1) * rbs + t * 64 + (hr & 1) * 32));
                code[r] = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(v, BITS * pl), mcode), zero8);
                const int64_t at = ((hr >> 1) * n_groups + g) * 16 + (hr & 1) * 8;
                if (INT) mg[r] = (const __m256i*)(p->gscale_i + at);
                else sc[r] = _mm256_loadu_ps(p->scale + at);
            }
#pragma GCC unroll 16
            for (int n = 0; n < NR; ++n) {
                const __m256i b = bcast4(a + n * as + 4 * g);
#pragma GCC unroll 16
                for (int r = 0; r < HB; ++r) {
                    const __m256i pr = _mm256_maddubs_epi16(b, code[r]);
                    if (INT) {
                        acc[r][n] = _mm256_add_epi32(acc[r][n], _mm256_madd_epi16(pr, _mm256_loadu_si256(mg[r])));
                    } else {
                        const __m256i d = _mm256_madd_epi16(pr, ones);
                        f[r][n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), sc[r], f[r][n]);
                    }
                }
            }
        }
    }
#pragma GCC unroll 16
    for (int n = 0; n < NR; ++n) {
        const __m256 ai = _mm256_set1_ps(p->a_inv[m + n]);
#pragma GCC unroll 16
        for (int r = 0; r < HB; ++r) {
            const int64_t n0 = (hb + r) * 8;
            if (n0 >= p->n_valid) continue;
            const __m256 b = p->bias ? _mm256_loadu_ps(p->bias + n0) : _mm256_setzero_ps();
            const __m256 yd = INT ? _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][n]), _mm256_loadu_ps(p->row_mult + n0)) : f[r][n];
            __m256 y = _mm256_fmadd_ps(yd, ai, b);
            if (p->relu) y = _mm256_max_ps(_mm256_setzero_ps(), y);  // NaN stays NaN (maxps returns its 2nd operand)
            store8_f32(p->out_f32 + (m + n) * p->out_f32_stride, n0, p->n_valid, y);
        }
    }
}

enum Mode { kBlock, kBlockAsym, kGroup, kGroupU, kGroup4U, kGroup4UInt, kGemv, kGemvAsym };

template <int HB, int NR, int MODE, int BITS>
void run_block(const lowbit_t2_args* p, int64_t hb, int64_t m, int64_t hbn, int64_t mn) {
    if constexpr (HB > 1) {
        if (hbn < HB) return run_block<HB - 1, NR, MODE, BITS>(p, hb, m, hbn, mn);
    }
    if constexpr (NR > 1) {
        if (mn < NR) return run_block<HB, NR - 1, MODE, BITS>(p, hb, m, hbn, mn);
    }
    if constexpr (MODE == kBlock) block_kernel<HB, NR, false, BITS>(p, hb, m);
    if constexpr (MODE == kBlockAsym) block_kernel<HB, NR, true, BITS>(p, hb, m);
    if constexpr (MODE == kGroup) group_kernel<HB, NR, BITS, false>(p, hb, m);
    if constexpr (MODE == kGroupU) group_kernel<HB, NR, BITS, true>(p, hb, m);
    if constexpr (MODE == kGroup4U) group4u_kernel<HB, NR, BITS, false>(p, hb, m);
    if constexpr (MODE == kGroup4UInt) group4u_kernel<HB, NR, BITS, true>(p, hb, m);
    if constexpr (MODE == kGemv) gemv_kernel<HB, NR, false, BITS>(p, hb, m);
    if constexpr (MODE == kGemvAsym) gemv_kernel<HB, NR, true, BITS>(p, hb, m);
}

template <int HB, int NR, int MODE, int BITS>
void drive(const lowbit_t2_args* p) {
    const int64_t hb1 = 2 * p->rb1;
    for (int64_t hb = 2 * p->rb0; hb < hb1; hb += HB) {
        const int64_t hbn = hb1 - hb < HB ? hb1 - hb : HB;
        for (int64_t m = p->m0; m < p->m1; m += NR) {
            const int64_t mn = p->m1 - m < NR ? p->m1 - m : NR;
            run_block<HB, NR, MODE, BITS>(p, hb, m, hbn, mn);
        }
    }
}

template <int BITS>
void gemm_bits(const lowbit_t2_args* p) {
    const bool gemv = p->m1 - p->m0 == 1;
    if (p->group_k == 4 && p->a_unsigned && BITS == 2 && p->gscale_i && p->kp <= 32768) {
        // 1 half block x 4 tokens: 2 x 4 spills the int32 accumulators (1.33 vs 1.48 ms for
        // 256 x 512 -> 512 on Zen 2; 2 x 3: 1.42, 2 x 2: 1.38).
        if (gemv) drive<4, 1, kGroup4UInt, BITS>(p);
        else drive<1, 4, kGroup4UInt, BITS>(p);
    } else if (p->group_k == 4 && p->a_unsigned) {
        if (gemv) drive<4, 1, kGroup4U, BITS>(p);
        else drive<2, 4, kGroup4U, BITS>(p);
    } else if (p->group_k > 0 && p->a_unsigned) {
        if (gemv) drive<4, 1, kGroupU, BITS>(p);
        else drive<2, 3, kGroupU, BITS>(p);
    } else if (p->group_k > 0) {
        if (gemv) drive<4, 1, kGroup, BITS>(p);
        else drive<2, 3, kGroup, BITS>(p);
    } else if (p->asym) {
        if (gemv) drive<4, 1, kGemvAsym, BITS>(p);
        else drive<1, 4, kBlockAsym, BITS>(p);
    } else {
        if (gemv) drive<4, 1, kGemv, BITS>(p);
        else drive<2, 4, kBlock, BITS>(p);
    }
}

void ternary_gemm(const lowbit_t2_args* p) {
    if (p->bits == 4) gemm_bits<4>(p);
    else gemm_bits<2>(p);
}

// Exact float path: w = float((tile >> (8j + BITS*pl)) & mask) - zero per 8 rows, then FMA.
template <int HB, int NR, int BITS, bool ASYM, bool GROUP>
void float_kernel(const lowbit_t2_args* p, int64_t hb, int64_t m) {
    using F = Fmt<BITS>;
    const int64_t kt = p->kp / F::tile_k, rbs = kt * 64;
    const float* x = p->x + m * p->x_stride;
    const int64_t xs = p->x_stride;
    const int64_t gp = GROUP ? p->group_k / 4 : 0;
    const int64_t n_groups = GROUP ? (p->kp + p->group_k - 1) / p->group_k : 1;
    const __m256i mcode = _mm256_set1_epi32(F::mask), one = _mm256_set1_epi32(1);
    const __m256 zero = _mm256_set1_ps((float)F::zero);
    __m256 f[HB][NR], h[HB][NR], tot[HB][NR];
#pragma GCC unroll 16
    for (int r = 0; r < HB; ++r)
#pragma GCC unroll 16
        for (int n = 0; n < NR; ++n) f[r][n] = h[r][n] = tot[r][n] = _mm256_setzero_ps();
    int64_t g = 0;
    for (int64_t t = 0; t < kt; ++t) {
        __m256i v[HB];
#pragma GCC unroll 16
        for (int r = 0; r < HB; ++r) {
            const int64_t hr = hb + r;
            const uint8_t* wt = p->w + (hr >> 1) * rbs + t * 64 + (hr & 1) * 32;
            _mm_prefetch((const char*)(wt + kPrefetch), _MM_HINT_T0);
            v[r] = _mm256_loadu_si256((const __m256i*)wt);
        }
#pragma GCC unroll 4
        for (int pl = 0; pl < F::planes; ++pl) {
            const float* xk = x + t * F::tile_k + 4 * pl;
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j) {
                __m256 wv[HB], hv[HB];
#pragma GCC unroll 16
                for (int r = 0; r < HB; ++r) {
                    const __m256i sh = _mm256_srli_epi32(v[r], 8 * j + BITS * pl);
                    wv[r] = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(sh, mcode)), zero);
                    if (ASYM) hv[r] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(sh, 1), one));
                }
#pragma GCC unroll 16
                for (int n = 0; n < NR; ++n) {
                    const __m256 xb = _mm256_set1_ps(xk[n * xs + j]);
#pragma GCC unroll 16
                    for (int r = 0; r < HB; ++r) {
                        f[r][n] = _mm256_fmadd_ps(wv[r], xb, f[r][n]);
                        if (ASYM) h[r][n] = _mm256_fmadd_ps(hv[r], xb, h[r][n]);
                    }
                }
            }
            if (GROUP) {
                const int64_t q = t * F::planes + pl;
                if ((q + 1) % gp == 0 || q + 1 == p->kp / 4) {
#pragma GCC unroll 16
                    for (int r = 0; r < HB; ++r) {
                        const int64_t hr = hb + r;
                        const __m256 sc = _mm256_loadu_ps(p->scale + ((hr >> 1) * n_groups + g) * 16 + (hr & 1) * 8);
#pragma GCC unroll 16
                        for (int n = 0; n < NR; ++n) {
                            tot[r][n] = _mm256_fmadd_ps(f[r][n], sc, tot[r][n]);
                            f[r][n] = _mm256_setzero_ps();
                        }
                    }
                    ++g;
                }
            }
        }
    }
#pragma GCC unroll 16
    for (int r = 0; r < HB; ++r) {
        const int64_t n0 = (hb + r) * 8;
        if (n0 >= p->n_valid) continue;
        const __m256 b = p->bias ? _mm256_loadu_ps(p->bias + n0) : _mm256_setzero_ps();
        const __m256 sc = GROUP ? _mm256_setzero_ps() : _mm256_loadu_ps(p->scale + n0);
        const __m256 sc2 = ASYM ? _mm256_loadu_ps(p->scale2 + n0) : _mm256_setzero_ps();
#pragma GCC unroll 16
        for (int n = 0; n < NR; ++n) {
            __m256 y;
            if (GROUP) y = _mm256_add_ps(tot[r][n], b);
            else if (ASYM) y = _mm256_fmadd_ps(f[r][n], sc, _mm256_fmadd_ps(h[r][n], sc2, b));
            else y = _mm256_fmadd_ps(f[r][n], sc, b);
            if (p->relu) y = _mm256_max_ps(_mm256_setzero_ps(), y);  // NaN stays NaN (maxps returns its 2nd operand)
            store8_f32(p->out_f32 + (m + n) * p->out_f32_stride, n0, p->n_valid, y);
        }
    }
}

template <int HB, int NR, int BITS, bool ASYM, bool GROUP>
void run_float(const lowbit_t2_args* p, int64_t hb, int64_t m, int64_t hbn, int64_t mn) {
    if constexpr (HB > 1) {
        if (hbn < HB) return run_float<HB - 1, NR, BITS, ASYM, GROUP>(p, hb, m, hbn, mn);
    }
    if constexpr (NR > 1) {
        if (mn < NR) return run_float<HB, NR - 1, BITS, ASYM, GROUP>(p, hb, m, hbn, mn);
    }
    float_kernel<HB, NR, BITS, ASYM, GROUP>(p, hb, m);
}

template <int HB, int NR, int BITS, bool ASYM, bool GROUP>
void drive_float(const lowbit_t2_args* p) {
    const int64_t hb1 = 2 * p->rb1;
    for (int64_t hb = 2 * p->rb0; hb < hb1; hb += HB) {
        const int64_t hbn = hb1 - hb < HB ? hb1 - hb : HB;
        for (int64_t m = p->m0; m < p->m1; m += NR) {
            const int64_t mn = p->m1 - m < NR ? p->m1 - m : NR;
            run_float<HB, NR, BITS, ASYM, GROUP>(p, hb, m, hbn, mn);
        }
    }
}

template <int BITS>
void float_bits(const lowbit_t2_args* p) {
    if (p->group_k > 0) drive_float<2, 3, BITS, false, true>(p);
    else if (p->asym) drive_float<2, 3, BITS, true, false>(p);
    else drive_float<2, 4, BITS, false, false>(p);
}

void ternary_gemm_f32(const lowbit_t2_args* p) {
    if (p->bits == 4) float_bits<4>(p);
    else float_bits<2>(p);
}

const lowbit_isa_table kTable = {"avx2", pack_signs_f32, binary_gemm, absmax_f32, quantize_i8,
                                 ternary_gemm, ternary_gemm_f32};

}  // namespace

extern "C" const lowbit_isa_table* lowbit_isa_avx2(void) { return &kTable; }
