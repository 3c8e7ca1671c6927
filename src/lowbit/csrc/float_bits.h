// The bit pattern of a float and back (memcpy: no aliasing questions, compiles to a move).
#ifndef LOWBIT_FLOAT_BITS_H
#define LOWBIT_FLOAT_BITS_H

#include <cstdint>
#include <cstring>

namespace lowbit {

inline uint32_t bits_of(float f) {
    uint32_t b;
    std::memcpy(&b, &f, sizeof b);
    return b;
}

inline float float_of(uint32_t b) {
    float f;
    std::memcpy(&f, &b, sizeof f);
    return f;
}

}  // namespace lowbit

#endif
