// Every schema of the fusedtie namespace, and the C++ entries of fusedtie.h as calls through the
// dispatcher (each looks its typed handle up once). Backends register implementations under their
// dispatch keys (csrc/cpu, csrc/cuda), autograd and autocast under theirs (autograd.cpp,
// autocast.cpp); Python registers the fake kernels (fusedtie/_fake.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "fusedtie.h"

TORCH_LIBRARY(fusedtie, m) {
  // y = conv2d(input, f(weight), g(bias)), f = transform, g = bias_transform; weight and bias are the
  // *source* tensors. padding is (top, bottom, left, right). alpha is read only by transforms that
  // take a constant (scale).
  m.def(
      "tied_conv2d(Tensor input, Tensor weight, Tensor? bias, str transform, float alpha, "
      "str bias_transform, float bias_alpha, int[2] stride, int[4] padding, int[2] dilation, "
      "int groups) -> Tensor");
  // Gradients with respect to input, source weight and source bias, for the entries of output_mask
  // that are true (None elsewhere). The chain rule f'(W) * dL/df(W) happens inside this op.
  m.def(
      "_tied_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor? bias, "
      "str transform, float alpha, str bias_transform, float bias_alpha, int[2] stride, "
      "int[4] padding, int[2] dilation, int groups, bool[3] output_mask) -> (Tensor?, Tensor?, Tensor?)");
  // y = conv_transpose2d(input, f(weight), bias): the decoder of a tied autoencoder, weight being
  // the encoder conv's (source) weight. The bias is the decoder's own parameter, so it takes no
  // transform. padding is symmetric, as F.conv_transpose2d's.
  m.def(
      "tied_conv_transpose2d(Tensor input, Tensor weight, Tensor? bias, str transform, float alpha, "
      "int[2] stride, int[2] padding, int[2] output_padding, int[2] dilation, int groups) -> Tensor");
  // Gradients with respect to input, source weight and bias, for the entries of output_mask that are
  // true (None elsewhere); the chain rule f'(W) * dL/df(W) happens inside this op.
  m.def(
      "_tied_conv_transpose2d_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor? bias, "
      "str transform, float alpha, int[2] stride, int[2] padding, int[2] output_padding, int[2] dilation, "
      "int groups, bool[3] output_mask) -> (Tensor?, Tensor?, Tensor?)");
  // y = conv3d(input, f(weight), g(bias)): tied_conv2d one rank up. padding is (front, back, top,
  // bottom, left, right).
  m.def(
      "tied_conv3d(Tensor input, Tensor weight, Tensor? bias, str transform, float alpha, "
      "str bias_transform, float bias_alpha, int[3] stride, int[6] padding, int[3] dilation, "
      "int groups) -> Tensor");
  // tied_conv3d's gradients, as _tied_conv2d_backward's.
  m.def(
      "_tied_conv3d_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor? bias, "
      "str transform, float alpha, str bias_transform, float bias_alpha, int[3] stride, "
      "int[6] padding, int[3] dilation, int groups, bool[3] output_mask) -> (Tensor?, Tensor?, Tensor?)");
  // f(source) as a new tensor: the derived weight FusedTiedConv2d.weight reports, and to_conv2d().
  m.def("transform(Tensor source, str transform, float alpha) -> Tensor");
  // grad * f'(source): the fused chain-rule pass on its own.
  m.def("_transform_backward(Tensor grad, Tensor source, str transform, float alpha) -> Tensor");
}

namespace fusedtie::ops {
namespace {

// The typed handle of fusedtie::<name>, whose C++ signature is `contract`'s.
template <auto& contract>
c10::TypedOperatorHandle<std::remove_reference_t<decltype(contract)>> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<std::remove_reference_t<decltype(contract)>>();
}

}  // namespace

at::Tensor tied_conv2d(const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias,
                       c10::string_view transform, double alpha, c10::string_view bias_transform, double bias_alpha,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  static const auto op = handle<tied_conv2d>("fusedtie::tied_conv2d");
  return op.call(input, weight, bias, transform, alpha, bias_transform, bias_alpha, stride, padding, dilation, groups);
}

OptionalGradients _tied_conv2d_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                        const at::Tensor& weight, const OptionalTensor& bias,
                                        c10::string_view transform, double alpha, c10::string_view bias_transform,
                                        double bias_alpha, at::IntArrayRef stride, at::IntArrayRef padding,
                                        at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  static const auto op = handle<_tied_conv2d_backward>("fusedtie::_tied_conv2d_backward");
  return op.call(grad_output, input, weight, bias, transform, alpha, bias_transform, bias_alpha, stride, padding,
                 dilation, groups, output_mask);
}

at::Tensor tied_conv_transpose2d(const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias,
                                 c10::string_view transform, double alpha, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef output_padding, at::IntArrayRef dilation,
                                 int64_t groups) {
  static const auto op = handle<tied_conv_transpose2d>("fusedtie::tied_conv_transpose2d");
  return op.call(input, weight, bias, transform, alpha, stride, padding, output_padding, dilation, groups);
}

OptionalGradients _tied_conv_transpose2d_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                                  const at::Tensor& weight, const OptionalTensor& bias,
                                                  c10::string_view transform, double alpha, at::IntArrayRef stride,
                                                  at::IntArrayRef padding, at::IntArrayRef output_padding,
                                                  at::IntArrayRef dilation, int64_t groups,
                                                  std::array<bool, 3> output_mask) {
  static const auto op = handle<_tied_conv_transpose2d_backward>("fusedtie::_tied_conv_transpose2d_backward");
  return op.call(grad_output, input, weight, bias, transform, alpha, stride, padding, output_padding, dilation, groups,
                 output_mask);
}

at::Tensor tied_conv3d(const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias,
                       c10::string_view transform, double alpha, c10::string_view bias_transform, double bias_alpha,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  static const auto op = handle<tied_conv3d>("fusedtie::tied_conv3d");
  return op.call(input, weight, bias, transform, alpha, bias_transform, bias_alpha, stride, padding, dilation, groups);
}

OptionalGradients _tied_conv3d_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                        const at::Tensor& weight, const OptionalTensor& bias,
                                        c10::string_view transform, double alpha, c10::string_view bias_transform,
                                        double bias_alpha, at::IntArrayRef stride, at::IntArrayRef padding,
                                        at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  static const auto op = handle<_tied_conv3d_backward>("fusedtie::_tied_conv3d_backward");
  return op.call(grad_output, input, weight, bias, transform, alpha, bias_transform, bias_alpha, stride, padding,
                 dilation, groups, output_mask);
}

at::Tensor transform(const at::Tensor& source, c10::string_view transform, double alpha) {
  static const auto op = handle<ops::transform>("fusedtie::transform");
  return op.call(source, transform, alpha);
}

at::Tensor _transform_backward(const at::Tensor& grad, const at::Tensor& source, c10::string_view transform,
                               double alpha) {
  static const auto op = handle<_transform_backward>("fusedtie::_transform_backward");
  return op.call(grad, source, transform, alpha);
}

}  // namespace fusedtie::ops
