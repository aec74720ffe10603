// The transform passes with AVX2 + FMA vectors (at::vec's AVX2 Vectorized, SLEEF's exp/tanh/log1p
// from libtorch_cpu). The whole unit is compiled for that target by the pragma, so no build system
// needs per-file flags; the code only runs when ATen reports AVX2 or better.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
// In C++, GCC's target pragma enables the instructions but not the ISA macros; sleef.h declares
// its vector functions only under them, so they are set by hand for this unit.
#define __AVX__ 1
#define __AVX2__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define FUSEDTIE_PASSES_FN transform_passes_avx2
#define FUSEDTIE_CAPABILITY_NAME "AVX2"
#include "transform_passes_impl.h"
#else
#include "transform_passes.h"
namespace fusedtie {
const TransformPasses* transform_passes_avx2() { return nullptr; }
}  // namespace fusedtie
#endif
