// Python bindings for lowbit._kernels (nanobind; no libtorch). Arrays cross as zero-copy
// NumPy / DLPack views; outputs are allocated by the caller (lowbit/kernels.py) and every
// kernel runs with the GIL released.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <stdexcept>
#include <string>

#include "dispatch.h"
#include "threadpool.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

template <typename T>
using Matrix = nb::ndarray<T, nb::ndim<2>, nb::device::cpu>;

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

}  // namespace

NB_MODULE(_kernels, mod) {
    mod.doc() = "lowbit C++ kernels (plain CPython extension; see lowbit.kernels for the API)";
    mod.def("cpu_flags", &lowbit::cpu_flags, "CPU feature flags seen by __builtin_cpu_supports.");
    mod.def("compiled_isas", &lowbit::compiled_isas);
    mod.def("supported_isas", &lowbit::supported_isas);
    mod.def("missing_features", &lowbit::missing_features, "isa"_a);
    mod.def("select_isa", &lowbit::select_isa, "isa"_a);
    mod.def("active_isa", [] { return std::string(lowbit::active().name); });
    mod.def("pool_size", &lowbit::pool_size);
    mod.def("pack_signs_f32", &pack_signs_f32, "src"_a, "dst"_a, "n_threads"_a = 1);
    mod.def("binary_gemm", &binary_gemm, "a"_a, "w"_a, "k"_a, "out"_a, "n_threads"_a = 1);
}
