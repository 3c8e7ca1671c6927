// Python bindings for lowbit._kernels (nanobind; no libtorch). Arrays cross as zero-copy
// NumPy / DLPack views; outputs are allocated by the caller (lowbit/kernels.py) and every
// kernel runs with the GIL released.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.h"
#include "ternary.h"
#include "threadpool.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

template <typename T>
using Matrix = nb::ndarray<T, nb::ndim<2>, nb::device::cpu>;

template <typename T>
using Vector = nb::ndarray<T, nb::ndim<1>, nb::device::cpu, nb::c_contig>;
template <typename T>
using Dense = nb::ndarray<T, nb::ndim<2>, nb::device::cpu, nb::c_contig>;
using Tiles = nb::ndarray<const uint8_t, nb::ndim<3>, nb::device::cpu, nb::c_contig>;

template <typename A>
void require_row_contiguous(const A& x, const char* name) {
    if (x.shape(1) > 1 && x.stride(1) != 1)
        throw std::invalid_argument(std::string(name) + " must have unit stride along its last dimension");
}

void pack_signs_f32(Matrix<const float> src, Matrix<uint8_t> dst, int n_threads) {
    require_row_contiguous(src, "src");
    require_row_contiguous(dst, "dst");
    const int64_t rows = (int64_t)src.shape(0), k = (int64_t)src.shape(1);
    const int64_t row_bytes = (int64_t)dst.shape(1);
    if ((int64_t)dst.shape(0) != rows)
        throw std::invalid_argument("dst must have as many rows as src");
    if (row_bytes < 8 * ((k + 63) / 64) || row_bytes % 8 != 0)
        throw std::invalid_argument("dst rows must hold 8 * ceil(K / 64) bytes");
    const float* s = src.data();
    uint8_t* d = dst.data();
    const int64_t ss = rows > 1 ? (int64_t)src.stride(0) : k, ds = rows > 1 ? (int64_t)dst.stride(0) : row_bytes;
    const lowbit_isa_table& t = lowbit::active();
    nb::gil_scoped_release release;
    lowbit::parallel_for(rows, n_threads, 16, [&](int64_t b, int64_t e) {
        t.pack_signs_f32(s + b * ss, e - b, k, ss, d + b * ds, ds);
    });
}

void binary_gemm(Matrix<const uint8_t> a, Matrix<const uint8_t> w, int64_t k, Matrix<int32_t> out,
                 int n_threads) {
    require_row_contiguous(a, "a");
    require_row_contiguous(w, "w");
    require_row_contiguous(out, "out");
    const int64_t m = (int64_t)a.shape(0), n = (int64_t)w.shape(0);
    const int64_t row_bytes = (int64_t)a.shape(1);
    if ((int64_t)w.shape(1) != row_bytes)
        throw std::invalid_argument("a and w must have the same number of packed bytes per row");
    if (row_bytes % 8 != 0) throw std::invalid_argument("packed rows must be a multiple of 8 bytes");
    const int64_t words = row_bytes / 8;
    if (k < 0 || k > 64 * words) throw std::invalid_argument("k does not fit the packed rows");
    if ((int64_t)out.shape(0) != m || (int64_t)out.shape(1) != n)
        throw std::invalid_argument("out must have shape (a.rows, w.rows)");
    const int64_t as = m > 1 ? (int64_t)a.stride(0) : row_bytes;
    const int64_t ws = n > 1 ? (int64_t)w.stride(0) : row_bytes;
    const int64_t os = m > 1 ? (int64_t)out.stride(0) : n;
    const uint8_t* ap = a.data();
    const uint8_t* wp = w.data();
    int32_t* op = out.data();
    const lowbit_isa_table& t = lowbit::active();
    // Below ~1M binary MACs a second thread costs more than it saves.
    if (m * n * 64 * words < (int64_t)1 << 20) n_threads = 1;
    nb::gil_scoped_release release;
    lowbit::parallel_for(n, n_threads, 16, [&](int64_t b, int64_t e) {
        t.binary_gemm(ap, as, wp, ws, m, b, e, words, k, op, os);
    });
}

// ---- ternary -----------------------------------------------------------------------------

int64_t row_stride(int64_t rows, int64_t stride, int64_t cols) { return rows > 1 ? stride : cols; }

void check_bits(int bits) {
    if (bits != 2 && bits != 4) throw std::invalid_argument("bits must be 2 (ternary) or 4 (int4)");
}

// k covered by one 64-byte tile: 16 for ternary (2-bit), 8 for int4.
int64_t tile_k(int bits) { return bits == 4 ? 8 : 16; }

void pack_tiles(Matrix<const int8_t> codes, nb::ndarray<uint8_t, nb::ndim<3>, nb::device::cpu, nb::c_contig> dst,
                int bits) {
    check_bits(bits);
    require_row_contiguous(codes, "codes");
    const int64_t n = (int64_t)codes.shape(0), k = (int64_t)codes.shape(1);
    if ((int64_t)dst.shape(0) != lowbit::ternary_row_blocks(n) ||
        (int64_t)dst.shape(1) != lowbit::ternary_kp(k) / tile_k(bits) || dst.shape(2) != 64)
        throw std::invalid_argument("dst must have shape (ceil(N/16), ceil(K/16) * 16 / tile_k, 64)");
    const int8_t* c = codes.data();
    uint8_t* d = dst.data();
    const int64_t stride = row_stride(n, (int64_t)codes.stride(0), k);
    nb::gil_scoped_release release;
    if (bits == 4) lowbit::int4_pack(c, n, k, stride, d);
    else lowbit::ternary_pack(c, n, k, stride, d);
}

void check_tiles(const Tiles& w, int64_t n, int64_t k, int bits) {
    check_bits(bits);
    if (n < 1) throw std::invalid_argument("out_features must be >= 1");
    if ((int64_t)w.shape(0) != lowbit::ternary_row_blocks(n) ||
        (int64_t)w.shape(1) != lowbit::ternary_kp(k) / tile_k(bits) || w.shape(2) != 64)
        throw std::invalid_argument("packed " + std::to_string(bits) + "-bit weights of shape (" +
                                    std::to_string(w.shape(0)) + ", " + std::to_string(w.shape(1)) + ", " +
                                    std::to_string(w.shape(2)) + ") do not fit out_features=" + std::to_string(n) +
                                    ", in_features=" + std::to_string(k) + " (expected (ceil(N/16), " +
                                    std::to_string(lowbit::ternary_kp(k) / tile_k(bits)) + ", 64))");
}

void unpack_tiles(Tiles src, int64_t n, int64_t k, Dense<int8_t> out, int bits) {
    check_tiles(src, n, k, bits);
    if ((int64_t)out.shape(0) != n || (int64_t)out.shape(1) != k) throw std::invalid_argument("out must be (n, k)");
    if (bits == 4) lowbit::int4_unpack(src.data(), n, k, out.data());
    else lowbit::ternary_unpack(src.data(), n, k, out.data());
}

int64_t n_groups_for(int64_t kp, int64_t group_k) { return group_k > 0 ? (kp + group_k - 1) / group_k : 1; }

void check_group(int64_t group_k) {
    if (group_k < 0 || group_k % 4 != 0)
        throw std::invalid_argument("group size along K must be 0 (per row) or a positive multiple of 4; got " +
                                    std::to_string(group_k));
}

void quantize_act(Matrix<const float> x, int mode, int exponent, int64_t group, Dense<int8_t> q, Dense<int32_t> sums,
                  Vector<float> a_inv, int n_threads) {
    require_row_contiguous(x, "x");
    check_group(group);
    if (mode < 0 || (mode > 3 && mode != lowbit::kActUdfpFixed)) throw std::invalid_argument("unknown activation mode");
    const int64_t m = (int64_t)x.shape(0), k = (int64_t)x.shape(1), kq = (int64_t)q.shape(1);
    if ((int64_t)q.shape(0) != m || kq < k) throw std::invalid_argument("q must be (M, kq) with kq >= K");
    const int64_t ng = group > 0 ? (kq + group - 1) / group : 1;
    if ((int64_t)sums.shape(0) != m || (int64_t)sums.shape(1) != ng) throw std::invalid_argument("sums must be (M, n_groups)");
    if ((int64_t)a_inv.shape(0) != m) throw std::invalid_argument("a_inv must be (M,)");
    const float* xp = x.data();
    const int64_t xs = row_stride(m, (int64_t)x.stride(0), k);
    int8_t* qp = q.data();
    int32_t* sp = sums.data();
    float* ap = a_inv.data();
    const lowbit_isa_table& t = lowbit::active();
    nb::gil_scoped_release release;
    lowbit::quantize_activations(t, xp, m, k, xs, mode, exponent, kq, group, qp, kq, sp, ng, ap, n_threads);
}

// Integer path: D (and P for asymmetric ternary) from already-quantized int8 activations.
void ternary_gemm_i32(Matrix<const int8_t> a, Tiles w, int64_t n, Matrix<int32_t> out,
                      std::optional<Matrix<int32_t>> out_p, int bits, int n_threads) {
    require_row_contiguous(a, "a");
    require_row_contiguous(out, "out");
    const int64_t m = (int64_t)a.shape(0), k = (int64_t)a.shape(1);
    check_tiles(w, n, k, bits);
    if (out_p && bits != 2) throw std::invalid_argument("the asymmetric (P) output exists for ternary weights only");
    if ((int64_t)out.shape(0) != m || (int64_t)out.shape(1) != n) throw std::invalid_argument("out must be (M, N)");
    if (out_p) {
        require_row_contiguous(*out_p, "out_p");
        if ((int64_t)out_p->shape(0) != m || (int64_t)out_p->shape(1) != n || (m > 1 && out_p->stride(0) != out.stride(0)))
            throw std::invalid_argument("out_p must be (M, N) with the same strides as out");
    }
    const int64_t kp = lowbit::ternary_kp(k), nrb = lowbit::ternary_row_blocks(n);
    const int8_t* ap = a.data();
    const int64_t as = row_stride(m, (int64_t)a.stride(0), k);
    lowbit_t2_args args{};
    args.w = w.data();
    args.kp = kp;
    args.n_valid = n;
    args.asym = out_p ? 1 : 0;
    args.bits = bits;
    args.out_i32 = out.data();
    args.out_p32 = out_p ? out_p->data() : nullptr;
    args.out_i32_stride = row_stride(m, (int64_t)out.stride(0), n);
    const lowbit_isa_table& t = lowbit::active();
    nb::gil_scoped_release release;
    // Zero-padded copy (kp columns) and exact int32 row sums for the code trick.
    const int64_t q_stride = kp + 64;  // see ternary_linear
    std::vector<int8_t> q((size_t)(m * q_stride), 0);
    std::vector<int32_t> sums((size_t)m, 0);
    for (int64_t i = 0; i < m; ++i) {
        int32_t s = 0;
        for (int64_t j = 0; j < k; ++j) {
            q[(size_t)(i * q_stride + j)] = ap[i * as + j];
            s += ap[i * as + j];
        }
        sums[(size_t)i] = s;
    }
    args.a = q.data();
    args.a_stride = q_stride;
    args.a_sums = sums.data();
    args.sums_stride = 1;
    lowbit::ternary_gemm_run(t, args, m, nrb, n_threads);
}

// Fused path: per-token int8 quantization of x, ternary GEMM, fp32 epilogue.
void ternary_linear(Matrix<const float> x, Tiles w, int64_t n, Vector<const float> scale,
                    std::optional<Vector<const float>> scale2, std::optional<Vector<const float>> bias,
                    int64_t group_k, int mode, int exponent, bool relu, Matrix<float> out, int bits,
                    int n_threads, std::optional<Vector<const int32_t>> gscale_i,
                    std::optional<Vector<const float>> row_mult) {
    require_row_contiguous(x, "x");
    require_row_contiguous(out, "out");
    check_group(group_k);
    if (mode < 0 || (mode > 3 && mode != lowbit::kActUdfpFixed)) throw std::invalid_argument("unknown activation mode");
    if (mode == lowbit::kActUdfpFixed && (group_k == 0 || scale2))
        throw std::invalid_argument("unsigned 8-bit DFP activations run the grouped kernel only (group_k > 0, symmetric weights)");
    const int64_t m = (int64_t)x.shape(0), k = (int64_t)x.shape(1);
    check_tiles(w, n, k, bits);
    if (scale2 && bits != 2) throw std::invalid_argument("asymmetric scales exist for ternary weights only");
    const int64_t kp = lowbit::ternary_kp(k), nrb = lowbit::ternary_row_blocks(n), np = 16 * nrb;
    const int64_t ng = n_groups_for(kp, group_k);
    if ((int64_t)scale.shape(0) != np * ng)
        throw std::invalid_argument("scale must hold " + std::to_string(np * ng) +
                                    " floats (padded rows x groups); use lowbit.kernels.pack_ternary");
    if (scale2 && (group_k > 0 || (int64_t)scale2->shape(0) != np))
        throw std::invalid_argument("scale2 (asymmetric ternary) needs per-row scales of 16 * ceil(N/16) floats");
    if (bias && (int64_t)bias->shape(0) != np) throw std::invalid_argument("bias must be padded to 16 * ceil(N/16)");
    if (gscale_i.has_value() != row_mult.has_value() || (gscale_i && (group_k == 0 || scale2)))
        throw std::invalid_argument("gscale_i and row_mult (fixed-point group scales) go together, with groups along K");
    if (gscale_i && ((int64_t)gscale_i->shape(0) != np * ng || (int64_t)row_mult->shape(0) != np))
        throw std::invalid_argument("gscale_i must hold " + std::to_string(np * ng) + " and row_mult " +
                                    std::to_string(np) + " entries; use lowbit.kernels.pack_group_mantissas");
    if ((int64_t)out.shape(0) != m || (int64_t)out.shape(1) != n) throw std::invalid_argument("out must be (M, N)");
    if (m == 0) return;
    lowbit_t2_args args{};
    args.w = w.data();
    args.kp = kp;
    args.n_valid = n;
    args.group_k = group_k;
    args.gscale_i = gscale_i ? gscale_i->data() : nullptr;
    args.row_mult = row_mult ? row_mult->data() : nullptr;
    args.asym = scale2 ? 1 : 0;
    args.bits = bits;
    args.scale = scale.data();
    args.scale2 = scale2 ? scale2->data() : nullptr;
    args.bias = bias ? bias->data() : nullptr;
    args.relu = relu ? 1 : 0;
    args.out_f32 = out.data();
    args.out_f32_stride = row_stride(m, (int64_t)out.stride(0), n);
    const float* xp = x.data();
    const int64_t xs = row_stride(m, (int64_t)x.stride(0), k);
    const lowbit_isa_table& t = lowbit::active();
    nb::gil_scoped_release release;
    // Rows kp + 64 bytes apart: with kp a multiple of 4 KiB, the NR token rows a GEMM microkernel
    // reads together would otherwise all map to the same L1 set and evict each other.
    const int64_t q_stride = kp + 64;
    std::vector<int8_t> q((size_t)(m * q_stride));
    std::vector<int32_t> sums((size_t)(m * ng));
    std::vector<float> a_inv((size_t)m);
    // Unsigned inputs need no per-group sums (the grouped kernel multiplies them directly by the
    // signed weights): quantize them as one group.
    const bool unsigned_act = mode == lowbit::kActUdfpFixed;
    lowbit::quantize_activations(t, xp, m, k, xs, mode, exponent, kp, unsigned_act ? 0 : group_k, q.data(), q_stride,
                                 sums.data(), ng, a_inv.data(), n_threads);
    args.a_unsigned = unsigned_act ? 1 : 0;
    args.a = q.data();
    args.a_stride = q_stride;
    args.a_sums = sums.data();
    args.sums_stride = ng;
    args.a_inv = a_inv.data();
    lowbit::ternary_gemm_run(t, args, m, nrb, n_threads);
}

// Exact float path: fp32 activations x packed weights, fp32 accumulation.
void ternary_linear_float(Matrix<const float> x, Tiles w, int64_t n, Vector<const float> scale,
                          std::optional<Vector<const float>> scale2, std::optional<Vector<const float>> bias,
                          int64_t group_k, bool relu, Matrix<float> out, int bits, int n_threads) {
    require_row_contiguous(x, "x");
    require_row_contiguous(out, "out");
    check_group(group_k);
    const int64_t m = (int64_t)x.shape(0), k = (int64_t)x.shape(1);
    check_tiles(w, n, k, bits);
    if (scale2 && bits != 2) throw std::invalid_argument("asymmetric scales exist for ternary weights only");
    const int64_t kp = lowbit::ternary_kp(k), nrb = lowbit::ternary_row_blocks(n), np = 16 * nrb;
    const int64_t ng = n_groups_for(kp, group_k);
    if ((int64_t)scale.shape(0) != np * ng)
        throw std::invalid_argument("scale must hold " + std::to_string(np * ng) +
                                    " floats (padded rows x groups); use lowbit.kernels.pack_ternary_scales");
    if (scale2 && (group_k > 0 || (int64_t)scale2->shape(0) != np))
        throw std::invalid_argument("scale2 (asymmetric ternary) needs per-row scales of 16 * ceil(N/16) floats");
    if (bias && (int64_t)bias->shape(0) != np) throw std::invalid_argument("bias must be padded to 16 * ceil(N/16)");
    if ((int64_t)out.shape(0) != m || (int64_t)out.shape(1) != n) throw std::invalid_argument("out must be (M, N)");
    if (m == 0) return;
    lowbit_t2_args args{};
    args.w = w.data();
    args.kp = kp;
    args.k = k;
    args.n_valid = n;
    args.group_k = group_k;
    args.asym = scale2 ? 1 : 0;
    args.bits = bits;
    args.scale = scale.data();
    args.scale2 = scale2 ? scale2->data() : nullptr;
    args.bias = bias ? bias->data() : nullptr;
    args.relu = relu ? 1 : 0;
    args.out_f32 = out.data();
    args.out_f32_stride = row_stride(m, (int64_t)out.stride(0), n);
    const float* xp = x.data();
    const int64_t xs = row_stride(m, (int64_t)x.stride(0), k);
    const lowbit_isa_table& t = lowbit::active();
    nb::gil_scoped_release release;
    // Zero-padded copy up to kp (the kernels read whole tiles); rows 16 floats apart from a
    // multiple of 4 KiB for the same L1-aliasing reason as the int8 rows.
    const int64_t x_stride = kp + 16;
    std::vector<float> xpad((size_t)(m * x_stride), 0.0f);
    for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < k; ++j) xpad[(size_t)(i * x_stride + j)] = xp[i * xs + j];
    args.x = xpad.data();
    args.x_stride = x_stride;
    lowbit::ternary_gemm_run(t, args, m, nrb, n_threads, true);
}

}  // namespace

void register_binary(nb::module_& m);  // bindings_binary.cpp

NB_MODULE(_kernels, mod) {
    mod.doc() = "lowbit C++ kernels (plain CPython extension; see lowbit.kernels for the API)";
    register_binary(mod);
    mod.def("cpu_flags", &lowbit::cpu_flags, "CPU feature flags seen by __builtin_cpu_supports.");
    mod.def("compiled_isas", &lowbit::compiled_isas);
    mod.def("supported_isas", &lowbit::supported_isas);
    mod.def("missing_features", &lowbit::missing_features, "isa"_a);
    mod.def("select_isa", &lowbit::select_isa, "isa"_a);
    mod.def("active_isa", [] { return std::string(lowbit::active().name); });
    mod.def("pool_size", &lowbit::pool_size);
    mod.def("pack_signs_f32", &pack_signs_f32, "src"_a, "dst"_a, "n_threads"_a = 1);
    mod.def("binary_gemm", &binary_gemm, "a"_a, "w"_a, "k"_a, "out"_a, "n_threads"_a = 1);
    mod.def("pack_tiles", &pack_tiles, "codes"_a, "dst"_a, "bits"_a);
    mod.def("unpack_tiles", &unpack_tiles, "src"_a, "n"_a, "k"_a, "out"_a, "bits"_a);
    mod.def("quantize_act", &quantize_act, "x"_a, "mode"_a, "exponent"_a, "group"_a, "q"_a, "sums"_a, "a_inv"_a,
            "n_threads"_a = 1);
    mod.def("ternary_gemm_i32", &ternary_gemm_i32, "a"_a, "w"_a, "n"_a, "out"_a, "out_p"_a.none(), "bits"_a = 2,
            "n_threads"_a = 1);
    mod.def("ternary_linear", &ternary_linear, "x"_a, "w"_a, "n"_a, "scale"_a, "scale2"_a.none(), "bias"_a.none(),
            "group_k"_a, "mode"_a, "exponent"_a, "relu"_a, "out"_a, "bits"_a = 2, "n_threads"_a = 1,
            "gscale_i"_a.none() = nb::none(), "row_mult"_a.none() = nb::none());
    mod.def("ternary_linear_float", &ternary_linear_float, "x"_a, "w"_a, "n"_a, "scale"_a, "scale2"_a.none(),
            "bias"_a.none(), "group_k"_a, "relu"_a, "out"_a, "bits"_a = 2, "n_threads"_a = 1);
    mod.def("act_multiplier", [](float amax, int mode, int exponent) {
        float inv = 0.0f;
        float s = lowbit::act_multiplier(amax, mode, exponent, &inv);
        return std::make_pair(s, inv);
    }, "amax"_a, "mode"_a, "exponent"_a = 0);
}
