// The portable build of the transform passes (no instruction set beyond the compiler's default),
// and the run-time choice among the capabilities.
#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <cstdlib>

#define FUSEDTIE_PASSES_FN transform_passes_default
#define FUSEDTIE_CAPABILITY_NAME "DEFAULT"
#include "transform_passes_impl.h"

namespace fusedtie {

void throw_unsupported_dtype(c10::ScalarType dtype) {
  TORCH_CHECK_TYPE(false, "fusedtie: no CPU transform pass for dtype ", dtype);
  std::abort();  // not reached: the check above throws
}

const TransformPasses& cpu_transform_passes() {
  static const TransformPasses* chosen = [] {
    // ATen's own choice (cpuinfo, capped by ATEN_CPU_CAPABILITY): "AVX512", "AVX2", "DEFAULT", ...
    const std::string capability = at::get_cpu_capability();
    const TransformPasses* passes = nullptr;
    if (capability == "AVX512") passes = transform_passes_avx512();
    if (passes == nullptr && (capability == "AVX512" || capability == "AVX2")) {
      passes = transform_passes_avx2();
    }
    return passes != nullptr ? passes : transform_passes_default();
  }();
  return *chosen;
}

}  // namespace fusedtie
