// The extension module lowbit._la_solver: the training-side C++ — the fused loss-aware solvers of
// la_solver.cpp and la_exact.cpp, TTQ's weight and gradients (ttq_ops.cpp), BNN's sign and gate (sign_ops.cpp).
//
// A module of its own (not part of lowbit._kernels) so that it builds from files of its own;
// folding it into _kernels takes la_solver.cpp in that target's sources and one
// `register_la_solver(mod);` line in bindings.cpp's NB_MODULE. It has its own instance of the
// lowbit thread pool (threadpool.cpp), sized per call from torch.get_num_threads() like _kernels'.
#include <nanobind/nanobind.h>

namespace nb = nanobind;

void register_la_solver(nb::module_& m);  // la_solver.cpp
void register_la_exact(nb::module_& m);   // la_exact.cpp
void register_ttq(nb::module_& m);        // ttq_ops.cpp
void register_sign(nb::module_& m);       // sign_ops.cpp

NB_MODULE(_la_solver, mod) {
    mod.doc() = "lowbit fused loss-aware alternating solvers (see lowbit.kernels.la_support_solve / la_laq_solve)";
    register_la_solver(mod);
    register_la_exact(mod);
    register_ttq(mod);
    register_sign(mod);
}
