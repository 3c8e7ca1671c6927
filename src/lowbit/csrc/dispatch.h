// Runtime ISA selection (baseline code: compiled without any ISA flags).
#ifndef LOWBIT_DISPATCH_H
#define LOWBIT_DISPATCH_H

#include <string>
#include <utility>
#include <vector>

#include "kernels.h"

namespace lowbit {

// CPU feature flags as reported by __builtin_cpu_supports (which also checks that the OS
// saves the AVX / AVX-512 register state).
std::vector<std::pair<std::string, bool>> cpu_flags();

// ISA paths this build contains, best last.
std::vector<std::string> compiled_isas();

// ISA paths this CPU can run, best last.
std::vector<std::string> supported_isas();

// Missing CPU features for an ISA path ("" when the CPU supports it); throws
// std::invalid_argument for an unknown name.
std::string missing_features(const std::string& isa);

// Selects the active path; throws std::invalid_argument (unknown name) or
// std::runtime_error (the CPU lacks a feature) with a message that says what to do.
void select_isa(const std::string& isa);

const lowbit_isa_table& active();

}  // namespace lowbit

#endif
