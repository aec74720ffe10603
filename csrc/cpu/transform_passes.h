#pragma once
// The two elementwise passes of the CPU path, over `numel` elements laid out identically:
//   forward:    out = f(in)
//   chain rule: out = grad * f'(source)       (out may alias grad)
// They are compiled once per CPU capability (transform_passes_{default,avx2,avx512}.cpp, each
// instantiating transform_passes_impl.h with that capability's at::vec::Vectorized), and the
// widest one the machine supports is picked at run time, as ATen picks its own kernels (the
// ATEN_CPU_CAPABILITY environment variable forces a narrower one, for tests).
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../transforms.h"

namespace fusedtie {

struct TransformPasses {
  const char* capability;
  void (*forward)(TransformKind kind, c10::ScalarType dtype, const void* in, void* out, int64_t numel, double alpha);
  void (*chain_rule)(TransformKind kind, c10::ScalarType dtype, const void* grad, const void* source, void* out,
                     int64_t numel, double alpha);
  // Float32 packing of a weight tile with f applied: out[c * ld_out + r] = f(in[r * ld_in + c]) for
  // r < rows, c < cols, the transpose done in registers so that f and the pack are one pass.
  void (*forward_transposed)(TransformKind kind, const float* in, int64_t ld_in, float* out, int64_t ld_out,
                             int64_t rows, int64_t cols, double alpha);
};

// Each returns nullptr when its translation unit was compiled without that instruction set.
const TransformPasses* transform_passes_default();
const TransformPasses* transform_passes_avx2();
const TransformPasses* transform_passes_avx512();

// The passes for this machine, chosen once.
const TransformPasses& cpu_transform_passes();

// Raises the TypeError for a dtype without a pass (defined in the portable unit).
[[noreturn]] void throw_unsupported_dtype(c10::ScalarType dtype);

// Calls fn(T{}) for the element type T of dtype (the four types every pass handles), else raises.
template <typename Fn>
void dispatch_dtype(c10::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case c10::ScalarType::Float: return fn(float{});
    case c10::ScalarType::Double: return fn(double{});
    case c10::ScalarType::BFloat16: return fn(c10::BFloat16{});
    case c10::ScalarType::Half: return fn(c10::Half{});
    default: throw_unsupported_dtype(dtype);
  }
}

}  // namespace fusedtie
