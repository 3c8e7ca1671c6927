// BNN's sign and its gated straight-through gradient (lowbit.functional.sign / binarize; BNN
// eqs. 1, 4-5) in one pass each, for contiguous CPU float32 tensors:
//   sign_pm1   out = x < 0 ? -1 : +1            (sign(0) = sign(-0.0) = +1, NaN -> +1)
//   sign_gate  the same and gate = |x| <= 1      (uint8; 0 for NaN and inf)
//   gate_grad  out = g * gate                    (the gradient of Htanh, BNN eq. 4)
//   kbit_fake  QNN's uniform k-bit activations and their saturation gate (below)
// The values are those of the PyTorch expressions (products of +-1 and 0/1 are exact). Loops run
// over local pointers, not the lambda's by-reference captures (see ttq_ops.cpp).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>

#include "nb_arrays.h"
#include "threadpool.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using FloatIn = lowbit::In<float>;
using FloatOut = lowbit::Out<float>;
using GateIn = lowbit::In<uint8_t>;
using GateOut = lowbit::Out<uint8_t>;

constexpr int64_t kGrain = 1 << 16;

int threads_for(int64_t n, int n_threads) { return n >= (1 << 18) ? n_threads : 1; }

void sign_pm1(FloatIn x, FloatOut out, int n_threads) {
    const int64_t n = (int64_t)x.size();
    lowbit::require_sizes("sign ops", n, {(int64_t)out.size()});
    const float* xp = x.data();
    float* op = out.data();
    nb::gil_scoped_release release;
    lowbit::parallel_for(n, threads_for(n, n_threads), kGrain, [&](int64_t b, int64_t e) {
        const float* xs = xp + b;
        float* os = op + b;
        const int64_t m = e - b;
        for (int64_t i = 0; i < m; ++i) os[i] = 1.0f - 2.0f * (float)(xs[i] < 0.0f);
    });
}

void sign_gate(FloatIn x, FloatOut out, GateOut gate, int n_threads) {
    const int64_t n = (int64_t)x.size();
    lowbit::require_sizes("sign ops", n, {(int64_t)out.size(), (int64_t)gate.size()});
    const float* xp = x.data();
    float* op = out.data();
    uint8_t* gp = gate.data();
    nb::gil_scoped_release release;
    lowbit::parallel_for(n, threads_for(n, n_threads), kGrain, [&](int64_t b, int64_t e) {
        const float* xs = xp + b;
        float* os = op + b;
        uint8_t* gs = gp + b;
        const int64_t m = e - b;
        for (int64_t i = 0; i < m; ++i) os[i] = 1.0f - 2.0f * (float)(xs[i] < 0.0f);
        for (int64_t i = 0; i < m; ++i) gs[i] = (uint8_t)(std::fabs(xs[i]) <= 1.0f);
    });
}

void gate_grad(FloatIn g, GateIn gate, FloatOut out, int n_threads) {
    const int64_t n = (int64_t)g.size();
    lowbit::require_sizes("sign ops", n, {(int64_t)gate.size(), (int64_t)out.size()});
    const float* gp = g.data();
    const uint8_t* mp = gate.data();
    float* op = out.data();
    nb::gil_scoped_release release;
    lowbit::parallel_for(n, threads_for(n, n_threads), kGrain, [&](int64_t b, int64_t e) {
        const float* gs = gp + b;
        const uint8_t* ms = mp + b;
        float* os = op + b;
        const int64_t m = e - b;
        for (int64_t i = 0; i < m; ++i) os[i] = gs[i] * (float)ms[i];
    });
}

// QNN's uniform k-bit fake quantization (lowbit.functional.linear_fake_quantize): out =
// clamp(round_half_even(x / step), lo, hi) * step and gate = lo_x <= x <= hi_x, with the float32
// step and bounds PyTorch uses. The rounding is the 1.5 * 2^23 trick after a clamp to
// [lo - 1, hi + 1] (monotone, so the same as rounding first); NaN stays NaN, +-inf saturates.
void kbit_fake(FloatIn x, float step, float lo, float hi, float lo_x, float hi_x, FloatOut out, GateOut gate,
               int n_threads) {
    const int64_t n = (int64_t)x.size();
    lowbit::require_sizes("sign ops", n, {(int64_t)out.size(), (int64_t)gate.size()});
    if (!(hi < 4194304.0f) || !(lo > -4194304.0f)) throw std::invalid_argument("k-bit range too large");
    const float* xp = x.data();
    float* op = out.data();
    uint8_t* gp = gate.data();
    nb::gil_scoped_release release;
    lowbit::parallel_for(n, threads_for(n, n_threads), kGrain, [&](int64_t b, int64_t e) {
        const float* xs = xp + b;
        float* os = op + b;
        uint8_t* gs = gp + b;
        const int64_t m = e - b;
        const float st = step, l = lo, h = hi, lx = lo_x, hx = hi_x, magic = 12582912.0f;
        for (int64_t i = 0; i < m; ++i) {
            float y = xs[i] / st;
            y = std::min(std::max(y, l - 1.0f), h + 1.0f);
            y = (y + magic) - magic;
            os[i] = std::min(std::max(y, l), h) * st;
        }
        for (int64_t i = 0; i < m; ++i) gs[i] = (uint8_t)((xs[i] >= lx) & (xs[i] <= hx));
    });
}

}  // namespace

void register_sign(nb::module_& m) {
    m.def("kbit_fake", &kbit_fake, "x"_a, "step"_a, "lo"_a, "hi"_a, "lo_x"_a, "hi_x"_a, "out"_a, "gate"_a,
          "n_threads"_a = 1, "k-bit uniform fake quantization and its saturation gate, one pass.");
    m.def("sign_pm1", &sign_pm1, "x"_a, "out"_a, "n_threads"_a = 1, "+-1 with sign(0) = +1 and NaN -> +1, one pass.");
    m.def("sign_gate", &sign_gate, "x"_a, "out"_a, "gate"_a, "n_threads"_a = 1,
          "sign_pm1 and the straight-through gate |x| <= 1 (uint8), one pass.");
    m.def("gate_grad", &gate_grad, "g"_a, "gate"_a, "out"_a, "n_threads"_a = 1, "g * gate, one pass.");
}
