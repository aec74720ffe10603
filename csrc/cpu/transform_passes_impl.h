// Included by exactly one translation unit per CPU capability, after that unit has set
// CPU_CAPABILITY / CPU_CAPABILITY_<ISA> and FUSEDTIE_PASSES_FN (the accessor it defines).
// Everything here has internal linkage except that accessor, so the capabilities never mix; errors
// are raised by a function of the portable unit, so no error-formatting code is compiled for an ISA.
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../transforms.h"
#include "../user_transforms.h"
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

}  // namespace

const TransformPasses* FUSEDTIE_PASSES_FN() {
  static const TransformPasses passes{FUSEDTIE_CAPABILITY_NAME, &forward_pass, &chain_rule_pass};
  return &passes;
}

}  // namespace fusedtie
