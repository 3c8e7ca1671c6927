// Per-group sums of one quantized activation row (the code trick's Σa for groups along K).
//
// `static`, not `inline`: every ISA unit that includes this keeps its own copy, compiled with its
// own flags, so no AVX-512 code can be merged into another unit (see kernels.h, "ODR leak").
#ifndef LOWBIT_GROUP_SUMS_H
#define LOWBIT_GROUP_SUMS_H

#include <cstdint>

// sums[g] = sum of q[j] over j in [g * group, min((g + 1) * group, kq)), the codes read as
// uint8 (0..255) when u8, else as int8. No division per element: this runs once per token and
// layer, and `j % group` on every byte cost more than quantizing the row (session 7).
static void row_group_sums(const int8_t* q, int64_t kq, int64_t group, bool u8, int32_t* sums) {
    for (int64_t g0 = 0, g = 0; g0 < kq; g0 += group, ++g) {
        const int64_t g1 = g0 + group < kq ? g0 + group : kq;
        int32_t s = 0;
        for (int64_t j = g0; j < g1; ++j) s += u8 ? (int32_t)(uint8_t)q[j] : (int32_t)q[j];
        sums[g] = s;
    }
}

#endif  // LOWBIT_GROUP_SUMS_H
