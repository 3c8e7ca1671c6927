// Portable reference path: plain C++, compiled for the baseline x86-64 (or any) target.
#include <string.h>

#include <algorithm>
#include <cmath>

#include "kernels.h"

namespace {

void pack_signs_f32(const float* src, int64_t rows, int64_t k, int64_t src_stride, uint8_t* dst,
                    int64_t dst_stride) {
    for (int64_t r = 0; r < rows; ++r) {
        const float* x = src + r * src_stride;
        uint8_t* out = dst + r * dst_stride;
        memset(out, 0, (size_t)dst_stride);
        for (int64_t j = 0; j < k; ++j) {
            if (x[j] < 0.0f) out[j >> 3] |= (uint8_t)(1u << (j & 7));
        }
    }
}

uint64_t load_word(const uint8_t* p) {
    uint64_t v;
    memcpy(&v, p, 8);  // unaligned-safe; little-endian x86 gives the documented bit order
    return v;
}

void binary_gemm(const uint8_t* a, int64_t a_stride, const uint8_t* w, int64_t w_stride,
                 int64_t m_rows, int64_t n0, int64_t n1, int64_t words, int64_t k, int32_t* out,
                 int64_t out_stride) {
    for (int64_t m = 0; m < m_rows; ++m) {
        const uint8_t* am = a + m * a_stride;
        for (int64_t n = n0; n < n1; ++n) {
            const uint8_t* wn = w + n * w_stride;
            int64_t pop = 0;
            for (int64_t i = 0; i < words; ++i)
                pop += __builtin_popcountll(load_word(am + 8 * i) ^ load_word(wn + 8 * i));
            out[m * out_stride + n] = (int32_t)(k - 2 * pop);
        }
    }
}

// ---- ternary x int8 ------------------------------------------------------------------------

// max |x| over the bit patterns of |x| (a NaN wins and stays; see isa_avx2.cpp).
void absmax_f32(const float* x, int64_t rows, int64_t k, int64_t x_stride, float* amax) {
    for (int64_t r = 0; r < rows; ++r) {
        const float* xr = x + r * x_stride;
        uint32_t m = 0;
        for (int64_t j = 0; j < k; ++j) {
            uint32_t v;
            memcpy(&v, xr + j, 4);
            m = std::max(m, v & 0x7FFFFFFFu);
        }
        memcpy(amax + r, &m, 4);
    }
}

void quantize_i8(const float* x, int64_t rows, int64_t k, int64_t x_stride, const float* mult,
                 float lo, float hi, int8_t* q, int64_t q_stride, int64_t kq, int64_t group,
                 int32_t* sums, int64_t sums_stride) {
    const int64_t g = group > 0 ? group : std::max<int64_t>(kq, 1);
    for (int64_t r = 0; r < rows; ++r) {
        const float* xr = x + r * x_stride;
        int8_t* qr = q + r * q_stride;
        int32_t* sr = sums + r * sums_stride;
        const float s = mult[r];
        for (int64_t j = 0; j < kq; ++j) {
            int32_t v = 0;
            if (j < k) {
                // Clamping before rounding equals rounding then clamping (the bounds are
                // integers); nearbyint rounds half to even under the default rounding mode, like
                // torch.round.
                float t = xr[j] * s;
                t = std::min(hi, std::max(lo, t));
                v = (int32_t)std::nearbyint(t);
            }
            qr[j] = (int8_t)(uint8_t)v;  // 0..255 (unsigned mode) as its byte
            if (j % g == 0) sr[j / g] = 0;
            sr[j / g] += v;
        }
    }
}

// Decodes the code of row r (0..15) at k offset kk (0..16/bits*4-1) of one 64-byte tile:
// 4-k plane kk/4 sits at bit offset bits * (kk/4) of byte 4*r + kk%4.
int code_at(const uint8_t* tile, int r, int kk, int bits) {
    return (tile[4 * r + (kk & 3)] >> (bits * (kk >> 2))) & ((1 << bits) - 1);
}

void ternary_gemm(const lowbit_t2_args* p) {
    const int bits = p->bits == 4 ? 4 : 2;
    const int64_t tile_k = 32 / bits, kt = p->kp / tile_k, zero = bits == 2 ? 1 : 8;
    const int64_t gk = p->group_k > 0 ? p->group_k : p->kp;
    const int64_t n_groups = (p->kp + gk - 1) / gk;
    for (int64_t rb = p->rb0; rb < p->rb1; ++rb) {
        const uint8_t* wb = p->w + rb * kt * 64;
        for (int64_t m = p->m0; m < p->m1; ++m) {
            const int8_t* a = p->a + m * p->a_stride;
            const uint8_t* au = (const uint8_t*)a;
            const int32_t* sums = p->a_sums + m * p->sums_stride;
            for (int r = 0; r < 16; ++r) {
                const int64_t n = rb * 16 + r;
                if (n >= p->n_valid) break;
                float acc = 0.0f;
                int32_t d = 0, hp = 0;
                for (int64_t g = 0; g < n_groups; ++g) {
                    int32_t dot = 0;
                    const int64_t k1 = std::min(p->kp, (g + 1) * gk);
                    if (p->a_unsigned) {
                        // Unsigned activations (grouped kernel only): signed weights times u.
                        for (int64_t k = g * gk; k < k1; ++k)
                            dot += (code_at(wb + (k / tile_k) * 64, r, (int)(k % tile_k), bits) - (int)zero) * au[k];
                        d = dot;
                    } else {
                        for (int64_t k = g * gk; k < k1; ++k) {
                            const int c = code_at(wb + (k / tile_k) * 64, r, (int)(k % tile_k), bits);
                            dot += c * a[k];
                            if (c == 2) hp += a[k];
                        }
                        d = dot - (int32_t)zero * sums[g];
                    }
                    if (p->group_k > 0)
                        acc = std::fma((float)d, p->scale[(rb * n_groups + g) * 16 + r], acc);
                }
                if (p->out_i32) {
                    p->out_i32[m * p->out_i32_stride + n] = d;
                    if (p->asym) p->out_p32[m * p->out_i32_stride + n] = hp;
                    continue;
                }
                float y;
                if (p->group_k > 0) {
                    y = acc * p->a_inv[m];
                } else if (p->asym) {
                    y = std::fma((float)d, p->scale[n], (float)hp * p->scale2[n]) * p->a_inv[m];
                } else {
                    y = (float)d * (p->scale[n] * p->a_inv[m]);
                }
                if (p->bias) y += p->bias[n];
                if (p->relu) y = std::max(y, 0.0f);
                p->out_f32[m * p->out_f32_stride + n] = y;
            }
        }
    }
}

// Exact float path: fp32 accumulation of w * x per group (x rows zero-padded to kp).
void ternary_gemm_f32(const lowbit_t2_args* p) {
    const int bits = p->bits == 4 ? 4 : 2;
    const int64_t tile_k = 32 / bits, kt = p->kp / tile_k, zero = bits == 2 ? 1 : 8;
    const int64_t gk = p->group_k > 0 ? p->group_k : p->kp;
    const int64_t n_groups = (p->kp + gk - 1) / gk;
    for (int64_t rb = p->rb0; rb < p->rb1; ++rb) {
        const uint8_t* wb = p->w + rb * kt * 64;
        for (int64_t m = p->m0; m < p->m1; ++m) {
            const float* x = p->x + m * p->x_stride;
            for (int r = 0; r < 16; ++r) {
                const int64_t n = rb * 16 + r;
                if (n >= p->n_valid) break;
                float tot = 0.0f, d = 0.0f, hp = 0.0f;
                for (int64_t g = 0; g < n_groups; ++g) {
                    float dg = 0.0f;
                    const int64_t k1 = std::min(p->kp, (g + 1) * gk);
                    for (int64_t k = g * gk; k < k1; ++k) {
                        const int c = code_at(wb + (k / tile_k) * 64, r, (int)(k % tile_k), bits);
                        dg = std::fma((float)(c - zero), x[k], dg);
                        if (c == 2) hp += x[k];
                    }
                    if (p->group_k > 0) tot = std::fma(dg, p->scale[(rb * n_groups + g) * 16 + r], tot);
                    else d += dg;
                }
                float y;
                if (p->group_k > 0) y = tot;
                else if (p->asym) y = std::fma(d, p->scale[n], hp * p->scale2[n]);
                else y = d * p->scale[n];
                if (p->bias) y += p->bias[n];
                if (p->relu) y = std::max(y, 0.0f);
                p->out_f32[m * p->out_f32_stride + n] = y;
            }
        }
    }
}

const lowbit_isa_table kTable = {"scalar", pack_signs_f32, binary_gemm, absmax_f32, quantize_i8,
                                 ternary_gemm, ternary_gemm_f32};

}  // namespace

extern "C" const lowbit_isa_table* lowbit_isa_scalar(void) { return &kTable; }
