// TTQ's ternary weight and its gradients (lowbit/methods/ttq.py, TTQFunction; TTQ paper
// eqs. 1-3) for one scale pair per tensor, in one pass each way instead of PyTorch's many
// (masks, casts, products, sums). The values are those of the PyTorch expressions, bit for bit:
//   forward  code = w > delta ? 1 : (w < -delta ? -1 : 0)  (NaN: 0),
//            w_t  = Wp * [code > 0] - Wn * [code < 0]      = Wp, 0 - Wn or 0,
//   backward dL/dw = g * (Wp [code > 0] + Wn [code < 0] + [code == 0]),
//            dL/dWp = sum g [code > 0], dL/dWn = -sum g [code < 0].
// The two sums are accumulated in double per fixed 64K-element chunk and the chunk sums added in
// chunk order, so they do not depend on the thread count (PyTorch's float32 dot products round
// differently; the sums agree to float32 rounding).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

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
using CodesIn = lowbit::In<int8_t>;
using CodesOut = lowbit::Out<int8_t>;

constexpr int64_t kChunk = 1 << 16;

// Selections by bit masks, not `?:` (which compiles to branches that mispredict on random signs).
using lowbit::bits_of;
using lowbit::float_of;

void forward(FloatIn w, float wp, float wn, float delta, CodesOut codes, FloatOut out, int n_threads) {
    const int64_t n = (int64_t)w.size();
    lowbit::require_sizes("ttq ops", n, {(int64_t)codes.size(), (int64_t)out.size()});
    const float* x = w.data();
    int8_t* c = codes.data();
    float* y = out.data();
    const uint32_t bp = bits_of(wp), bn = bits_of(0.0f - wn);
    const float minus_delta = -delta;
    nb::gil_scoped_release release;
    lowbit::parallel_for(n, n >= (1 << 18) ? n_threads : 1, kChunk, [&](int64_t b, int64_t e) {
        // Locals, not the lambda's by-reference captures: a store through y could otherwise alias
        // the captured pointers and constants, which must then be reloaded (10x slower loops).
        const float* xs = x + b;
        float* ys = y + b;
        int8_t* cs = c + b;
        const int64_t m = e - b;
        const float hi = delta, lo = minus_delta;
        const uint32_t p_bits = bp, n_bits = bn;
        for (int64_t i = 0; i < m; ++i) {
            const uint32_t mp = 0u - (uint32_t)(xs[i] > hi), mn = 0u - (uint32_t)(xs[i] < lo);
            ys[i] = float_of((p_bits & mp) | (n_bits & mn));
        }
        for (int64_t i = 0; i < m; ++i) cs[i] = (int8_t)((int)(xs[i] > hi) - (int)(xs[i] < lo));
    });
}

nb::tuple backward(FloatIn grad, CodesIn codes, float wp, float wn, FloatOut gw, int n_threads) {
    const int64_t n = (int64_t)grad.size();
    lowbit::require_sizes("ttq ops", n, {(int64_t)codes.size(), (int64_t)gw.size()});
    const float* g = grad.data();
    const int8_t* c = codes.data();
    float* o = gw.data();
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    const uint32_t bp = bits_of(wp), bn = bits_of(wn), one = bits_of(1.0f);
    std::vector<double> sp((size_t)chunks, 0.0), sn((size_t)chunks, 0.0);
    {
        nb::gil_scoped_release release;
        lowbit::parallel_for(chunks, n >= (1 << 18) ? n_threads : 1, 1, [&](int64_t b, int64_t e) {
            for (int64_t k = b; k < e; ++k) {
                const int64_t i0 = k * kChunk, m = std::min(n, i0 + kChunk) - i0;
                const float* gs = g + i0;  // locals: see forward
                const int8_t* cs = c + i0;
                float* os = o + i0;
                const uint32_t p_bits = bp, n_bits = bn, one_bits = one;
                double p = 0.0, q = 0.0;
#pragma omp simd reduction(+ : p, q)
                for (int64_t i = 0; i < m; ++i) {
                    const uint32_t mp = 0u - (uint32_t)(cs[i] > 0), mn = 0u - (uint32_t)(cs[i] < 0);
                    const uint32_t factor = (p_bits & mp) | (n_bits & mn) | (one_bits & ~(mp | mn));
                    os[i] = gs[i] * float_of(factor);
                    p += (double)float_of(bits_of(gs[i]) & mp);
                    q += (double)float_of(bits_of(gs[i]) & mn);
                }
                sp[(size_t)k] = p;
                sn[(size_t)k] = q;
            }
        });
    }
    double p = 0.0, q = 0.0;
    for (int64_t k = 0; k < chunks; ++k) {
        p += sp[(size_t)k];
        q += sn[(size_t)k];
    }
    return nb::make_tuple((float)p, (float)(-q));
}

}  // namespace

void register_ttq(nb::module_& m) {
    m.def("ttq_forward", &forward, "w"_a, "wp"_a, "wn"_a, "delta"_a, "codes"_a, "out"_a, "n_threads"_a = 1,
          "TTQ ternary weight of w (one scale pair per tensor): int8 codes and Wp/0/-Wn, one pass.");
    m.def("ttq_backward", &backward, "grad"_a, "codes"_a, "wp"_a, "wn"_a, "gw"_a, "n_threads"_a = 1,
          "TTQ gradients: writes dL/dw into gw, returns (dL/dWp, dL/dWn), one pass.");
}
