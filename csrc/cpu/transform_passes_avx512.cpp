// The transform passes with AVX-512 vectors; see transform_passes_avx2.cpp.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2")
// In C++, GCC's target pragma enables the instructions but not the ISA macros; sleef.h declares
// its vector functions only under them, so they are set by hand for this unit.
#define __AVX__ 1
#define __AVX2__ 1
#define __AVX512F__ 1
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define FUSEDTIE_PASSES_FN transform_passes_avx512
#define FUSEDTIE_CAPABILITY_NAME "AVX512"
#include "transform_passes_impl.h"
#else
#include "transform_passes.h"
namespace fusedtie {
const TransformPasses* transform_passes_avx512() { return nullptr; }
}  // namespace fusedtie
#endif
