#pragma once
// fusedtie::tied_conv2d called through the dispatcher from C++ (every key: autograd, backend, Python
// modes), with its typed handle looked up once. Shared by the autograd kernels and by the _C
// module's eager binding, so the schema's C++ signature is spelled in one place.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/string_view.h>

#include <optional>

namespace fusedtie {

inline at::Tensor call_tied_conv2d(const at::Tensor& input, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, c10::string_view transform,
                                   double alpha, c10::string_view bias_transform, double bias_alpha,
                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, int64_t groups) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fusedtie::tied_conv2d", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            c10::string_view, double, c10::string_view, double, at::IntArrayRef,
                            at::IntArrayRef, at::IntArrayRef, int64_t)>();
  return op.call(input, weight, bias, transform, alpha, bias_transform, bias_alpha, stride, padding,
                 dilation, groups);
}

}  // namespace fusedtie
