// Included by exactly one translation unit per CPU capability, after that unit has set
// CPU_CAPABILITY / CPU_CAPABILITY_<ISA> and FUSEDTIE_PASSES_FN (the accessor it defines).
// Everything here has internal linkage except that accessor, so the capabilities never mix; errors
// are raised by a function of the portable unit, so no error-formatting code is compiled for an ISA.
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#include "../transforms.h"
#include "../user_transforms.h"
#include "skinny_gemm_impl.h"
#include "transform_passes.h"

namespace fusedtie {
namespace {

template <typename Transform, typename scalar_t>
void forward_loop(const scalar_t* in, scalar_t* out, int64_t numel, double alpha) {
  using Vec = at::vec::Vectorized<at::opmath_type<scalar_t>>;
  const Vec alpha_vec(static_cast<at::opmath_type<scalar_t>>(alpha));
  at::vec::map([&](Vec x) { return Transform::forward(x, alpha_vec); }, out, in, numel);
}

template <typename Transform, typename scalar_t>
void chain_rule_loop(const scalar_t* grad, const scalar_t* source, scalar_t* out, int64_t numel, double alpha) {
  using Vec = at::vec::Vectorized<at::opmath_type<scalar_t>>;
  const Vec alpha_vec(static_cast<at::opmath_type<scalar_t>>(alpha));
  at::vec::map2([&](Vec g, Vec x) { return g * Transform::derivative(x, alpha_vec); }, out, grad, source, numel);
}

// User transforms (user_transforms.h) are routed to their registry entry here, so every caller of
// the passes runs them without knowing about them; their code is not compiled per ISA.
void forward_pass(TransformKind kind, c10::ScalarType dtype, const void* in, void* out, int64_t numel, double alpha) {
  if (is_user_transform(kind)) return user_forward_pass(kind, dtype, in, out, numel);
  dispatch_dtype(dtype, [&](auto type_tag) {
    using scalar_t = decltype(type_tag);
    dispatch_transform(kind, [&](auto transform) {
      forward_loop<decltype(transform)>(static_cast<const scalar_t*>(in), static_cast<scalar_t*>(out), numel, alpha);
    });
  });
}

void chain_rule_pass(TransformKind kind, c10::ScalarType dtype, const void* grad, const void* source, void* out,
                     int64_t numel, double alpha) {
  if (is_user_transform(kind)) return user_chain_rule_pass(kind, dtype, grad, source, out, numel);
  dispatch_dtype(dtype, [&](auto type_tag) {
    using scalar_t = decltype(type_tag);
    dispatch_transform(kind, [&](auto transform) {
      chain_rule_loop<decltype(transform)>(static_cast<const scalar_t*>(grad), static_cast<const scalar_t*>(source),
                                           static_cast<scalar_t*>(out), numel, alpha);
    });
  });
}

// One V x V block at a time: f on each row's vector, stored to an L1 block, transposed out of it
// (at::vec's in-register transpose where this capability has one; masked at the edges on AVX-512).
template <typename Transform>
void forward_transposed_loop(const float* in, int64_t ld_in, float* out, int64_t ld_out, int64_t rows, int64_t cols,
                             double alpha) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t V = Vec::size();
  const Vec alpha_vec(static_cast<float>(alpha));
  alignas(64) float block[V * V];
  for (int64_t r0 = 0; r0 < rows; r0 += V) {
    const int64_t block_rows = std::min(V, rows - r0);
    for (int64_t c0 = 0; c0 < cols; c0 += V) {
      const int64_t block_cols = std::min(V, cols - c0);
      for (int64_t r = 0; r < block_rows; ++r) {
        const float* row = in + (r0 + r) * ld_in + c0;
        const Vec x = block_cols == V ? Vec::loadu(row) : Vec::loadu(row, block_cols);
        Transform::forward(x, alpha_vec).store(block + r * V);
      }
      float* target = out + c0 * ld_out + r0;
      if (block_rows == V && block_cols == V) {
        at::vec::transpose_mxn<float, V, V>(block, V, target, ld_out);
      } else {
        at::vec::transpose_mxn<float>(block, V, target, ld_out, static_cast<int>(block_rows),
                                      static_cast<int>(block_cols));
      }
    }
  }
}

void forward_transposed_pass(TransformKind kind, const float* in, int64_t ld_in, float* out, int64_t ld_out,
                             int64_t rows, int64_t cols, double alpha) {
  if (is_user_transform(kind)) {
    // A user transform runs through its own pass, a row at a time, then the identity packs it. The
    // staging block is this thread's, grown once: the pass runs per tile, inside the GEMM loops.
    thread_local std::vector<float> staged;
    if (static_cast<int64_t>(staged.size()) < rows * cols) staged.resize(rows * cols);
    for (int64_t r = 0; r < rows; ++r) {
      user_forward_pass(kind, c10::ScalarType::Float, in + r * ld_in, staged.data() + r * cols, cols);
    }
    return forward_transposed_loop<IdentityTransform>(staged.data(), cols, out, ld_out, rows, cols, alpha);
  }
  dispatch_transform(kind, [&](auto transform) {
    forward_transposed_loop<decltype(transform)>(in, ld_in, out, ld_out, rows, cols, alpha);
  });
}

}  // namespace

const TransformPasses* FUSEDTIE_PASSES_FN() {
  static const TransformPasses passes{FUSEDTIE_CAPABILITY_NAME, &forward_pass, &chain_rule_pass,
                                      &forward_transposed_pass, &skinny_dot,   &skinny_rows};
  return &passes;
}

}  // namespace fusedtie
