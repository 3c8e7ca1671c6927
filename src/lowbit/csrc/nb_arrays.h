// The array types and argument checks the element-wise and per-unit ops share (sign_ops.cpp,
// ttq_ops.cpp, la_exact.cpp): contiguous CPU arrays of any shape, read-only (In) or written (Out).
#ifndef LOWBIT_NB_ARRAYS_H
#define LOWBIT_NB_ARRAYS_H

#include <nanobind/ndarray.h>

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>

namespace lowbit {

template <class T>
using In = nanobind::ndarray<const T, nanobind::device::cpu, nanobind::c_contig>;
template <class T>
using Out = nanobind::ndarray<T, nanobind::device::cpu, nanobind::c_contig>;

// Every size in `sizes` equals n (element-wise ops over arrays of any shape).
inline void require_sizes(const char* op, int64_t n, std::initializer_list<int64_t> sizes) {
    for (int64_t s : sizes)
        if (s != n) throw std::invalid_argument(std::string(op) + ": all arrays must have the same number of elements");
}

// Every array is 2-D (units, length) with the first one's shape; returns (units, length).
template <class First, class... Rest>
std::pair<int64_t, int64_t> require_units(const char* op, const First& first, const Rest&... rest) {
    auto same = [&](const auto& a) {
        return a.ndim() == 2 && a.shape(0) == first.shape(0) && a.shape(1) == first.shape(1);
    };
    if (first.ndim() != 2 || !(same(rest) && ...))
        throw std::invalid_argument(std::string(op) + ": arrays must be 2-D (units, length) of one shape");
    return {(int64_t)first.shape(0), (int64_t)first.shape(1)};
}

}  // namespace lowbit

#endif
