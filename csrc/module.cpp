// Python module eegfast._C and the owner of the `eegfast` operator namespace.
//
// Each op declares its schemas in its own source (TORCH_LIBRARY_FRAGMENT in csrc/<op>/) and
// registers its kernels per dispatch key there; this file only owns the namespace and reports
// how the module was built.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(eegfast, m) {}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef EEGFAST_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["torch_version_at_build"] = TORCH_VERSION;
#if defined(__x86_64__)
  info["cpu_avx2_kernels"] = true;
  info["cpu_has_avx2_fma"] = bool(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"));
#else
  info["cpu_avx2_kernels"] = false;
  info["cpu_has_avx2_fma"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "eegfast native kernels; the ops live in torch.ops.eegfast";
  module.def("build_info", &build_info, "How this extension was built (CUDA, OpenMP, SIMD).");
}
