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

// The most rows the short side of a fused skinny GEMM may have (linear_conv2d.h).
inline constexpr int64_t kSkinnyMaxRows = 8;

struct TransformPasses {
  const char* capability;
  void (*forward)(TransformKind kind, c10::ScalarType dtype, const void* in, void* out, int64_t numel, double alpha);
  void (*chain_rule)(TransformKind kind, c10::ScalarType dtype, const void* grad, const void* source, void* out,
                     int64_t numel, double alpha);
  // Float32 packing of a weight tile with f applied: out[c * ld_out + r] = f(in[r * ld_in + c]) for
  // r < rows, c < cols, the transpose done in registers so that f and the pack are one pass.
  void (*forward_transposed)(TransformKind kind, const float* in, int64_t ld_in, float* out, int64_t ld_out,
                             int64_t rows, int64_t cols, double alpha);
  // The fused skinny GEMMs (skinny_gemm_impl.h), float32/float64 and built-in transforms only,
  // rows <= kSkinnyMaxRows. W is (O, K) row-major; each call covers W's rows [o_begin, o_end).
  //   skinny_dot:  y[m * ldy + o] = sum_k x[m * ldx + k] * f(w[o * K + k]) (+ bias[o])
  //   skinny_rows: spread[m * K + k] += sum_o a[m * lda + o] * f(w[o * K + k])          (spread not null)
  //                grad_w[o * K + k] = f'(w[o * K + k]) * sum_m a[m * lda + o] * b[m * ldb + k]  (grad_w not null)
  void (*skinny_dot)(TransformKind kind, c10::ScalarType dtype, const void* x, int64_t rows, int64_t ldx, const void* w,
                     int64_t K, const void* bias, void* y, int64_t ldy, int64_t o_begin, int64_t o_end, double alpha);
  void (*skinny_rows)(TransformKind kind, c10::ScalarType dtype, const void* w, int64_t K, const void* a, int64_t lda,
                      int64_t rows, const void* b, int64_t ldb, void* spread, void* grad_w, int64_t o_begin,
                      int64_t o_end, double alpha);
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
