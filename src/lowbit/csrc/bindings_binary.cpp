// Python bindings and baseline drivers of the binary (XNOR-popcount) kernels; see binary.h.
//
// A layer call is: popcount GEMM (ISA table) into a small per-thread int32 tile, then an
// epilogue per output row that turns popcounts into the layer's output type:
//   d = K - 2 * popcount + corr[m % P, n]      (corr: exact zero-padding correction of convs)
//   int32:  d
//   float:  float(d) * scale[n] + bias[n]      (scale/bias fold a bias or a batch norm)
//   int8:   clamp(round_half_even(float(d) * scale[n] + bias[n]), -128, 127)
//   bits:   bit = flip[n] ? d > thr[n] : d < thr[n]   (bit 1 = -1: the next binary layer's input)
// The tile keeps the GEMM register-blocked over all of K while the epilogue stays O(outputs).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "binary.h"
#include "dispatch.h"
#include "threadpool.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

template <typename T>
using Dense = nb::ndarray<T, nb::ndim<2>, nb::device::cpu, nb::c_contig>;
template <typename T>
using Vector = nb::ndarray<T, nb::ndim<1>, nb::device::cpu, nb::c_contig>;
using Image = nb::ndarray<const uint8_t, nb::ndim<4>, nb::device::cpu, nb::c_contig>;
using ImageOut = nb::ndarray<uint8_t, nb::ndim<4>, nb::device::cpu, nb::c_contig>;

// The binary table of the ISA path lowbit::active() runs, so LOWBIT_ISA / use_isa() switch
// both kernel families together.
const lowbit_binary_table& binary_active() {
    const std::string name = lowbit::active().name;
    if (name == "avx512") return *lowbit_binary_avx512();
    if (name == "avx2") return *lowbit_binary_avx2();
    return *lowbit_binary_scalar();
}

enum Mode { kInt32 = 0, kFloat = 1, kInt8 = 2, kBits = 3 };

struct Job {
    const uint8_t* a;
    int64_t a_stride;
    const uint8_t* w;  // row-interleaved blocks of 8 rows (binary.h)
    int64_t words, k, m, n;
    const int32_t* corr = nullptr;
    int64_t corr_period = 0;
    const float* scale = nullptr;
    const float* bias = nullptr;
    const int32_t* thr = nullptr;
    const uint8_t* flip = nullptr;
    Mode mode = kInt32;
    const lowbit_binary_table* table = nullptr;  // resolved once per call
    void* out = nullptr;
    int64_t out_stride = 0;  // elements (bytes for kBits)
};

constexpr int64_t kTileN = 256;  // multiple of 64: bit outputs are written in whole words

// Every pointer is read into a __restrict local first: through `j` the compiler would have to
// reload them on each iteration (the output might alias the Job), and these loops would not
// vectorize (a 4096-wide float epilogue cost several microseconds that way).
void epilogue(const Job& j, int64_t m, int64_t n0, int64_t len, const int32_t* __restrict pop) {
    const int32_t* __restrict corr = j.corr ? j.corr + (m % j.corr_period) * j.n + n0 : nullptr;
    const int32_t k = (int32_t)j.k;
    switch (j.mode) {
        case kInt32: {
            int32_t* __restrict o = (int32_t*)j.out + m * j.out_stride + n0;
            if (corr)
                for (int64_t i = 0; i < len; ++i) o[i] = k - 2 * pop[i] + corr[i];
            else
                for (int64_t i = 0; i < len; ++i) o[i] = k - 2 * pop[i];
            break;
        }
        case kFloat:
        case kInt8: {
            const float* __restrict scale = j.scale ? j.scale + n0 : nullptr;
            const float* __restrict bias = j.bias ? j.bias + n0 : nullptr;
            float buf[kTileN];  // len <= kTileN: one row of a tile (run_block)
            for (int64_t i = 0; i < len; ++i) buf[i] = (float)(k - 2 * pop[i] + (corr ? corr[i] : 0));
            if (scale)
                for (int64_t i = 0; i < len; ++i) buf[i] *= scale[i];
            if (bias)
                for (int64_t i = 0; i < len; ++i) buf[i] += bias[i];
            if (j.mode == kFloat) {
                float* __restrict o = (float*)j.out + m * j.out_stride + n0;
                for (int64_t i = 0; i < len; ++i) o[i] = buf[i];
            } else {
                int8_t* __restrict o = (int8_t*)j.out + m * j.out_stride + n0;
                for (int64_t i = 0; i < len; ++i) {
                    const float v = std::nearbyint(buf[i]);
                    o[i] = (int8_t)std::min(127.0f, std::max(-128.0f, v));
                }
            }
            break;
        }
        case kBits: {
            // n0 is a multiple of 64 (tiles and thread chunks are), so whole words are written.
            uint8_t* o = (uint8_t*)j.out + m * j.out_stride + n0 / 8;
            j.table->bits_epilogue(pop, len, k, corr, j.thr + n0, j.flip + n0, o);
            break;
        }
    }
}

constexpr int64_t kTileM = 48;   // multiple of the AVX-512 microkernel's 6 tokens

void run_block(const lowbit_binary_table& t, const Job& j, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    // Per-thread popcount tile, reused across calls: a fresh zeroed 48 KiB vector per call cost
    // about a microsecond of a batch-1 layer (and its cache lines). The GEMM writes every entry
    // the epilogue reads, so it needs no initialisation.
    thread_local std::vector<int32_t> pop_buf;
    if (pop_buf.size() < (size_t)(kTileM * kTileN)) pop_buf.resize((size_t)(kTileM * kTileN));
    int32_t* const pop = pop_buf.data();  // one TLS lookup, not one per use
    for (int64_t nb = n0; nb < n1; nb += kTileN) {  // nb is a multiple of 64 (so of 8)
        const int64_t nl = std::min(kTileN, n1 - nb);
        const int64_t blocks = (nl + 7) / 8;  // the last block may hold padding rows
        for (int64_t mb = m0; mb < m1; mb += kTileM) {
            const int64_t ml = std::min(kTileM, m1 - mb);
            t.popcount_gemm(j.a + mb * j.a_stride, j.a_stride, j.w + (nb / 8) * j.words * 64, j.words, ml, blocks,
                            pop, 8 * blocks);
            for (int64_t i = 0; i < ml; ++i) epilogue(j, mb + i, nb, nl, pop + i * 8 * blocks);
        }
    }
}

void run(const Job& j, int n_threads) {
    const lowbit_binary_table& t = *j.table;
    // Below ~1M binary MACs a second thread costs more than it saves.
    if (j.m * j.n * 64 * j.words < ((int64_t)1 << 20)) n_threads = 1;
    // Big weight matrices are split by rows so each thread streams only its share (GEMV and
    // big GEMMs); small ones (convolutions: few filters, many pixels) are split by tokens.
    const bool split_n = j.n * j.words * 8 > (512 << 10) || j.m < 12;
    if (split_n)
        lowbit::parallel_for(j.n, n_threads, 64, [&](int64_t b, int64_t e) { run_block(t, j, 0, j.m, b, e); });
    else
        lowbit::parallel_for(j.m, n_threads, 6, [&](int64_t b, int64_t e) { run_block(t, j, b, e, 0, j.n); });
}

void binary_linear(Dense<const uint8_t> a, Dense<const uint8_t> w, int64_t n, int64_t k,
                   std::optional<Dense<const int32_t>> corr, std::optional<Vector<const float>> scale,
                   std::optional<Vector<const float>> bias, std::optional<Vector<const int32_t>> thr,
                   std::optional<Vector<const uint8_t>> flip, std::optional<Dense<int32_t>> out_i32,
                   std::optional<Dense<float>> out_f32, std::optional<Dense<int8_t>> out_i8,
                   std::optional<Dense<uint8_t>> out_bits, int n_threads) {
    Job j{};
    j.m = (int64_t)a.shape(0);
    j.n = n;
    const int64_t row_bytes = (int64_t)a.shape(1);
    if (row_bytes % 8) throw std::invalid_argument("packed rows must be whole 64-bit words (a multiple of 8 bytes)");
    j.words = row_bytes / 8;
    if (n < 0 || (int64_t)w.shape(0) != (n + 7) / 8 || (int64_t)w.shape(1) != 64 * j.words)
        throw std::invalid_argument("packed activations have " + std::to_string(row_bytes) + " bytes per row but the " +
                                    "packed weights do not fit: expected (ceil(N/8), 8 * row bytes) = (" +
                                    std::to_string((n + 7) / 8) + ", " + std::to_string(64 * j.words) + "), got (" +
                                    std::to_string(w.shape(0)) + ", " + std::to_string(w.shape(1)) + ")");
    if (k < 0 || k > 64 * j.words) throw std::invalid_argument("k does not fit the packed rows");
    j.k = k;
    j.a = a.data();
    j.a_stride = row_bytes;
    j.w = w.data();
    auto check_vec = [&](int64_t len, const char* name) {
        if (len != j.n) throw std::invalid_argument(std::string(name) + " must have one entry per output (" + std::to_string(j.n) + ")");
    };
    if (corr) {
        if ((int64_t)corr->shape(1) != j.n || corr->shape(0) == 0)
            throw std::invalid_argument("corr must be (P, N) int32 (row m % P corrects token m)");
        j.corr = corr->data();
        j.corr_period = (int64_t)corr->shape(0);
    }
    if (scale) { check_vec((int64_t)scale->shape(0), "scale"); j.scale = scale->data(); }
    if (bias) { check_vec((int64_t)bias->shape(0), "bias"); j.bias = bias->data(); }
    int outs = (out_i32 ? 1 : 0) + (out_f32 ? 1 : 0) + (out_i8 ? 1 : 0) + (out_bits ? 1 : 0);
    if (outs != 1) throw std::invalid_argument("give exactly one output array");
    auto check_out = [&](int64_t r, int64_t c, int64_t cols) {
        if (r != j.m || c != cols) throw std::invalid_argument("output has the wrong shape");
    };
    if (out_i32) { check_out((int64_t)out_i32->shape(0), (int64_t)out_i32->shape(1), j.n); j.mode = kInt32; j.out = out_i32->data(); j.out_stride = j.n; }
    if (out_f32) { check_out((int64_t)out_f32->shape(0), (int64_t)out_f32->shape(1), j.n); j.mode = kFloat; j.out = out_f32->data(); j.out_stride = j.n; }
    if (out_i8) { check_out((int64_t)out_i8->shape(0), (int64_t)out_i8->shape(1), j.n); j.mode = kInt8; j.out = out_i8->data(); j.out_stride = j.n; }
    if (out_bits) {
        const int64_t ob = 8 * ((j.n + 63) / 64);
        check_out((int64_t)out_bits->shape(0), (int64_t)out_bits->shape(1), ob);
        if (!thr || !flip) throw std::invalid_argument("bit outputs need thr and flip");
        check_vec((int64_t)thr->shape(0), "thr");
        check_vec((int64_t)flip->shape(0), "flip");
        j.thr = thr->data();
        j.flip = flip->data();
        j.mode = kBits;
        j.out = out_bits->data();
        j.out_stride = ob;
    }
    if (j.m == 0 || j.n == 0) return;
    j.table = &binary_active();
    nb::gil_scoped_release release;
    run(j, n_threads);
}

struct ConvGeom {
    int64_t b, h, w, cb, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow;
};

ConvGeom geom_of(int64_t b, int64_t h, int64_t w, int64_t cb, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                 int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
    ConvGeom g{b, h, w, cb, kh, kw, sh, sw, ph, pw, dh, dw, 0, 0};
    if (kh < 1 || kw < 1 || sh < 1 || sw < 1 || dh < 1 || dw < 1 || ph < 0 || pw < 0)
        throw std::invalid_argument("kernel, stride and dilation must be >= 1 and padding >= 0");
    g.oh = (g.h + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
    g.ow = (g.w + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
    if (g.oh < 1 || g.ow < 1) throw std::invalid_argument("the kernel does not fit the padded input");
    return g;
}

ConvGeom geom(const Image& x, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
              int64_t dw) {
    return geom_of((int64_t)x.shape(0), (int64_t)x.shape(1), (int64_t)x.shape(2), (int64_t)x.shape(3), kh, kw, sh, sw,
                   ph, pw, dh, dw);
}

// im2col on packed words: row (b, oy, ox) holds the kh*kw taps' channel words; taps in the
// padding are zero words (= +1 inputs; the exact zero-padding correction is added in the
// epilogue through `corr`). Call without the GIL.
void im2col_raw(const ConvGeom& g, const uint8_t* src, uint8_t* dst, int n_threads) {
    const int64_t kh = g.kh, kw = g.kw;
    lowbit::parallel_for(g.b * g.oh, n_threads, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const int64_t bi = r / g.oh, oy = r % g.oh;
            for (int64_t ox = 0; ox < g.ow; ++ox) {
                uint8_t* o = dst + ((r * g.ow) + ox) * kh * kw * g.cb;
                for (int64_t ky = 0; ky < kh; ++ky) {
                    const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
                    for (int64_t kx = 0; kx < kw; ++kx, o += g.cb) {
                        const int64_t ix = ox * g.sw - g.pw + kx * g.dw;
                        if (iy < 0 || iy >= g.h || ix < 0 || ix >= g.w) std::memset(o, 0, (size_t)g.cb);
                        else std::memcpy(o, src + ((bi * g.h + iy) * g.w + ix) * g.cb, (size_t)g.cb);
                    }
                }
            }
        }
    });
}

void binary_im2col(Image x, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                   int64_t dw, Dense<uint8_t> out, int n_threads) {
    const ConvGeom g = geom(x, kh, kw, sh, sw, ph, pw, dh, dw);
    if ((int64_t)out.shape(0) != g.b * g.oh * g.ow || (int64_t)out.shape(1) != kh * kw * g.cb)
        throw std::invalid_argument("im2col output must be (B*OH*OW, KH*KW*channel bytes)");
    const uint8_t* src = x.data();
    uint8_t* dst = out.data();
    nb::gil_scoped_release release;
    im2col_raw(g, src, dst, n_threads);
}

// A layer's constant operands (weights, epilogue vectors) checked and converted once, so a call
// converts only the activations and the output: a batch-1 layer takes ~25 us, and each
// NumPy -> ndarray argument conversion costs about a microsecond.
class LinearPlan {
   public:
    LinearPlan(Dense<const uint8_t> w, int64_t n, int64_t k, std::optional<Vector<const float>> scale,
               std::optional<Vector<const float>> bias, std::optional<Vector<const int32_t>> thr,
               std::optional<Vector<const uint8_t>> flip, int mode, bool float_input)
        : float_input_(float_input), w_(w), scale_(scale), bias_(bias), thr_(thr), flip_(flip) {
        if (mode < kInt32 || mode > kBits) throw std::invalid_argument("unknown output mode");
        const int64_t words = (int64_t)w.shape(1) / 64;
        if (n < 1 || (int64_t)w.shape(0) != (n + 7) / 8 || (int64_t)w.shape(1) % 64 || k < 0 || k > 64 * words)
            throw std::invalid_argument("packed weights must be (ceil(N/8), 64 * words) with K <= 64 * words");
        auto check = [&](int64_t len, const char* name) {
            if (len != n) throw std::invalid_argument(std::string(name) + " must have one entry per output");
        };
        if (scale) check((int64_t)scale->shape(0), "scale");
        if (bias) check((int64_t)bias->shape(0), "bias");
        if (mode == kBits) {
            if (!thr || !flip) throw std::invalid_argument("bit outputs need thr and flip");
            check((int64_t)thr->shape(0), "thr");
            check((int64_t)flip->shape(0), "flip");
        }
        job_.w = w.data();
        job_.words = words;
        job_.n = n;
        job_.k = k;
        job_.scale = scale ? scale->data() : nullptr;
        job_.bias = bias ? bias->data() : nullptr;
        job_.thr = thr ? thr->data() : nullptr;
        job_.flip = flip ? flip->data() : nullptr;
        job_.mode = (Mode)mode;
        job_.out_stride = mode == kBits ? 8 * ((n + 63) / 64) : n;
    }

    // Conv layers: the geometry forward_conv() uses (set once by the module).
    void set_conv(int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                  int64_t channel_bytes) {
        if (kh < 1 || kw < 1 || sh < 1 || sw < 1 || dh < 1 || dw < 1 || ph < 0 || pw < 0 || channel_bytes < 8 ||
            channel_bytes % 8 || kh * kw * channel_bytes != 8 * job_.words)
            throw std::invalid_argument("conv geometry does not match the packed weights");
        conv_ = {kh, kw, sh, sw, ph, pw, dh, dw, channel_bytes};
        is_conv_ = true;
    }

    // One whole layer call, for the eager hot path (a batch-1 layer runs in ~25 us, so the
    // Python around it matters): `x` is packed bits, uint8 (M, ...) whose trailing dimensions
    // hold the layer's row bytes, or, for a plan built with float_input, float32 (..., K)
    // binarized and packed here (lowbit's sign rule: the ISA packer of kernels.h). Returns a new NumPy array (M, N), or (M, packed
    // bytes of N) for bit outputs; float inputs (..., K) give (..., N) as nn.Linear does.
    // Arguments of another dtype raise TypeError (the caller
    // falls back to the general path); wrong shapes raise ValueError.
    nb::ndarray<nb::numpy> forward(nb::ndarray<nb::device::cpu, nb::c_contig> x,
                                   std::optional<Dense<const int32_t>> corr, int n_threads) const {
        Job j = job_;
        const bool is_float = x.dtype() == nb::dtype<float>();
        if (is_float != float_input_ || (!is_float && x.dtype() != nb::dtype<uint8_t>()))
            throw nb::type_error(float_input_ ? "this layer takes float32 inputs" : "this layer takes packed bits (uint8)");
        if (x.ndim() < 1 + (is_float ? 0 : 1)) throw std::invalid_argument("input has too few dimensions");
        int64_t m = 1, row = 1;
        if (is_float) {
            for (size_t d = 0; d + 1 < x.ndim(); ++d) m *= (int64_t)x.shape(d);
            row = (int64_t)x.shape(x.ndim() - 1);
            if (row != j.k || 8 * ((j.k + 63) / 64) != 8 * j.words)
                throw std::invalid_argument("float inputs must be (..., " + std::to_string(j.k) + ") for this layer");
        } else {
            m = (int64_t)x.shape(0);
            for (size_t d = 1; d < x.ndim(); ++d) row *= (int64_t)x.shape(d);
            if (row != 8 * j.words)
                throw std::invalid_argument("packed activations have " + std::to_string(row) +
                                            " bytes per row; the layer expects " + std::to_string(8 * j.words));
        }
        set_corr(j, corr);
        void* out = nullptr;
        // Float inputs (..., K) give (..., N) (as nn.Linear); packed bits (M, ...) give (M, cols).
        size_t shape[8];
        size_t ndim = 2;
        shape[0] = (size_t)m;
        if (is_float && x.ndim() != 2) {
            if (x.ndim() > 8) throw std::invalid_argument("float inputs may have at most 8 dimensions");
            ndim = x.ndim();
            for (size_t d = 0; d + 1 < ndim; ++d) shape[d] = (size_t)x.shape(d);
        }
        shape[ndim - 1] = (size_t)j.out_stride;
        auto result = new_output(j, ndim, shape, &out);
        j.m = m;
        j.out = out;
        j.a_stride = 8 * j.words;
        j.table = &binary_active();
        std::vector<uint8_t> packed;
        {
            nb::gil_scoped_release release;
            if (is_float) {
                packed.resize((size_t)(m * 8 * j.words));
                const float* src = (const float*)x.data();
                const lowbit_isa_table& t = lowbit::active();
                const int64_t k = j.k, rb = 8 * j.words;
                uint8_t* dst = packed.data();
                lowbit::parallel_for(m, m * k < (1 << 16) ? 1 : n_threads, 16, [&](int64_t b, int64_t e) {
                    t.pack_signs_f32(src + b * k, e - b, k, k, dst + b * rb, rb);
                });
                j.a = packed.data();
            } else {
                j.a = (const uint8_t*)x.data();
            }
            if (m > 0) run(j, n_threads);
        }
        return result;
    }

    // One whole conv layer: packed NHWC bits (B, H, W, channel bytes) -> im2col -> GEMM with the
    // zero-padding correction `corr` ((OH*OW, N) int32 or None) -> (B, OH, OW, N or packed bytes).
    nb::ndarray<nb::numpy> forward_conv(Image x, std::optional<Dense<const int32_t>> corr, int n_threads) const {
        if (!is_conv_) throw std::invalid_argument("not a conv plan (set_conv was not called)");
        const ConvGeom g = geom(x, conv_[0], conv_[1], conv_[2], conv_[3], conv_[4], conv_[5], conv_[6], conv_[7]);
        if (g.cb != conv_[8])
            throw std::invalid_argument("packed input has " + std::to_string(g.cb) + " bytes per pixel; the layer expects " +
                                        std::to_string(conv_[8]));
        Job j = job_;
        set_corr(j, corr);
        if (corr && (int64_t)corr->shape(0) != g.oh * g.ow)
            throw std::invalid_argument("corr must have one row per output pixel (OH*OW)");
        const int64_t m = g.b * g.oh * g.ow;
        void* out = nullptr;
        const size_t shape[4] = {(size_t)g.b, (size_t)g.oh, (size_t)g.ow, (size_t)j.out_stride};
        auto result = new_output(j, 4, shape, &out);
        j.m = m;
        j.out = out;
        j.a_stride = 8 * j.words;
        j.table = &binary_active();
        std::vector<uint8_t> cols((size_t)(m * 8 * j.words));
        const uint8_t* src = x.data();
        {
            nb::gil_scoped_release release;
            im2col_raw(g, src, cols.data(), n_threads);
            j.a = cols.data();
            if (m > 0) run(j, n_threads);
        }
        return result;
    }

    void call(Dense<const uint8_t> a, std::optional<Dense<const int32_t>> corr,
              nb::ndarray<nb::device::cpu, nb::c_contig> out, int n_threads) const {
        Job j = job_;
        j.m = (int64_t)a.shape(0);
        if ((int64_t)a.shape(1) != 8 * j.words)
            throw std::invalid_argument("packed activations have " + std::to_string(a.shape(1)) +
                                        " bytes per row; the layer expects " + std::to_string(8 * j.words));
        j.a = a.data();
        j.a_stride = 8 * j.words;
        if (corr) {
            if ((int64_t)corr->shape(1) != j.n || corr->shape(0) == 0)
                throw std::invalid_argument("corr must be (P, N) int32");
            j.corr = corr->data();
            j.corr_period = (int64_t)corr->shape(0);
        }
        const nb::dlpack::dtype want[] = {nb::dtype<int32_t>(), nb::dtype<float>(), nb::dtype<int8_t>(),
                                          nb::dtype<uint8_t>()};
        if (out.ndim() != 2 || (int64_t)out.shape(0) != j.m || (int64_t)out.shape(1) != j.out_stride ||
            out.dtype() != want[j.mode])
            throw std::invalid_argument("output array has the wrong shape or dtype for this layer");
        j.out = out.data();
        if (j.m == 0) return;
        j.table = &binary_active();
        nb::gil_scoped_release release;
        run(j, n_threads);
    }

   private:
    static void set_corr(Job& j, const std::optional<Dense<const int32_t>>& corr) {
        if (!corr) return;
        if ((int64_t)corr->shape(1) != j.n || corr->shape(0) == 0)
            throw std::invalid_argument("corr must be (P, N) int32");
        j.corr = corr->data();
        j.corr_period = (int64_t)corr->shape(0);
    }

    // A new 64-byte aligned NumPy array of the layer's output dtype, owned by a capsule.
    static nb::ndarray<nb::numpy> new_output(const Job& j, size_t ndim, const size_t* shape, void** data) {
        static const nb::dlpack::dtype kinds[] = {nb::dtype<int32_t>(), nb::dtype<float>(), nb::dtype<int8_t>(),
                                                  nb::dtype<uint8_t>()};
        size_t count = 1;
        for (size_t d = 0; d < ndim; ++d) count *= shape[d];
        const size_t item = (j.mode == kInt32 || j.mode == kFloat) ? 4 : 1;
        const size_t bytes = std::max<size_t>(64, (count * item + 63) / 64 * 64);
        void* p = std::aligned_alloc(64, bytes);
        if (!p) throw std::bad_alloc();
        nb::capsule owner(p, [](void* q) noexcept { std::free(q); });
        *data = p;
        return nb::ndarray<nb::numpy>(p, ndim, shape, owner, nullptr, kinds[j.mode]);
    }

    std::array<int64_t, 9> conv_{};
    bool is_conv_ = false;
    bool float_input_ = false;
    Dense<const uint8_t> w_;  // held so the buffers outlive the plan's raw pointers
    std::optional<Vector<const float>> scale_, bias_;
    std::optional<Vector<const int32_t>> thr_;
    std::optional<Vector<const uint8_t>> flip_;
    Job job_{};
};

// An integer-input layer over bit-planes (QNN §2.5; lowbit.binary.PackedBitplaneLinear): codes
// q (M, K), uint8 or int8 (two's complement, `bits` low bits used), against packed ±1 weights.
// Plane p of token m becomes packed row m * bits + p with sign bit 1 where the plane bit is 0
// (s_p = 2 x_p - 1), one popcount GEMM gives d = s_p . w, and x_p . w = (d + sum(w)) / 2, so
// s = sum_p c_p (d + wsum) / 2 with c_p = 2^p (-2^(bits-1) for the top plane of signed codes) is
// the exact integer q . w. Output: float(s) * scale[n] + bias[n] (fp32), shape (M, N).
nb::ndarray<nb::numpy, float, nb::ndim<2>> bitplane_linear(nb::ndarray<nb::ndim<2>, nb::device::cpu, nb::c_contig> q,
                                                          int bits, Dense<const uint8_t> w, int64_t n, int64_t k,
                                                          Vector<const int32_t> wsum, Vector<const float> scale,
                                                          std::optional<Vector<const float>> bias, int n_threads) {
    const bool is_signed = q.dtype() == nb::dtype<int8_t>();
    if (!is_signed && q.dtype() != nb::dtype<uint8_t>()) throw nb::type_error("codes must be uint8 or int8");
    if (bits < 1 || bits > 8) throw std::invalid_argument("bits must be 1..8");
    const int64_t m = (int64_t)q.shape(0), words = (k + 63) / 64;
    if ((int64_t)q.shape(1) != k || k < 1) throw std::invalid_argument("codes must be (M, K)");
    if (n < 1 || (int64_t)w.shape(0) != (n + 7) / 8 || (int64_t)w.shape(1) != 64 * words)
        throw std::invalid_argument("packed weights must be (ceil(N/8), 64 * ceil(K/64))");
    if ((int64_t)wsum.shape(0) != n || (int64_t)scale.shape(0) != n || (bias && (int64_t)bias->shape(0) != n))
        throw std::invalid_argument("wsum, scale and bias must have one entry per output");
    if (k > ((int64_t)1 << 31) / 256) throw std::invalid_argument("K too large for int32 bit-plane sums");
    float* out = new float[(size_t)std::max<int64_t>(1, m * n)];
    nb::capsule owner(out, [](void* p) noexcept { delete[] (float*)p; });
    nb::ndarray<nb::numpy, float, nb::ndim<2>> result(out, {(size_t)m, (size_t)n}, owner);
    if (m == 0) return result;
    const uint8_t* src = (const uint8_t*)q.data();
    const int32_t* ws = wsum.data();
    const float* sc = scale.data();
    const float* bi = bias ? bias->data() : nullptr;
    Job j{};
    j.a_stride = 8 * words;
    j.w = w.data();
    j.words = words;
    j.k = k;
    j.n = n;
    j.mode = kInt32;
    j.out_stride = n;
    j.table = &binary_active();
    nb::gil_scoped_release release;
    // Tokens in chunks of 32 per thread: planes -> GEMM -> exact combination, with per-thread
    // buffers reused across calls (fresh multi-MiB buffers cost page faults on every call).
    constexpr int64_t kChunk = 32;
    lowbit::parallel_for(m, n_threads, kChunk, [&](int64_t r0, int64_t r1) {
        thread_local std::vector<uint8_t> planes_buf;
        thread_local std::vector<int32_t> dots_buf;
        thread_local std::vector<int32_t> acc_buf;
        const int64_t row_bytes = 8 * words;
        planes_buf.resize((size_t)(kChunk * bits * row_bytes));
        dots_buf.resize((size_t)(kChunk * bits * n));
        acc_buf.resize((size_t)n);
        // Plain pointers: every access to a thread_local in a shared object may go through
        // __tls_get_addr, which in these loops cost more than the arithmetic.
        uint8_t* const planes = planes_buf.data();
        int32_t* const dots = dots_buf.data();
        int32_t* __restrict const acc = acc_buf.data();
        // Locals, not lambda captures (references the compiler must reload every iteration, as
        // acc might alias them), so the loops below vectorize.
        const int32_t* __restrict const wsum_l = ws;
        const float* __restrict const scale_l = sc;
        const float* __restrict const bias_l = bi;
        const int64_t n_l = n;
        const int bits_l = bits;
        const bool signed_l = is_signed;
        for (int64_t t0 = r0; t0 < r1; t0 += kChunk) {
            const int64_t t1 = std::min(r1, t0 + kChunk), rows = (t1 - t0) * bits;
            // Planes: 8 codes at a time as one little-endian uint64 x (byte i = code i) and an 8x8
            // bit-matrix transpose (Hacker's Delight 7-3): afterwards bit i of byte p is bit p of
            // code i, i.e. byte p is plane p of these 8 codes. Token t's plane p is GEMM row
            // (t - t0) * bits + p; its sign bit is 1 (-1) where the plane bit is 0.
            std::memset(planes, 0, (size_t)(rows * row_bytes));
            for (int64_t t = t0; t < t1; ++t) {
                const uint8_t* row = src + t * k;
                uint8_t* dst = planes + (t - t0) * bits * row_bytes;
                for (int64_t c = 0; c < k; c += 8) {
                    const int valid = (int)std::min<int64_t>(8, k - c);
                    uint64_t x = 0;
                    if (valid == 8) {
                        std::memcpy(&x, row + c, 8);
                    } else {
                        uint8_t chunk[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                        std::memcpy(chunk, row + c, (size_t)valid);
                        std::memcpy(&x, chunk, 8);
                    }
                    uint64_t u = (x ^ (x >> 7)) & 0x00AA00AA00AA00AAULL;
                    x = x ^ u ^ (u << 7);
                    u = (x ^ (x >> 14)) & 0x0000CCCC0000CCCCULL;
                    x = x ^ u ^ (u << 14);
                    u = (x ^ (x >> 28)) & 0x00000000F0F0F0F0ULL;
                    x = x ^ u ^ (u << 28);
                    const uint8_t keep = (uint8_t)((1u << valid) - 1u);  // padding bits stay 0
                    for (int p = 0; p < bits; ++p) dst[p * row_bytes + c / 8] = (uint8_t)(~(x >> (8 * p)) & keep);
                }
            }
            Job jj = j;
            jj.a = planes;
            jj.m = rows;
            jj.out = dots;
            run_block(*jj.table, jj, 0, rows, 0, n);
            for (int64_t t = t0; t < t1; ++t) {
                // int32 is exact: |s| <= (2^bits - 1) * K < 2^31 (checked above). Shifts, not
                // multiplies, so the baseline (SSE2) build vectorizes it.
                std::fill(acc, acc + n_l, 0);
                for (int p = 0; p < bits_l; ++p) {
                    const int32_t* __restrict d = dots + ((t - t0) * bits_l + p) * n_l;
                    if (signed_l && p == bits_l - 1)
                        for (int64_t c = 0; c < n_l; ++c) acc[c] -= ((d[c] + wsum_l[c]) >> 1) << p;  // even: exact
                    else
                        for (int64_t c = 0; c < n_l; ++c) acc[c] += ((d[c] + wsum_l[c]) >> 1) << p;
                }
                float* __restrict o = out + t * n_l;
                if (bias_l)
                    for (int64_t c = 0; c < n_l; ++c) o[c] = (float)acc[c] * scale_l[c] + bias_l[c];
                else
                    for (int64_t c = 0; c < n_l; ++c) o[c] = (float)acc[c] * scale_l[c];
            }
        }
    });
    return result;
}

// Max-pool of ±1 maps on packed bits (bit 1 = -1): max(±1) is +1 when any input is +1, i.e. the
// AND of the sign bits. Channels whose bit in or_mask is 1 take the OR instead (min-pool: the
// layer before had a decreasing threshold, see lowbit.binary). Out-of-bounds taps are skipped
// (max-pool padding is -inf).
void binary_maxpool(Image x, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                    Vector<const uint8_t> or_mask, ImageOut out, int n_threads) {
    const ConvGeom g = geom(x, kh, kw, sh, sw, ph, pw, 1, 1);
    if ((int64_t)or_mask.shape(0) != g.cb) throw std::invalid_argument("or_mask must have one byte per channel byte");
    if ((int64_t)out.shape(0) != g.b || (int64_t)out.shape(1) != g.oh || (int64_t)out.shape(2) != g.ow ||
        (int64_t)out.shape(3) != g.cb)
        throw std::invalid_argument("max-pool output must be (B, OH, OW, channel bytes)");
    const uint8_t* src = x.data();
    const uint8_t* mask = or_mask.data();
    uint8_t* dst = out.data();
    nb::gil_scoped_release release;
    lowbit::parallel_for(g.b * g.oh, n_threads, 1, [&](int64_t r0, int64_t r1) {
        std::vector<uint8_t> a((size_t)g.cb), o((size_t)g.cb);
        for (int64_t r = r0; r < r1; ++r) {
            const int64_t bi = r / g.oh, oy = r % g.oh;
            for (int64_t ox = 0; ox < g.ow; ++ox) {
                std::fill(a.begin(), a.end(), (uint8_t)0xFF);
                std::fill(o.begin(), o.end(), (uint8_t)0);
                for (int64_t ky = 0; ky < kh; ++ky) {
                    const int64_t iy = oy * sh - ph + ky;
                    if (iy < 0 || iy >= g.h) continue;
                    for (int64_t kx = 0; kx < kw; ++kx) {
                        const int64_t ix = ox * sw - pw + kx;
                        if (ix < 0 || ix >= g.w) continue;
                        const uint8_t* p = src + ((bi * g.h + iy) * g.w + ix) * g.cb;
                        for (int64_t c = 0; c < g.cb; ++c) {
                            a[(size_t)c] &= p[c];
                            o[(size_t)c] |= p[c];
                        }
                    }
                }
                uint8_t* d = dst + ((r * g.ow) + ox) * g.cb;
                for (int64_t c = 0; c < g.cb; ++c)
                    d[c] = (uint8_t)((a[(size_t)c] & ~mask[c]) | (o[(size_t)c] & mask[c]));
            }
        }
    });
}

}  // namespace

void register_binary(nb::module_& m) {
    m.def("binary_active", [] { return std::string(binary_active().name); });
    m.def("binary_linear", &binary_linear, "a"_a, "w"_a, "n"_a, "k"_a, "corr"_a.none(), "scale"_a.none(), "bias"_a.none(),
          "thr"_a.none(), "flip"_a.none(), "out_i32"_a.none(), "out_f32"_a.none(), "out_i8"_a.none(),
          "out_bits"_a.none(), "n_threads"_a = 1);
    nb::class_<LinearPlan>(m, "BinaryLinearPlan")
        .def(nb::init<Dense<const uint8_t>, int64_t, int64_t, std::optional<Vector<const float>>,
                      std::optional<Vector<const float>>, std::optional<Vector<const int32_t>>,
                      std::optional<Vector<const uint8_t>>, int, bool>(),
             "w"_a, "n"_a, "k"_a, "scale"_a.none(), "bias"_a.none(), "thr"_a.none(), "flip"_a.none(), "mode"_a,
             "float_input"_a = false)
        .def("__call__", &LinearPlan::call, "a"_a, "corr"_a.none(), "out"_a, "n_threads"_a = 1)
        .def("forward", &LinearPlan::forward, "x"_a, "corr"_a.none(), "n_threads"_a = 1)
        .def("forward_conv", &LinearPlan::forward_conv, "x"_a, "corr"_a.none(), "n_threads"_a = 1)
        .def("set_conv", &LinearPlan::set_conv, "kh"_a, "kw"_a, "sh"_a, "sw"_a, "ph"_a, "pw"_a, "dh"_a, "dw"_a,
             "channel_bytes"_a);
    m.def("binary_bitplane_linear", &bitplane_linear, "q"_a, "bits"_a, "w"_a, "n"_a, "k"_a, "wsum"_a, "scale"_a,
          "bias"_a.none(), "n_threads"_a = 1);
    m.def("binary_im2col", &binary_im2col, "x"_a, "kh"_a, "kw"_a, "sh"_a, "sw"_a, "ph"_a, "pw"_a, "dh"_a, "dw"_a,
          "out"_a, "n_threads"_a = 1);
    m.def("binary_maxpool", &binary_maxpool, "x"_a, "kh"_a, "kw"_a, "sh"_a, "sw"_a, "ph"_a, "pw"_a, "or_mask"_a,
          "out"_a, "n_threads"_a = 1);
}
