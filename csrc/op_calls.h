#pragma once
// The fusedtie operators called through the dispatcher from C++ (every key: autograd, backend,
// Python modes), each with its typed handle looked up once. Shared by the autograd and autocast
// kernels and by the _C module's eager binding, so each schema's C++ signature is spelled in one place.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>
#include <tuple>

namespace fusedtie {

inline at::Tensor call_tied_conv2d(const at::Tensor& input, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, c10::string_view transform, double alpha,
                                   c10::string_view bias_transform, double bias_alpha, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fusedtie::tied_conv2d", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                               c10::string_view, double, c10::string_view, double, at::IntArrayRef,
                                               at::IntArrayRef, at::IntArrayRef, int64_t)>();
  return op.call(input, weight, bias, transform, alpha, bias_transform, bias_alpha, stride, padding, dilation, groups);
}

inline at::Tensor call_tied_conv_transpose2d(const at::Tensor& input, const at::Tensor& weight,
                                             const std::optional<at::Tensor>& bias, c10::string_view transform,
                                             double alpha, at::IntArrayRef stride, at::IntArrayRef padding,
                                             at::IntArrayRef output_padding, at::IntArrayRef dilation, int64_t groups) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fusedtie::tied_conv_transpose2d", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                            double, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t)>();
  return op.call(input, weight, bias, transform, alpha, stride, padding, output_padding, dilation, groups);
}

using OptionalGradients = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>;

inline OptionalGradients call_tied_conv_transpose2d_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                                             const at::Tensor& weight,
                                                             const std::optional<at::Tensor>& bias,
                                                             c10::string_view transform, double alpha,
                                                             at::IntArrayRef stride, at::IntArrayRef padding,
                                                             at::IntArrayRef output_padding, at::IntArrayRef dilation,
                                                             int64_t groups, std::array<bool, 3> output_mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fusedtie::_tied_conv_transpose2d_backward", "")
          .typed<OptionalGradients(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const std::optional<at::Tensor>&, c10::string_view, double, at::IntArrayRef,
                                   at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, std::array<bool, 3>)>();
  return op.call(grad_output, input, weight, bias, transform, alpha, stride, padding, output_padding, dilation, groups,
                 output_mask);
}

}  // namespace fusedtie
