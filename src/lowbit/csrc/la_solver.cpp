// Fused alternating solvers of the loss-aware schemes (LAT_a, LAT2_a, LAQ linear/log; see
// lowbit/methods/loss_aware.py, whose PyTorch functions `_support_alternate` and `_laq_alternate`
// are the reference for every rule here, and reference/papers.md §3.3-§3.5).
//
// Every scheme alternates "scale <- LS (or official) scale of the current levels" and "levels <-
// nearest levels of the scale". The levels of a round are a function of (w, alpha) only, so a round
// needs at most ONE pass over (w, d): each element's level is recomputed on the fly and the two
// (LAT2_a: four) sums of the next scale are accumulated in double.
//
// Bands (units longer than kChunk). Between rounds alpha moves little, and an element's level can
// only change if its |w| lies near a decision threshold. For an alpha range [lo, hi] the level of
// every element is monotone in alpha, so an element whose level is the same at lo and at hi has
// that level for every alpha in the range. A "build" pass sums those fixed elements once, writes
// their codes, and copies the others (the band, a few percent) to a side buffer; while alpha stays
// in the range, a round only rescans the band (sums = fixed sums + band sums) and the final codes
// only patch the band. Alpha leaving the range triggers a new build around it (a range stretched
// along the last step). The levels and sums are exactly those of a full pass; only the order of
// the double additions differs.
//
// Determinism: a unit (one row of the (U, L) layout, one scale) is cut into fixed chunks of
// kChunk elements from its start; within a chunk, a sum is a vectorised reduction whose split over
// vector lanes is fixed at compile time (`omp simd`, built with -fopenmp-simd: no OpenMP runtime;
// build passes sum block by block, band sums are added after the fixed sums); chunk sums are
// added in chunk order. Every decision (ranges, bands) depends on the data and the scales only, so
// the results are bit-identical for any thread count. Units with L <= kChunk run all their rounds
// in one task with full passes (the unit stays in cache).
//
// Portable C++17 for the baseline ISA: no intrinsics; selections are bit masks so that the loops
// vectorise (the solve is bound by memory traffic once the rounds run on bands).
//
// Float emulation: everything that decides a level is computed in float exactly as the PyTorch
// code computes it on float32 tensors (alpha / 2, w / (alpha / k), |w| / (alpha * 0.75), the
// half-to-even rounding, the float32 stop test |alpha_new - alpha| < tol), so for the same alpha
// both paths give the same codes. Only the sums differ (double here, float32 there). Thresholds
// on |w| used by the comparisons below are found by bisection on that same float computation, so
// "level of |w| >= j" and "|w| >= thr[j]" agree on every float.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "float_bits.h"
#include "threadpool.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

constexpr int64_t kChunk = 32768;          // elements per chunk (fixed: results must not depend on threads)
constexpr int64_t kBlock = 1024;           // build passes work in blocks of this many elements
constexpr int64_t kBandCap = kChunk / 8;   // band entries per chunk before it falls back to full passes
constexpr int64_t kThresholdMinLen = 4096; // shorter units compute LAQ levels directly
// relative half-width of a band range before alpha moved: ternary alternation's first step is
// larger, its bands thinner (one threshold per sign) than LAQ's
constexpr float kFirstWidthTernary = 1.0f / 32, kFirstWidthLaq = 1.0f / 64;
constexpr float kMargin = 1.0f / 512;      // relative slack of a range around the predicted path

enum Kind { kLat = 0, kLat2 = 1, kLaq = 2 };

struct Problem {
    const float* w = nullptr;
    const float* d = nullptr;
    const int8_t* c0 = nullptr;
    int64_t units = 0, len = 0;
    Kind kind = kLat;
    // LAQ
    int k = 1;              // 2^(bits-1) - 1
    bool log = false;       // log levels (else linear)
    bool official = false;  // alpha rule "official" (else "ls")
    float log_zero = 0.0f;  // (float)(2^-k / 0.75): r below it maps to level 0
    float mult0[129] = {};  // log multipliers 2^(|c| - k) of warm-start codes |c| = 0..128
    int max_iter = 10;
    float tol = 1e-6f;
};

inline int sides_of(const Problem& p) { return p.kind == kLat2 ? 2 : 1; }

// What the last solve on this thread did, per unit-round (for tests and tuning; see la_stats).
struct Stats {
    int64_t builds = 0, band_rounds = 0, full_rounds = 0, patched = 0, full_finals = 0;
    int64_t band_elements = 0, overflowed_chunks = 0;  // over all builds
};
thread_local Stats t_stats;

// ----------------------------------------------------------------------------------------------
// Float helpers

using lowbit::bits_of;
using lowbit::float_of;

// All-ones where `keep`, else 0. Selections are bit masks, not `keep ? x : 0`: the compiler turns
// the latter into branches (mispredicted on half the elements) instead of vector code.
inline uint32_t mask_of(bool keep) { return 0u - (uint32_t)keep; }

// v where the mask is set, +0.0 elsewhere.
inline float masked(float v, uint32_t mask) { return float_of(bits_of(v) & mask); }

// Nearest linear code round(clamp(y, -k, k)) with ties to even, y = w / step: the float value
// torch.round(w / step).clamp(-k, k) gives. (y + 1.5 * 2^23) - 1.5 * 2^23 rounds half-to-even in the
// default rounding mode for |y| <= 2^22, which the first clamp guarantees (k <= 127). A NaN y
// (0 / 0 when alpha underflows) maps to 0 instead of an undefined float-to-int conversion.
inline float linear_code(float x, float step, float kf) {
    float y = x / step;
    y = masked(y, mask_of(y == y));
    y = std::min(std::max(y, -(kf + 1.0f)), kf + 1.0f);
    const float magic = 12582912.0f;
    float q = (y + magic) - magic;
    return std::min(std::max(q, -kf), kf);
}

// Log level magnitude of a = |w| >= 0: r = a / (alpha * 0.75); 0 below log_zero, else e + k with
// e = clamp(floor(log2 r), -(k-1), 0) taken exactly from r's bits (a denormal r has floor(log2 r)
// <= -127 and clamps to the lowest level, an infinite one to the top; NaN maps to 0).
inline int32_t log_mag(float a, float s, float log_zero, int k) {
    const float r = a / s;
    const uint32_t keep = mask_of(r >= log_zero);
    int32_t e = (int32_t)((bits_of(r) >> 23) & 0xFFu) - 127;
    e = std::min(std::max(e, -(k - 1)), 0);
    return (int32_t)((uint32_t)(e + k) & keep);
}

// 2^(mag - k) for mag in 1..k (an exact power of two), 0 for mag = 0.
inline float log_mult(int32_t mag, int k) {
    return float_of(((uint32_t)(mag - k + 127) << 23) & mask_of(mag != 0));
}

inline int32_t signed_code(int32_t mag, float x) {
    const uint32_t neg = mask_of(x < 0.0f);
    return (int32_t)(((uint32_t)mag ^ neg) - neg);  // -mag where x < 0
}

// ----------------------------------------------------------------------------------------------
// Level parameters of one scale (pair) and the per-scheme policies

struct Lv {
    float t[2] = {0.0f, 0.0f};  // LAT / LAT2: kept <=> magnitude > t (inf: nothing kept)
    float step = 1.0f;          // LAQ linear: alpha / k
    float s = 1.0f;             // LAQ log: alpha * 0.75
    float kf = 1.0f;
    float log_zero = 0.0f;
    int k = 1;
    bool zero = false;          // LAQ: alpha <= 0, every code is 0
    float thr[7] = {};          // LAQ threshold mode: |code| >= j + 1 <=> |w| >= thr[j]
};

// Direct LAQ level magnitude of a >= 0 (the PyTorch nearest_levels rule).
inline int32_t laq_mag_direct(const Lv& lv, bool log, float a) {
    return log ? log_mag(a, lv.s, lv.log_zero, lv.k) : (int32_t)linear_code(a, lv.step, lv.kf);
}

// Level parameters for scales alpha[side]. LAT/LAT2: a side with use[side] false (a converged side
// in a full round pass, or alpha <= 0 for codes) keeps nothing.
Lv make_lv(const Problem& p, const float* alpha, const bool* use, bool thresholds) {
    Lv lv;
    const float inf = std::numeric_limits<float>::infinity();
    if (p.kind != kLaq) {
        for (int s = 0; s < sides_of(p); ++s) lv.t[s] = use[s] ? alpha[s] / 2 : inf;
        return lv;
    }
    lv.k = p.k;
    lv.kf = (float)p.k;
    lv.log_zero = p.log_zero;
    lv.zero = !(alpha[0] > 0.0f);
    if (lv.zero) return lv;
    lv.step = alpha[0] / lv.kf;
    lv.s = alpha[0] * 0.75f;
    if (thresholds && p.k <= 7) {
        // thr[j - 1] = the smallest float a >= 0 whose level is >= j (bisection on the bit
        // patterns, which order non-negative floats; +inf has the top level).
        uint32_t lo = 0;
        for (int j = 1; j <= p.k; ++j) {
            uint32_t a = lo, b = 0x7f800000u;
            while (a < b) {
                const uint32_t mid = a + (b - a) / 2;
                if (laq_mag_direct(lv, p.log, float_of(mid)) >= j)
                    b = mid;
                else
                    a = mid + 1;
            }
            lv.thr[j - 1] = float_of(a);
            lo = a;
        }
    }
    return lv;
}

// One element's contribution to the (up to) four sums of a scale.
struct C4 {
    double v[4];
};

// Adds f(i) (a C4) over [0, n) into out[0..NQ-1] with a vectorised reduction (`omp simd`,
// compiled with -fopenmp-simd: no OpenMP runtime). The split of the sum over vector lanes is
// fixed at compile time, so the result depends on n and the data only.
template <int NQ, class F>
inline void simd_sum(int64_t n, double* out, F&& f) {
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    if constexpr (NQ == 2) {
#pragma omp simd reduction(+ : s0, s1)
        for (int64_t i = 0; i < n; ++i) {
            const C4 c = f(i);
            s0 += c.v[0];
            s1 += c.v[1];
        }
    } else {
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int64_t i = 0; i < n; ++i) {
            const C4 c = f(i);
            s0 += c.v[0];
            s1 += c.v[1];
            s2 += c.v[2];
            s3 += c.v[3];
        }
    }
    out[0] += s0;
    out[1] += s1;
    out[2] += s2;
    out[3] += s3;
}

// A policy gives the signed code of an element for level parameters (`code`) and the element's
// contribution to the sums for a code (`contrib`); code 0 contributes nothing.
struct PLat {
    static constexpr bool kThresholds = false;
    static constexpr int kSums = 2;
    static int32_t code(const Lv& lv, float x) {
        const int32_t kept = std::fabs(x) > lv.t[0];
        return signed_code(kept, x);  // sign(w) where kept (|w| > t >= 0 means w != 0)
    }
    static C4 contrib(const Lv&, int32_t c, float x, float d) {
        const double dm = (double)masked(d, mask_of(c != 0));
        return {{dm * (double)std::fabs(x), dm, 0.0, 0.0}};
    }
};

struct PLat2 {
    static constexpr bool kThresholds = false;
    static constexpr int kSums = 4;
    static int32_t code(const Lv& lv, float x) { return (int32_t)(x > lv.t[0]) - (int32_t)(-x > lv.t[1]); }
    static C4 contrib(const Lv&, int32_t c, float x, float d) {
        const double dp = (double)masked(d, mask_of(c > 0));
        const double dn = (double)masked(d, mask_of(c < 0));
        return {{dp * (double)x, dp, dn * (double)-x, dn}};
    }
};

// K > 0: levels by comparison with K = k thresholds; K == 0: direct computation.
template <int K, bool LOG, bool OFFICIAL>
struct PLaq {
    static_assert(K == 0 || K == 1 || K == 3 || K == 7, "threshold mode holds at most 7 levels per sign");
    static constexpr bool kThresholds = K > 0;
    static constexpr int kSums = 2;
    static int32_t code(const Lv& lv, float x) {
        const float a = std::fabs(x);
        int32_t mag;
        if constexpr (K > 0) {
            mag = 0;
            for (int j = 0; j < K; ++j) mag += (int32_t)(a >= lv.thr[j]);
        } else {
            mag = laq_mag_direct(lv, LOG, a);
        }
        return signed_code(mag, x);
    }
    static C4 contrib(const Lv& lv, int32_t c, float x, float d) {
        const int32_t mag = std::abs(c);
        const double m = LOG ? (double)log_mult(mag, lv.k) : (double)mag;
        const double dd = (double)d;
        // sum d w b (b = sign(w) m) and sum d b^2 (LS) or sum d |b| (official)
        return {{dd * (double)std::fabs(x) * m, OFFICIAL ? dd * m : dd * m * m, 0.0, 0.0}};
    }
};

// ----------------------------------------------------------------------------------------------
// Chunk kernels

struct Sums {
    double s[4] = {0.0, 0.0, 0.0, 0.0};
};

// Start pass over [0, n): sums of the warm-start levels (scheme-specific, see loss_aware.py) added
// into `out`, and the maxima for the fallback scales into mx.
void start_block(const Problem& p, const float* __restrict w, const float* __restrict d,
                 const int8_t* __restrict c, int64_t n, double* out, float* mx) {
    // maxima (order-free): max |w| (LAT2: max w and max -w)
    float m0 = -std::numeric_limits<float>::infinity(), m1 = m0;
    if (p.kind == kLat2) {
#pragma omp simd reduction(max : m0, m1)
        for (int64_t i = 0; i < n; ++i) {
            m0 = std::max(m0, w[i]);
            m1 = std::max(m1, -w[i]);
        }
    } else {
#pragma omp simd reduction(max : m0)
        for (int64_t i = 0; i < n; ++i) m0 = std::max(m0, std::fabs(w[i]));
    }
    mx[0] = std::max(mx[0], m0);
    mx[1] = std::max(mx[1], m1);
    if (p.kind == kLat) {
        // support = {prev != 0} restricted to |w| > 0; fallback max |w|
        simd_sum<2>(n, out, [&](int64_t i) -> C4 {
            const float a = std::fabs(w[i]);
            const double dm = (double)masked(d[i], mask_of((int32_t)c[i] != 0) & mask_of(a > 0.0f));
            return {{dm * (double)a, dm, 0.0, 0.0}};
        });
    } else if (p.kind == kLat2) {
        // positive side: prev > 0 and w > 0; negative side: prev < 0 and w < 0 (on -w)
        simd_sum<4>(n, out, [&](int64_t i) -> C4 {
            const float x = w[i];
            const double dp = (double)masked(d[i], mask_of((int32_t)c[i] > 0) & mask_of(x > 0.0f));
            const double dn = (double)masked(d[i], mask_of((int32_t)c[i] < 0) & mask_of(-x > 0.0f));
            return {{dp * (double)x, dp, dn * (double)-x, dn}};
        });
    } else if (p.official) {
        // first official scale: every nonzero previous level counts as 1 (the code's sign(Wb))
        simd_sum<2>(n, out, [&](int64_t i) -> C4 {
            const double dm = (double)masked(d[i], mask_of((int32_t)c[i] != 0));
            return {{dm * (double)std::fabs(w[i]), dm, 0.0, 0.0}};
        });
    } else if (!p.log) {
        // LS on the integer codes |prev| * sign(w) (sign(0) = +1: a zero weight with a nonzero
        // previous code adds d c^2 to the denominator, as in the PyTorch code)
        simd_sum<2>(n, out, [&](int64_t i) -> C4 {
            const double dd = (double)d[i];
            const double m = (double)std::abs((int32_t)c[i]);
            return {{dd * (double)std::fabs(w[i]) * m, dd * m * m, 0.0, 0.0}};
        });
    } else {
        const float* mult = p.mult0;
        simd_sum<2>(n, out, [&](int64_t i) -> C4 {
            const double dd = (double)d[i];
            const double m = (double)mult[std::abs((int32_t)c[i])];
            return {{dd * (double)std::fabs(w[i]) * m, dd * m * m, 0.0, 0.0}};
        });
    }
}

// Full round pass: the sums for the levels of `lv`.
template <class P>
Sums round_full(const Lv& lv, const float* __restrict w, const float* __restrict d, int64_t n) {
    Sums out;
    if (lv.zero) return out;  // LAQ codes_of(alpha <= 0) is all zero: empty sums
    simd_sum<P::kSums>(n, out.s, [&](int64_t i) { return P::contrib(lv, P::code(lv, w[i]), w[i], d[i]); });
    return out;
}

template <class P>
void final_full(const Lv& lv, const float* __restrict w, int64_t n, int8_t* __restrict o) {
    if (lv.zero) {
        std::memset(o, 0, (size_t)n);
        return;
    }
    for (int64_t i = 0; i < n; ++i) o[i] = (int8_t)P::code(lv, w[i]);
}

// The band of one chunk: its elements whose level differs between the two ends of the range.
struct Band {
    bool valid = false;  // built and not overflowed
    int32_t count = 0;
    double fixed[4] = {0.0, 0.0, 0.0, 0.0};
    float* w = nullptr;     // kBandCap + kBlock entries each
    float* d = nullptr;
    uint16_t* idx = nullptr;
};

// Build pass over one chunk: levels at both ends of the range, fixed sums and codes of the
// elements whose level agrees, band copies of the others. Works in blocks of kBlock elements
// (sums added block by block), so the block is in L1 for the second and third loops.
template <class P>
void build(const Lv& lo, const Lv& hi, const float* __restrict w, const float* __restrict d, int64_t n,
           int8_t* __restrict o, Band& band) {
    double fixed[4] = {0.0, 0.0, 0.0, 0.0};
    int32_t cnt = 0;
    bool overflow = false;
    alignas(8) uint8_t flag[kBlock];
    for (int64_t b = 0; b < n; b += kBlock) {
        const int64_t nb = std::min(kBlock, n - b);
        const float* __restrict wb = w + b;
        const float* __restrict db = d + b;
        if (overflow) break;
        int8_t* __restrict ob = o + b;
        // codes at both ends; fixed elements add their code's contribution (band elements count
        // as code 0 here) and write their final code
        simd_sum<P::kSums>(nb, fixed, [&](int64_t i) {
            const float x = wb[i];
            const int32_t cl = P::code(lo, x), ch = P::code(hi, x);
            const uint32_t moving = mask_of(cl != ch);
            ob[i] = (int8_t)cl;
            flag[i] = (uint8_t)(moving & 1u);
            return P::contrib(lo, (int32_t)((uint32_t)cl & ~moving), x, db[i]);
        });
        // Copy the band (a few percent) out, skipping 8 flags at a time; a block adds at most
        // kBlock entries, which the buffers hold beyond kBandCap.
        for (int64_t i = nb; i < ((nb + 7) & ~(int64_t)7); ++i) flag[i] = 0;
        for (int64_t i0 = 0; i0 < nb; i0 += 8) {
            uint64_t word;
            std::memcpy(&word, flag + i0, sizeof word);
            while (word) {
                const int64_t i = i0 + (__builtin_ctzll(word) >> 3);  // flags are 0/1 bytes
                word &= word - 1;
                band.w[cnt] = wb[i];
                band.d[cnt] = db[i];
                band.idx[cnt] = (uint16_t)(b + i);
                ++cnt;
            }
        }
        if (cnt > kBandCap) overflow = true;
    }
    band.valid = !overflow;
    band.count = overflow ? 0 : cnt;
    for (int q = 0; q < 4; ++q) band.fixed[q] = fixed[q];
}

// A round on a built chunk: fixed sums plus the band's sums for the levels of `lv`.
template <class P>
Sums round_band(const Lv& lv, const Band& band) {
    const float* __restrict bw = band.w;
    const float* __restrict bd = band.d;
    double bs[4] = {0.0, 0.0, 0.0, 0.0};
    simd_sum<P::kSums>(band.count, bs, [&](int64_t i) { return P::contrib(lv, P::code(lv, bw[i]), bw[i], bd[i]); });
    Sums out;
    for (int q = 0; q < 4; ++q) out.s[q] = band.fixed[q] + bs[q];
    return out;
}

template <class P>
void patch_band(const Lv& lv, const Band& band, int8_t* __restrict o) {
    for (int32_t i = 0; i < band.count; ++i) o[band.idx[i]] = (int8_t)P::code(lv, band.w[i]);
}

// ----------------------------------------------------------------------------------------------
// Scale updates (float results exactly as the PyTorch `_ratio` / `alpha_of` produce them)

struct Unit {
    float alpha[2] = {0.0f, 0.0f};
    float fallback = 0.0f;  // LAQ: max |w|, the scale when no level is nonzero
    bool done[2] = {true, true};
    int64_t iters[2] = {0, 0};
    // band state (long units)
    bool built = false;
    float lo[2] = {0.0f, 0.0f}, hi[2] = {0.0f, 0.0f};
    float prev[2] = {0.0f, 0.0f};  // alpha before the last round (valid where iters[q] > 0)
};

inline bool unit_done(const Problem& p, const Unit& u) { return u.done[0] && (sides_of(p) == 1 || u.done[1]); }

inline float ratio(double num, double den, float fallback) {
    const float v = den > 0.0 ? (float)(num / den) : fallback;
    return std::max(v, 0.0f);  // _ratio(...).clamp(min=0)
}

// The LAQ scale of sums (s0, s1): official and log-LS give alpha directly; linear LS gives the
// step alpha / k (fallback max|w| / k) and alpha = step * k.
inline float laq_alpha(const Problem& p, double num, double den, float fallback) {
    if (p.official || p.log) return ratio(num, den, fallback);
    const float kf = (float)p.k;
    return ratio(num, den, fallback / kf) * kf;
}

void start_unit(const Problem& p, const double* s, const float* mx, Unit& u) {
    if (p.kind == kLaq) {
        u.fallback = mx[0];
        u.alpha[0] = laq_alpha(p, s[0], s[1], mx[0]);
    } else {
        u.alpha[0] = ratio(s[0], s[1], mx[0]);
        if (p.kind == kLat2) u.alpha[1] = ratio(s[2], s[3], mx[1]);
    }
    for (int q = 0; q < sides_of(p); ++q) {
        u.done[q] = u.alpha[q] <= 0.0f;
        u.iters[q] = 0;
    }
}

void update_unit(const Problem& p, const double* s, Unit& u) {
    for (int q = 0; q < sides_of(p); ++q) {
        if (u.done[q]) continue;
        const float next = p.kind == kLaq ? laq_alpha(p, s[0], s[1], u.fallback) : ratio(s[2 * q], s[2 * q + 1], 0.0f);
        u.iters[q] += 1;
        u.done[q] = std::fabs(next - u.alpha[q]) < p.tol;  // float32, as (new - old).abs() < tol
        u.prev[q] = u.alpha[q];
        u.alpha[q] = next;
    }
}

// Level parameters of a round's full pass (a converged side counts nothing).
Lv round_lv(const Problem& p, const Unit& u, bool thresholds) {
    const bool use[2] = {!u.done[0], !u.done[1]};
    return make_lv(p, u.alpha, use, thresholds);
}

// Level parameters of the codes for the unit's scales (alpha <= 0: code 0).
Lv code_lv(const Problem& p, const float* alpha, bool thresholds) {
    const bool use[2] = {alpha[0] > 0.0f, alpha[1] > 0.0f};
    return make_lv(p, alpha, use, thresholds);
}

bool in_range(const Problem& p, const Unit& u, bool active_only) {
    if (!u.built) return false;
    for (int q = 0; q < sides_of(p); ++q) {
        if (active_only && u.done[q]) continue;
        if (!(u.lo[q] <= u.alpha[q] && u.alpha[q] <= u.hi[q])) return false;
    }
    return true;
}

// A band round needs every moving side at a positive scale (so its round levels and code levels
// coincide); LAT with a zero scale counts every |w| > 0 and runs full passes.
bool band_ok(const Problem& p, const Unit& u) {
    for (int q = 0; q < sides_of(p); ++q)
        if (!u.done[q] && !(u.alpha[q] > 0.0f)) return false;
    return true;
}

// The alpha range of a band around `center`: +-kFirstWidth* before the side moved; after a round,
// the alternation's steps shrink (roughly geometrically), so the range extends 3 last steps (the
// rest of a path with step ratio <= 3/4) in the direction of the last step and a margin back.
void set_range(const Problem& p, Unit& u, const float* center, const bool* moving) {
    for (int q = 0; q < sides_of(p); ++q) {
        const float c = center[q];
        if (!(moving[q] && c > 0.0f)) {
            u.lo[q] = u.hi[q] = c;
            continue;
        }
        float down = p.kind == kLaq ? kFirstWidthLaq : kFirstWidthTernary, up = down;
        if (u.iters[q] > 0) {
            const float step = (c - u.prev[q]) / c;  // relative last step
            const float ahead = 3.0f * std::fabs(step) + kMargin, back = 0.25f * std::fabs(step) + kMargin;
            down = step < 0.0f ? ahead : back;
            up = step < 0.0f ? back : ahead;
        }
        u.lo[q] = c * (1.0f - std::min(down, 0.5f));
        u.hi[q] = c * (1.0f + std::min(up, 0.5f));
    }
    u.built = true;
}

// ----------------------------------------------------------------------------------------------
// Band buffers, reused across calls (a fresh multi-MB allocation per solve costs page faults)

struct BandStore {
    std::vector<float> w, d;
    std::vector<uint16_t> idx;
};

std::mutex g_store_mu;
std::vector<std::unique_ptr<BandStore>> g_stores;

struct StoreLease {
    std::unique_ptr<BandStore> s;
    explicit StoreLease(size_t chunks) {
        {
            std::lock_guard<std::mutex> lock(g_store_mu);
            if (!g_stores.empty()) {
                s = std::move(g_stores.back());
                g_stores.pop_back();
            }
        }
        if (!s) s = std::make_unique<BandStore>();
        const size_t n = chunks * (size_t)(kBandCap + kBlock);
        if (s->w.size() < n) {
            s->w.resize(n);
            s->d.resize(n);
            s->idx.resize(n);
        }
    }
    ~StoreLease() {
        std::lock_guard<std::mutex> lock(g_store_mu);
        if (g_stores.size() < 4) g_stores.push_back(std::move(s));
    }
};

// ----------------------------------------------------------------------------------------------
// Drivers

template <class P>
void solve_short(const Problem& p, std::vector<Unit>& units, int8_t* codes, int n_threads) {
    // Each unit runs its whole alternation in one task (one chunk, cache-resident) with full passes.
    const int64_t L = p.len;
    constexpr bool thr = P::kThresholds;
    const int64_t grain = std::max<int64_t>(1, kChunk / std::max<int64_t>(L, 1));
    lowbit::parallel_for(p.units, n_threads, grain, [&](int64_t b, int64_t e) {
        for (int64_t u = b; u < e; ++u) {
            Unit& s = units[(size_t)u];
            const float* w = p.w + u * L;
            const float* d = p.d + u * L;
            float mx[2] = {-std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()};
            double sums[4] = {0.0, 0.0, 0.0, 0.0};
            start_block(p, w, d, p.c0 + u * L, L, sums, mx);
            start_unit(p, sums, mx, s);
            for (int r = 0; r < p.max_iter && !unit_done(p, s); ++r) {
                const Sums rs = round_full<P>(round_lv(p, s, thr), w, d, L);
                update_unit(p, rs.s, s);
            }
            final_full<P>(code_lv(p, s.alpha, thr), w, L, codes + u * L);
        }
    });
}

template <class P>
void solve_long(const Problem& p, std::vector<Unit>& units, int8_t* codes, int n_threads) {
    // Rounds in lock step: one parallel pass over the chunks of the unconverged units per round
    // (a band rescan where the unit's band is valid, else a build pass or a full pass).
    const int64_t U = p.units, L = p.len;
    const int64_t per = (L + kChunk - 1) / kChunk;
    StoreLease store((size_t)(U * per));
    std::vector<Band> bands((size_t)(U * per));
    for (size_t c = 0; c < bands.size(); ++c) {
        const size_t o = c * (size_t)(kBandCap + kBlock);
        bands[c].w = store.s->w.data() + o;
        bands[c].d = store.s->d.data() + o;
        bands[c].idx = store.s->idx.data() + o;
    }
    std::vector<Sums> parts((size_t)(U * per));
    std::vector<float> mxs((size_t)(U * per) * 2);
    auto chunk_of = [&](int64_t c, int64_t* off, int64_t* n) {
        *off = c * kChunk;
        *n = std::min(kChunk, L - *off);
    };

    auto count_band = [&](int64_t u) {
        for (int64_t c = 0; c < per; ++c) {
            const Band& band = bands[(size_t)(u * per + c)];
            t_stats.band_elements += band.count;
            t_stats.overflowed_chunks += !band.valid;
        }
    };

    // Start pass.
    std::vector<Lv> lv_lo((size_t)U), lv_hi((size_t)U);
    lowbit::parallel_for(U * per, n_threads, 1, [&](int64_t b, int64_t e) {
        for (int64_t it = b; it < e; ++it) {
            const int64_t u = it / per;
            int64_t off, n;
            chunk_of(it % per, &off, &n);
            const int64_t base = u * L + off;
            float* mx = &mxs[(size_t)it * 2];
            mx[0] = mx[1] = -std::numeric_limits<float>::infinity();
            double* sums = parts[(size_t)it].s;
            for (int q = 0; q < 4; ++q) sums[q] = 0.0;
            start_block(p, p.w + base, p.d + base, p.c0 + base, n, sums, mx);
        }
    });
    for (int64_t u = 0; u < U; ++u) {
        Unit& s = units[(size_t)u];
        double sums[4] = {0.0, 0.0, 0.0, 0.0};
        float mx[2] = {-std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()};
        for (int64_t c = 0; c < per; ++c) {
            const size_t it = (size_t)(u * per + c);
            for (int q = 0; q < 4; ++q) sums[q] += parts[it].s[q];
            mx[0] = std::max(mx[0], mxs[it * 2]);
            mx[1] = std::max(mx[1], mxs[it * 2 + 1]);
        }
        start_unit(p, sums, mx, s);
    }

    enum Mode : uint8_t { kFull, kBuild, kBand };
    std::vector<int64_t> active;
    std::vector<uint8_t> mode((size_t)U);
    std::vector<Lv> lv_cur((size_t)U);
    for (int r = 0; r < p.max_iter; ++r) {
        active.clear();
        for (int64_t u = 0; u < U; ++u) {
            Unit& s = units[(size_t)u];
            if (unit_done(p, s)) continue;
            active.push_back(u);
            Mode m;
            if (!band_ok(p, s)) {
                m = kFull;
                ++t_stats.full_rounds;
                s.built = false;
                lv_cur[(size_t)u] = round_lv(p, s, P::kThresholds);
            } else {
                if (in_range(p, s, true)) {
                    m = kBand;
                    ++t_stats.band_rounds;
                } else {
                    m = kBuild;
                    ++t_stats.builds;
                    const bool moving[2] = {!s.done[0], !s.done[1]};
                    set_range(p, s, s.alpha, moving);
                    lv_lo[(size_t)u] = code_lv(p, s.lo, P::kThresholds);
                    lv_hi[(size_t)u] = code_lv(p, s.hi, P::kThresholds);
                }
                lv_cur[(size_t)u] = code_lv(p, s.alpha, P::kThresholds);
            }
            mode[(size_t)u] = (uint8_t)m;
        }
        if (active.empty()) break;
        const int64_t items = (int64_t)active.size() * per;
        lowbit::parallel_for(items, n_threads, 1, [&](int64_t b, int64_t e) {
            for (int64_t it = b; it < e; ++it) {
                const int64_t u = active[(size_t)(it / per)];
                const int64_t ci = u * per + it % per;
                Band& band = bands[(size_t)ci];
                int64_t off, n;
                chunk_of(it % per, &off, &n);
                const int64_t base = u * L + off;
                const Lv& lv = lv_cur[(size_t)u];
                const Mode m = (Mode)mode[(size_t)u];
                if (m == kBuild)
                    build<P>(lv_lo[(size_t)u], lv_hi[(size_t)u], p.w + base, p.d + base, n, codes + base, band);
                if (m != kFull && band.valid)
                    parts[(size_t)it] = round_band<P>(lv, band);
                else
                    parts[(size_t)it] = round_full<P>(lv, p.w + base, p.d + base, n);
            }
        });
        for (size_t a = 0; a < active.size(); ++a) {
            double sums[4] = {0.0, 0.0, 0.0, 0.0};
            for (int64_t c = 0; c < per; ++c)
                for (int q = 0; q < 4; ++q) sums[q] += parts[(size_t)((int64_t)a * per + c)].s[q];
            if (mode[(size_t)active[a]] == kBuild) count_band(active[a]);
            update_unit(p, sums, units[(size_t)active[a]]);
        }
    }

    // Final codes: patch the bands where the final scales lie in the built range, else a full pass.
    std::vector<Lv> lv_fin((size_t)U);
    std::vector<uint8_t> patch((size_t)U);
    for (int64_t u = 0; u < U; ++u) {
        lv_fin[(size_t)u] = code_lv(p, units[(size_t)u].alpha, P::kThresholds);
        patch[(size_t)u] = in_range(p, units[(size_t)u], false);
        ++(patch[(size_t)u] ? t_stats.patched : t_stats.full_finals);
    }
    lowbit::parallel_for(U * per, n_threads, 1, [&](int64_t b, int64_t e) {
        for (int64_t it = b; it < e; ++it) {
            const int64_t u = it / per;
            int64_t off, n;
            chunk_of(it % per, &off, &n);
            const int64_t base = u * L + off;
            const Band& band = bands[(size_t)it];
            if (patch[(size_t)u] && band.valid)
                patch_band<P>(lv_fin[(size_t)u], band, codes + base);
            else
                final_full<P>(lv_fin[(size_t)u], p.w + base, n, codes + base);
        }
    });
}

template <class P>
void solve_with(const Problem& p, int8_t* codes, float* alpha_out, int64_t* iters_out, int n_threads) {
    std::vector<Unit> units((size_t)p.units);
    if (p.len <= kChunk)
        solve_short<P>(p, units, codes, n_threads);
    else
        solve_long<P>(p, units, codes, n_threads);
    for (int64_t u = 0; u < p.units; ++u) {
        const Unit& s = units[(size_t)u];
        if (p.kind == kLat2) {
            alpha_out[2 * u] = s.alpha[0];
            alpha_out[2 * u + 1] = s.alpha[1];
            iters_out[u] = std::max(s.iters[0], s.iters[1]);
        } else {
            alpha_out[u] = s.alpha[0];
            iters_out[u] = s.iters[0];
        }
    }
}

template <bool LOG, bool OFFICIAL>
void solve_laq(const Problem& p, int8_t* codes, float* alpha_out, int64_t* iters_out, int n_threads) {
    // Threshold comparisons for up to 7 levels per sign (bits <= 4) where the thresholds pay off;
    // the direct computation otherwise. Both give the same levels on every float.
    const bool thr = p.len >= kThresholdMinLen;
    if (thr && p.k == 1) return solve_with<PLaq<1, LOG, OFFICIAL>>(p, codes, alpha_out, iters_out, n_threads);
    if (thr && p.k == 3) return solve_with<PLaq<3, LOG, OFFICIAL>>(p, codes, alpha_out, iters_out, n_threads);
    if (thr && p.k == 7) return solve_with<PLaq<7, LOG, OFFICIAL>>(p, codes, alpha_out, iters_out, n_threads);
    solve_with<PLaq<0, LOG, OFFICIAL>>(p, codes, alpha_out, iters_out, n_threads);
}

void solve(const Problem& p, int8_t* codes, float* alpha_out, int64_t* iters_out, int n_threads) {
    t_stats = Stats();
    if (p.kind == kLat) return solve_with<PLat>(p, codes, alpha_out, iters_out, n_threads);
    if (p.kind == kLat2) return solve_with<PLat2>(p, codes, alpha_out, iters_out, n_threads);
    if (p.log) {
        if (p.official) return solve_laq<true, true>(p, codes, alpha_out, iters_out, n_threads);
        return solve_laq<true, false>(p, codes, alpha_out, iters_out, n_threads);
    }
    if (p.official) return solve_laq<false, true>(p, codes, alpha_out, iters_out, n_threads);
    solve_laq<false, false>(p, codes, alpha_out, iters_out, n_threads);
}

// ----------------------------------------------------------------------------------------------
// Bindings

using Mat = nb::ndarray<const float, nb::ndim<2>, nb::device::cpu, nb::c_contig>;
using Codes = nb::ndarray<const int8_t, nb::ndim<2>, nb::device::cpu, nb::c_contig>;
using CodesOut = nb::ndarray<int8_t, nb::ndim<2>, nb::device::cpu, nb::c_contig>;
using Scales = nb::ndarray<float, nb::device::cpu, nb::c_contig>;
using Iters = nb::ndarray<int64_t, nb::ndim<1>, nb::device::cpu, nb::c_contig>;
using OutMat = nb::ndarray<float, nb::ndim<2>, nb::device::cpu, nb::c_contig>;

Problem make_problem(const Mat& w, const Mat& d, const Codes& c0, int max_iter, double tol) {
    Problem p;
    p.units = (int64_t)w.shape(0);
    p.len = (int64_t)w.shape(1);
    auto same = [&](int64_t r, int64_t c, const char* name) {
        if (r != p.units || c != p.len)
            throw std::invalid_argument(std::string(name) + " must have the shape of w (" + std::to_string(p.units) +
                                        ", " + std::to_string(p.len) + ")");
    };
    same((int64_t)d.shape(0), (int64_t)d.shape(1), "d");
    same((int64_t)c0.shape(0), (int64_t)c0.shape(1), "codes0");
    p.w = w.data();
    p.d = d.data();
    p.c0 = c0.data();
    p.max_iter = std::max(0, max_iter);
    p.tol = (float)tol;  // the PyTorch test compares float32 tensors with tol cast to float32
    return p;
}

void finish_checks(const Problem& p, const CodesOut& codes, const Scales& alpha, const Iters& iters) {
    if ((int64_t)codes.shape(0) != p.units || (int64_t)codes.shape(1) != p.len)
        throw std::invalid_argument("codes must have the shape of w");
    if ((int64_t)alpha.size() != p.units * sides_of(p))
        throw std::invalid_argument("alpha must hold " + std::to_string(sides_of(p)) + " float(s) per unit");
    if ((int64_t)iters.shape(0) != p.units) throw std::invalid_argument("iters must hold one int64 per unit");
    if (p.units > 0 && p.len == 0) throw std::invalid_argument("units must not be empty");
    if (p.len > ((int64_t)1 << 40)) throw std::invalid_argument("units are too long");
}

void support_solve(Mat w, Mat d, Codes c0, bool two_sided, int max_iter, double tol, CodesOut codes, Scales alpha,
                   Iters iters, int n_threads) {
    Problem p = make_problem(w, d, c0, max_iter, tol);
    p.kind = two_sided ? kLat2 : kLat;
    finish_checks(p, codes, alpha, iters);
    if (p.units == 0) return;
    int8_t* co = codes.data();
    float* ao = alpha.data();
    int64_t* io = iters.data();
    nb::gil_scoped_release release;
    solve(p, co, ao, io, n_threads);
}

void laq_solve(Mat w, Mat d, Codes c0, int bits, bool log_levels, bool official, int max_iter, double tol,
               CodesOut codes, Scales alpha, Iters iters, int n_threads) {
    if (bits < 2 || bits > 8) throw std::invalid_argument("LAQ supports 2..8 bits");
    Problem p = make_problem(w, d, c0, max_iter, tol);
    p.kind = kLaq;
    p.k = (1 << (bits - 1)) - 1;
    p.log = log_levels;
    p.official = official;
    p.log_zero = (float)(std::ldexp(1.0, -p.k) / 0.75);
    p.mult0[0] = 0.0f;
    for (int c = 1; c <= 128; ++c) p.mult0[c] = std::ldexp(1.0f, c - p.k);  // _mult: exp2(|c| - k)
    finish_checks(p, codes, alpha, iters);
    if (p.units == 0) return;
    int8_t* co = codes.data();
    float* ao = alpha.data();
    int64_t* io = iters.data();
    nb::gil_scoped_release release;
    solve(p, co, ao, io, n_threads);
}

// The forward weight of solved codes in one pass (what lowbit.functional.dequantize computes in
// several: casts, comparisons, products), with the same float operations so the result is
// bit-identical: kind 0 `c * s` (binary, ternary, k-bit linear: s is the step), kind 1
// `c > 0 ? wp : (c < 0 ? 0 - wn : 0)` (asymmetric ternary, scales [wp, wn] per unit), kind 2
// `copysign(2^(|c| - k), c) * s` and 0 for c = 0 (k-bit log levels).
void dequantize(Codes codes, Scales scales, int kind, int k, OutMat out, int n_threads) {
    const int64_t units = (int64_t)codes.shape(0), len = (int64_t)codes.shape(1);
    if ((int64_t)out.shape(0) != units || (int64_t)out.shape(1) != len)
        throw std::invalid_argument("out must have the shape of codes");
    if (kind < 0 || kind > 2) throw std::invalid_argument("kind must be 0 (linear), 1 (asymmetric) or 2 (log)");
    if ((int64_t)scales.size() != units * (kind == 1 ? 2 : 1))
        throw std::invalid_argument(kind == 1 ? "scales must hold [wp, wn] per unit" : "scales must hold one float per unit");
    if (kind == 2 && (k < 1 || k > 127)) throw std::invalid_argument("log levels need 1 <= k <= 127");
    float mult[256];
    for (int c = -128; c < 128; ++c)
        mult[c + 128] = c == 0 || std::abs(c) > k ? 0.0f : std::copysign(std::ldexp(1.0f, std::abs(c) - k), (float)c);
    const int8_t* cp = codes.data();
    const float* sp = scales.data();
    float* op = out.data();
    const int64_t total = units * len;
    nb::gil_scoped_release release;
    lowbit::parallel_for(total, total >= (1 << 18) ? n_threads : 1, 1 << 16, [&](int64_t b, int64_t e) {
        int64_t i = b;
        while (i < e) {
            const int64_t u = i / len, end = std::min(e, (u + 1) * len);
            const int8_t* c = cp + i;
            float* o = op + i;
            const int64_t n = end - i;
            if (kind == 0) {
                const float sc = sp[u];
                for (int64_t j = 0; j < n; ++j) o[j] = (float)c[j] * sc;
            } else if (kind == 1) {
                const float wp = sp[2 * u], wn = 0.0f - sp[2 * u + 1];
                for (int64_t j = 0; j < n; ++j) o[j] = c[j] > 0 ? wp : (c[j] < 0 ? wn : 0.0f);
            } else {
                const float sc = sp[u];
                for (int64_t j = 0; j < n; ++j) o[j] = mult[c[j] + 128] * sc;
            }
            i = end;
        }
    });
}

}  // namespace

void register_la_solver(nb::module_& m) {
    m.def("la_support_solve", &support_solve, "w"_a, "d"_a, "codes0"_a, "two_sided"_a, "max_iter"_a, "tol"_a,
          "codes"_a, "alpha"_a, "iters"_a, "n_threads"_a = 1,
          "LAT_a (one scale on |w|) or LAT2_a (two_sided: one scale per sign) alternation on (U, L) float32 units.");
    m.def("la_laq_solve", &laq_solve, "w"_a, "d"_a, "codes0"_a, "bits"_a, "log_levels"_a, "official"_a, "max_iter"_a,
          "tol"_a, "codes"_a, "alpha"_a, "iters"_a, "n_threads"_a = 1,
          "LAQ m-bit alternation (linear or log levels, LS or official scale) on (U, L) float32 units.");
    m.def("la_dequantize", &dequantize, "codes"_a, "scales"_a, "kind"_a, "k"_a, "out"_a, "n_threads"_a = 1,
          "Forward weight of (U, L) int8 codes with per-unit scales in one pass (kind 0 linear, 1 asymmetric "
          "ternary, 2 log levels of k).");
    m.def("la_chunk", [] { return kChunk; }, "Elements per fixed summation chunk of a unit.");
    m.def(
        "la_stats",
        [] {
            nb::dict r;
            r["builds"] = t_stats.builds;
            r["band_rounds"] = t_stats.band_rounds;
            r["full_rounds"] = t_stats.full_rounds;
            r["patched"] = t_stats.patched;
            r["full_finals"] = t_stats.full_finals;
            r["band_elements"] = t_stats.band_elements;
            r["overflowed_chunks"] = t_stats.overflowed_chunks;
            return r;
        },
        "What the last solve on this thread did for units longer than la_chunk(), counted per unit: band "
        "builds, rounds on a band, full-pass rounds, final codes patched or fully written; band elements "
        "and overflowed chunks summed over the builds.");
}
