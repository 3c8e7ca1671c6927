// The exact loss-aware ternary solvers LAT_e and LAT2_e (lowbit/methods/loss_aware.py, whose
// PyTorch function `_topk_exact` is the reference for every rule here; reference/papers.md §3.3).
//
// Per unit (one row of the (U, L) layout) and side, over the eligible entries (LAT_e: w != 0 with
// key |w|; LAT2_e: w > 0 with key w, and w < 0 with key -w): for a fixed alpha the best support is
// {key > alpha / 2} whatever d > 0 is, so the optimum is a top-k set of the key. Sort the keys
// descending, take the cumulative sums cumD_k = sum d and cumDA_k = sum d * key in double, in that
// order, and keep the first k maximising cumDA_k^2 / cumD_k (the first maximum); alpha =
// cumDA_k / cumD_k. The PyTorch reference sorts with a stable descending sort, so equal keys keep
// their index order; here the sort key is (0x7fffffff - bits(key), index), whose ascending order
// is exactly that (keys are positive floats, whose bit patterns order like the floats).
//
// Units shorter than kBucketMin are sorted in full (an LSD radix sort on the 31 key bits, the index
// riding in the low 32 bits; std::sort on the same items when short) and scanned with the same
// double operations in the same order as torch.cumsum (a sequential scan on the CPU) and the same
// score expression: alpha and the support are bit-identical to the reference. Longer units use the
// bucketed search of solve_buckets (below): the same maximiser, with sums equal to double rounding.
// Built with -ffp-contract=off (no FMA contraction of the sums). Units run in parallel, each on one
// thread, so the result does not depend on the thread count.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "float_bits.h"
#include "nb_arrays.h"
#include "threadpool.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using FloatIn = lowbit::In<float>;
using FloatOut = lowbit::Out<float>;
using CodesOut = lowbit::Out<int8_t>;
using DoubleIn = lowbit::In<double>;
using DoubleOut = lowbit::Out<double>;
using CountsIn = lowbit::In<int64_t>;

constexpr int64_t kRadixMin = 2048;       // shorter units: std::sort of the items
constexpr int64_t kBucketMin = 1 << 16;    // units at least this long: the bucketed search
constexpr int kBucketShift = 16;           // bucket = key bits >> 16: keys within 2^-7 of each other
constexpr int kBuckets = 1 << (31 - kBucketShift);
constexpr double kMargin = 1e-9;           // relative slack of the bucket bounds (rounding of long sums)

using lowbit::bits_of;
using lowbit::float_of;

// The key of an eligible entry (> 0), or 0 for an ineligible one; side +1: w > 0, -1: w < 0, 0: w != 0.
inline float key_of(float x, int side) {
    if (side > 0) return x > 0.0f ? x : 0.0f;
    if (side < 0) return x < 0.0f ? -x : 0.0f;
    return x != 0.0f ? std::fabs(x) : 0.0f;
}

inline int8_t code_of(float x, int side) { return (int8_t)(side > 0 ? 1 : (side < 0 ? -1 : (x < 0.0f ? -1 : 1))); }

// Sort item: ascending (0x7fffffff - key bits, index) is descending key, ties in index order.
inline uint64_t item_of(float key, int64_t i) { return ((uint64_t)(0x7fffffffu - bits_of(key)) << 32) | (uint64_t)i; }
inline double item_key(uint64_t v) { return (double)float_of(0x7fffffffu - (uint32_t)(v >> 32)); }
inline uint32_t item_index(uint64_t v) { return (uint32_t)(v & 0xffffffffu); }

// Ascending sort of the items by their high 32 bits (31 used), stable: LSD radix, `tmp` as scratch.
void radix_sort(std::vector<uint64_t>& items, std::vector<uint64_t>& tmp) {
    const int64_t n = (int64_t)items.size();
    constexpr int kShift[3] = {32, 43, 53};
    constexpr int kBits[3] = {11, 10, 10};
    std::vector<uint32_t> hist[3] = {std::vector<uint32_t>(1u << 11, 0), std::vector<uint32_t>(1u << 10, 0),
                                     std::vector<uint32_t>(1u << 10, 0)};
    const uint64_t* src0 = items.data();
    for (int64_t i = 0; i < n; ++i) {
        const uint64_t v = src0[i];
        ++hist[0][(v >> kShift[0]) & ((1u << kBits[0]) - 1)];
        ++hist[1][(v >> kShift[1]) & ((1u << kBits[1]) - 1)];
        ++hist[2][(v >> kShift[2]) & ((1u << kBits[2]) - 1)];
    }
    tmp.resize(n);
    uint64_t* src = items.data();
    uint64_t* dst = tmp.data();
    for (int pass = 0; pass < 3; ++pass) {
        std::vector<uint32_t>& h = hist[pass];
        const uint64_t mask = (1u << kBits[pass]) - 1;
        const int shift = kShift[pass];
        if (h[(src[0] >> shift) & mask] == (uint32_t)n) continue;  // one digit value: nothing moves
        uint32_t run = 0;
        for (uint32_t& c : h) {
            const uint32_t cnt = c;
            c = run;
            run += cnt;
        }
        uint32_t* pos = h.data();
        for (int64_t i = 0; i < n; ++i) {
            const uint64_t v = src[i];
            dst[pos[(v >> shift) & mask]++] = v;
        }
        std::swap(src, dst);
    }
    if (src != items.data()) std::memcpy(items.data(), src, (size_t)n * sizeof(uint64_t));
}

void sort_items(std::vector<uint64_t>& items, std::vector<uint64_t>& tmp) {
    if ((int64_t)items.size() < kRadixMin) {
        std::sort(items.begin(), items.end());
    } else {
        radix_sort(items, tmp);
    }
}

// The running sums of the scan and the best position so far. torch: cum_d and cum_da in double;
// positions with cum_d > 0 are valid; score = cum_da^2 / cum_d; best = the first argmax.
struct Scan {
    double cum_d = 0.0, cum_da = 0.0, best_score = -1.0, best_d = 0.0, best_da = 0.0;
    bool any = false;
    // adds one entry; true when its position became the best
    bool add(double dd, double key) {
        cum_d += dd;
        const double prod = dd * key;
        cum_da += prod;
        if (!(cum_d > 0.0)) return false;
        any = true;
        const double sq = cum_da * cum_da;
        const double score = sq / cum_d;
        if (!(score > best_score)) return false;
        best_score = score;
        best_d = cum_d;
        best_da = cum_da;
        return true;
    }
    float alpha() const {
        if (!any) return 0.0f;  // no valid position: alpha 0 and nothing kept (as the reference)
        const double a = best_da / std::max(best_d, 1e-300);
        return a > 0.0 ? (float)a : 0.0f;
    }
};

struct Scratch {
    std::vector<uint64_t> items, items2, tmp;
    std::vector<double> bsum;   // per side and bucket: sum d, sum d * key
    std::vector<uint8_t> cand;  // per side and bucket: 1 when the best position may lie in it
};

// Short units: sort every eligible entry and scan them all. The sums are torch.cumsum's, in the
// same order, so alpha and the support are bit-identical to the reference.
float solve_sorted(const float* w, const float* d, int64_t len, int side, int8_t* codes, Scratch& s) {
    std::vector<uint64_t>& items = s.items;
    items.clear();
    for (int64_t i = 0; i < len; ++i) {
        const float key = key_of(w[i], side);
        if (key > 0.0f) items.push_back(item_of(key, i));
    }
    if (items.empty()) return 0.0f;
    sort_items(items, s.tmp);
    const int64_t n = (int64_t)items.size();
    Scan scan;
    int64_t best = -1;
    for (int64_t p = 0; p < n; ++p) {
        const uint64_t v = items[p];
        if (scan.add((double)d[item_index(v)], item_key(v))) best = p;
    }
    const float alpha = scan.alpha();
    if (alpha > 0.0f) {
        for (int64_t p = 0; p <= best; ++p) {
            const uint32_t i = item_index(items[p]);
            codes[i] = code_of(w[i], side);
        }
    }
    return alpha;
}

// Long units: the same maximiser without sorting everything. One pass sums d and d * key per
// bucket of nearly equal keys (bucket = key bits >> 16, so a bucket's keys lie within a factor
// 1 + 2^-7). Walking the buckets from the largest key down with prefix sums (C, D), a position
// inside bucket b has a score at most
//     max(C^2 / D, (C + S_b * kmax_b)^2 / (D + S_b))
// (S_b: the bucket's sum of d, kmax_b: its key bound; (C + s kmax)^2 / (D + s) has no interior
// maximum in s), and the score at each bucket's end is attained. Only buckets whose bound reaches
// the best end score (less a relative 1e-9 for rounding) can hold the best position: their
// entries are sorted and scanned one by one, every other bucket is added as a whole. The sums are
// those of the reference up to the order of the double additions, so alpha agrees to double
// rounding and the support is the same unless two positions score within that rounding.
//
// Both sides of LAT2_e share every pass over (w, d) (side 0: w > 0, side 1: w < 0; LAT_e has side
// 0 only, keyed by |w|), and the passes have no data-dependent branches: with two sides the sign
// of w is a coin flip per entry. Zeros go to a slot that is never read.
struct SideResult {
    float alpha = 0.0f;
    int64_t best_bucket = kBuckets;  // entries in higher buckets are kept; kBuckets: none
    int64_t best = -1;               // position in the side's sorted candidates
};

void side_search(const double* bs, int64_t lo, int64_t hi, const float* d, uint8_t* cand,
                 std::vector<uint64_t>& items, std::vector<uint64_t>& tmp, SideResult& r, bool collect_only) {
    if (!collect_only) {
        // bounds: the best end-of-bucket score, then which buckets may beat it
        double c = 0.0, dsum = 0.0, best_end = -1.0;
        for (int64_t b = hi; b >= lo; --b) {
            c += bs[2 * b + 1];
            dsum += bs[2 * b];
            if (dsum > 0.0) best_end = std::max(best_end, c * c / dsum);
        }
        c = dsum = 0.0;
        for (int64_t b = hi; b >= lo; --b) {
            const double sb = bs[2 * b], kmax = (double)float_of((uint32_t)(b + 1) << kBucketShift);
            double ub = dsum > 0.0 ? c * c / dsum : -1.0;
            if (dsum + sb > 0.0) ub = std::max(ub, (c + sb * kmax) * (c + sb * kmax) / (dsum + sb));
            cand[b] = (sb != 0.0 || bs[2 * b + 1] != 0.0) && ub >= best_end * (1.0 - kMargin);
            c += bs[2 * b + 1];
            dsum += sb;
        }
        return;
    }
    sort_items(items, tmp);
    // the scan: whole buckets outside the candidates, entry by entry inside them
    Scan scan;
    int64_t p = 0;
    const int64_t n = (int64_t)items.size();
    for (int64_t b = hi; b >= lo; --b) {
        if (!cand[b]) {
            scan.cum_d += bs[2 * b];
            scan.cum_da += bs[2 * b + 1];
            continue;
        }
        for (; p < n && (int64_t)((0x7fffffffu - (uint32_t)(items[p] >> 32)) >> kBucketShift) == b; ++p) {
            const uint64_t v = items[p];
            if (scan.add((double)d[item_index(v)], item_key(v))) {
                r.best = p;
                r.best_bucket = b;
            }
        }
    }
    r.alpha = scan.alpha();
    if (!(r.alpha > 0.0f) || r.best < 0) {
        r.alpha = 0.0f;
        r.best = -1;
        r.best_bucket = kBuckets;
    }
}

void solve_buckets(const float* w, const float* d, int64_t len, bool two_sided, int8_t* codes, float* alpha,
                   Scratch& s) {
    const int sides = two_sided ? 2 : 1;
    const int64_t stride = 2 * (int64_t)kBuckets;  // doubles per side
    std::vector<double>& bs = s.bsum;
    bs.assign((size_t)(sides * stride + 2), 0.0);
    const int64_t dummy = sides * (int64_t)kBuckets;  // the zeros' slot
    int64_t lo[2] = {kBuckets, kBuckets}, hi[2] = {-1, -1};
    for (int64_t i = 0; i < len; ++i) {
        const float x = w[i], key = std::fabs(x);
        const int side = two_sided & (x < 0.0f);
        const int64_t b = bits_of(key) >> kBucketShift;
        const int64_t slot = x != 0.0f ? side * (int64_t)kBuckets + b : dummy;
        const double dd = (double)d[i];
        bs[2 * slot] += dd;
        bs[2 * slot + 1] += dd * (double)key;
    }
    for (int sd = 0; sd < sides; ++sd) {  // the occupied range of each side
        const double* h = bs.data() + sd * stride;
        for (int64_t b = 0; b < kBuckets; ++b) {
            if (h[2 * b] != 0.0 || h[2 * b + 1] != 0.0) {
                lo[sd] = std::min(lo[sd], b);
                hi[sd] = std::max(hi[sd], b);
            }
        }
    }
    std::vector<uint8_t>& cand = s.cand;
    cand.assign((size_t)(sides * kBuckets), 0);
    SideResult res[2];
    alpha[0] = 0.0f;
    if (two_sided) alpha[1] = 0.0f;
    for (int sd = 0; sd < sides; ++sd) {
        if (hi[sd] < 0) continue;
        side_search(bs.data() + sd * stride, lo[sd], hi[sd], d, cand.data() + sd * (int64_t)kBuckets, s.items, s.tmp, res[sd],
                    false);
    }
    // the candidates' entries, per side
    std::vector<uint64_t>* items[2] = {&s.items, &s.items2};
    items[0]->clear();
    items[1]->clear();
    const uint8_t* cp = cand.data();
    for (int64_t i = 0; i < len; ++i) {
        const float x = w[i], key = std::fabs(x);
        const int side = two_sided & (x < 0.0f);
        const int64_t b = bits_of(key) >> kBucketShift;
        if (cp[side * (int64_t)kBuckets + b] && x != 0.0f) items[side]->push_back(item_of(key, i));
    }
    for (int sd = 0; sd < sides; ++sd) {
        if (hi[sd] < 0) continue;
        side_search(bs.data() + sd * stride, lo[sd], hi[sd], d, cand.data() + sd * (int64_t)kBuckets, *items[sd], s.tmp, res[sd],
                    true);
        alpha[sd] = res[sd].alpha;
    }
    // codes: sign(w) for every entry of a bucket above its side's best one, then the best
    // buckets' sorted prefixes
    const int64_t bb0 = res[0].best_bucket, bb1 = two_sided ? res[1].best_bucket : bb0;
    for (int64_t i = 0; i < len; ++i) {
        const float x = w[i];
        const int64_t b = bits_of(std::fabs(x)) >> kBucketShift;
        const bool keep = x != 0.0f && b > (x < 0.0f ? bb1 : bb0);
        codes[i] = (int8_t)(keep ? (x < 0.0f ? -1 : 1) : 0);
    }
    for (int sd = 0; sd < sides; ++sd) {
        for (int64_t q = res[sd].best; q >= 0; --q) {
            const uint64_t v = (*items[sd])[q];
            const uint32_t kb = 0x7fffffffu - (uint32_t)(v >> 32);
            if ((int64_t)(kb >> kBucketShift) != res[sd].best_bucket) break;
            codes[item_index(v)] = (int8_t)(w[item_index(v)] < 0.0f ? -1 : 1);
        }
    }
}

void la_topk_exact(FloatIn w, FloatIn d, bool two_sided, CodesOut codes, FloatOut alpha, int n_threads) {
    const auto shape = lowbit::require_units("la_topk_exact (w, d, codes)", w, d, codes);
    const int64_t units = shape.first, len = shape.second;
    if ((int64_t)alpha.size() != units * (two_sided ? 2 : 1))
        throw std::invalid_argument("la_topk_exact: alpha must hold one (LAT_e) or two (LAT2_e) scales per unit");
    if (len >= (int64_t)1 << 32) throw std::invalid_argument("la_topk_exact: units longer than 2^32 entries");
    const float* wp = w.data();
    const float* dp = d.data();
    int8_t* cp = codes.data();
    float* ap = alpha.data();
    nb::gil_scoped_release release;
    lowbit::parallel_for(units, std::max(1, n_threads), 1, [&](int64_t b, int64_t e) {
        const float* wb = wp;
        const float* db = dp;
        int8_t* cb = cp;
        float* ab = ap;
        Scratch scratch;
        for (int64_t u = b; u < e; ++u) {
            const float* wu = wb + u * len;
            const float* du = db + u * len;
            int8_t* cu = cb + u * len;
            std::memset(cu, 0, (size_t)len);
            float* au = ab + u * (two_sided ? 2 : 1);
            if (len >= kBucketMin) {
                solve_buckets(wu, du, len, two_sided, cu, au, scratch);
            } else if (two_sided) {
                au[0] = solve_sorted(wu, du, len, +1, cu, scratch);
                au[1] = solve_sorted(wu, du, len, -1, cu, scratch);
            } else {
                au[0] = solve_sorted(wu, du, len, 0, cu, scratch);
            }
        }
    });
}

// TWN's exact ternarization with d = 1 on short units (FGQ's groups; functional.twn(w, "exact"),
// whose PyTorch code is the reference): sort |w| descending, cs_k = cumulative sum in double,
// candidate k only where |w|_(k) > |w|_(k+1) or k = count (thresholds between distinct
// magnitudes, so a tie is kept or dropped whole and the order within it cannot matter), the first
// k maximising cs_k^2 / k; alpha = cs_k / k, kept = |w| > |w|_(k+1) (-1 past the end), and
// nothing kept when alpha is 0. Units are padded with zeros past their count (functional.to_units).
constexpr int64_t kTwnMaxLen = 256;

void twn_exact_units(DoubleIn w, CountsIn counts, DoubleOut alpha, CodesOut codes, int n_threads) {
    const auto shape = lowbit::require_units("twn_exact_units (w, codes)", w, codes);
    const int64_t units = shape.first, len = shape.second;
    if ((int64_t)counts.size() != units || (int64_t)alpha.size() != units)
        throw std::invalid_argument("twn_exact_units: one count and one alpha per unit");
    if (len > kTwnMaxLen) throw std::invalid_argument("twn_exact_units: units longer than 256");
    const double* wp = w.data();
    const int64_t* np = counts.data();
    double* ap = alpha.data();
    int8_t* cp = codes.data();
    nb::gil_scoped_release release;
    lowbit::parallel_for(units, std::max(1, n_threads), 4096, [&](int64_t b, int64_t e) {
        const double* wb = wp;
        const int64_t* nb_ = np;
        double* ab = ap;
        int8_t* cb = cp;
        const int64_t L = len;
        double s[kTwnMaxLen + 1];
        for (int64_t u = b; u < e; ++u) {
            const double* wu = wb + u * L;
            int8_t* cu = cb + u * L;
            const int64_t cnt = std::min<int64_t>(std::max<int64_t>(nb_[u], 0), L);
            for (int64_t i = 0; i < L; ++i) s[i] = std::fabs(wu[i]);
            if (L == 4) {  // FGQ's N = 4: a branch-free sorting network
                auto cx = [&s](int i, int j) {
                    const double hi = std::max(s[i], s[j]), lo = std::min(s[i], s[j]);
                    s[i] = hi;
                    s[j] = lo;
                };
                cx(0, 1);
                cx(2, 3);
                cx(0, 2);
                cx(1, 3);
                cx(1, 2);
            } else if (L <= 32) {  // insertion sort, descending
                for (int64_t i = 1; i < L; ++i) {
                    const double x = s[i];
                    int64_t j = i;
                    for (; j > 0 && s[j - 1] < x; --j) s[j] = s[j - 1];
                    s[j] = x;
                }
            } else {
                std::sort(s, s + L, [](double x, double y) { return x > y; });
            }
            s[L] = -1.0;
            double cs = 0.0, best_score = -1.0, best_cs = 0.0, delta = -1.0;
            int64_t best = 0;
            for (int64_t k = 1; k <= L; ++k) {
                // selects, not branches: which k wins is a coin flip on random weights
                cs += s[k - 1];
                const bool last = k == cnt;
                const bool cand = (k <= cnt) & ((s[k - 1] > s[k]) | last);
                const double sq = cs * cs;
                const double score = cand ? sq / (double)k : -1.0;
                const bool better = score > best_score;
                best_score = better ? score : best_score;
                best = better ? k - 1 : best;
                best_cs = better ? cs : best_cs;
                const double next = last ? -1.0 : s[k];
                delta = better ? next : delta;
            }
            if (best_score < 0.0) {  // no candidate (count 0): the reference's argmax is k = 1
                best_cs = s[0];
                delta = L > 1 ? s[1] : -1.0;
            }
            const double a = best_cs / (double)(best + 1);
            ab[u] = a;
            for (int64_t i = 0; i < L; ++i) {
                const double x = wu[i];
                const bool keep = a > 0.0 && std::fabs(x) > delta;
                cu[i] = (int8_t)((int)keep * (1 - 2 * (int)(x < 0.0)));
            }
        }
    });
}

}  // namespace

void register_la_exact(nb::module_& m) {
    m.def("la_topk_exact", &la_topk_exact, "w"_a, "d"_a, "two_sided"_a, "codes"_a, "alpha"_a, "n_threads"_a = 1,
          "LAT_e / LAT2_e: the exact weighted ternary solution per unit (sorted search), bit-identical to "
          "loss_aware._topk_exact.");
    m.def("twn_exact_units", &twn_exact_units, "w"_a, "counts"_a, "alpha"_a, "codes"_a, "n_threads"_a = 1,
          "TWN's exact ternarization (d = 1) of float64 units of at most 256 entries, bit-identical to "
          "functional.twn(w, 'exact').");
}
