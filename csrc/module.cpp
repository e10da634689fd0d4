// vinf_engine._C: the native extension's entry point. Kernels register their bindings from
// their own translation units through register_*() hooks declared in vinf.h.
#include <pybind11/pybind11.h>

#include "vinf.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "vinf_engine native kernels";
#ifdef VINF_WITH_CUDA
  m.attr("with_cuda") = true;
  vinf::register_cuda(m);
#else
  m.attr("with_cuda") = false;
#endif
}
