#include "dispatch.h"

#include <atomic>
#include <stdexcept>

namespace lowbit {
namespace {

struct IsaInfo {
    const char* name;
    const lowbit_isa_table* (*table)(void);
    std::vector<const char*> needs;
};

const std::vector<IsaInfo>& isa_infos() {
    static const std::vector<IsaInfo> infos = {
        {"scalar", lowbit_isa_scalar, {}},
        {"avx2", lowbit_isa_avx2, {"avx2", "fma", "popcnt", "bmi2", "f16c"}},
        {"avx512", lowbit_isa_avx512,
         {"avx2", "fma", "popcnt", "bmi2", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
          "avx512vnni", "avx512vpopcntdq", "avx512bitalg"}},
    };
    return infos;
}

// __builtin_cpu_supports needs a string literal, hence the explicit table.
bool has(const std::string& f) {
    __builtin_cpu_init();
    if (f == "sse4.2") return __builtin_cpu_supports("sse4.2");
    if (f == "popcnt") return __builtin_cpu_supports("popcnt");
    if (f == "avx") return __builtin_cpu_supports("avx");
    if (f == "avx2") return __builtin_cpu_supports("avx2");
    if (f == "fma") return __builtin_cpu_supports("fma");
    if (f == "bmi2") return __builtin_cpu_supports("bmi2");
    if (f == "f16c") return __builtin_cpu_supports("f16c");
    if (f == "avxvnni") return __builtin_cpu_supports("avxvnni");
    if (f == "avx512f") return __builtin_cpu_supports("avx512f");
    if (f == "avx512bw") return __builtin_cpu_supports("avx512bw");
    if (f == "avx512vl") return __builtin_cpu_supports("avx512vl");
    if (f == "avx512dq") return __builtin_cpu_supports("avx512dq");
    if (f == "avx512vnni") return __builtin_cpu_supports("avx512vnni");
    if (f == "avx512vpopcntdq") return __builtin_cpu_supports("avx512vpopcntdq");
    if (f == "avx512bitalg") return __builtin_cpu_supports("avx512bitalg");
    if (f == "avx512vbmi") return __builtin_cpu_supports("avx512vbmi");
    if (f == "avx512bf16") return __builtin_cpu_supports("avx512bf16");
    return false;
}

const IsaInfo& find(const std::string& isa) {
    for (const auto& info : isa_infos())
        if (isa == info.name) return info;
    throw std::invalid_argument("unknown ISA path '" + isa + "': choose one of scalar, avx2, avx512");
}

const lowbit_isa_table* best_table() {
    const lowbit_isa_table* best = lowbit_isa_scalar();
    for (const auto& info : isa_infos()) {
        bool ok = true;
        for (const char* f : info.needs) ok = ok && has(f);
        if (ok) best = info.table();
    }
    return best;
}

std::atomic<const lowbit_isa_table*> g_active{nullptr};

}  // namespace

std::vector<std::pair<std::string, bool>> cpu_flags() {
    std::vector<std::pair<std::string, bool>> out;
    for (const char* f : {"sse4.2", "popcnt", "avx", "avx2", "fma", "bmi2", "f16c", "avxvnni",
                          "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vnni",
                          "avx512vpopcntdq", "avx512bitalg", "avx512vbmi", "avx512bf16"})
        out.emplace_back(f, has(f));
    return out;
}

std::vector<std::string> compiled_isas() {
    std::vector<std::string> out;
    for (const auto& info : isa_infos()) out.emplace_back(info.name);
    return out;
}

std::string missing_features(const std::string& isa) {
    std::string missing;
    for (const char* f : find(isa).needs)
        if (!has(f)) missing += (missing.empty() ? "" : ", ") + std::string(f);
    return missing;
}

std::vector<std::string> supported_isas() {
    std::vector<std::string> out;
    for (const auto& info : isa_infos())
        if (missing_features(info.name).empty()) out.emplace_back(info.name);
    return out;
}

void select_isa(const std::string& isa) {
    const IsaInfo& info = find(isa);
    std::string missing = missing_features(isa);
    if (!missing.empty())
        throw std::runtime_error("this CPU cannot run the '" + isa + "' kernels (missing: " + missing + ")");
    g_active.store(info.table());
}

const lowbit_isa_table& active() {
    const lowbit_isa_table* t = g_active.load();
    if (!t) {
        t = best_table();
        g_active.store(t);
    }
    return *t;
}

}  // namespace lowbit
