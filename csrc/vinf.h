#pragma once
#include <pybind11/pybind11.h>

namespace vinf {
#ifdef VINF_WITH_CUDA
// Defined in the .cu translation units; binds the CUDA kernels into the module.
void register_cuda(pybind11::module_& m);
#endif
}  // namespace vinf
