// Every schema of the fusedtie namespace, and nothing else. Backends register implementations under
// their dispatch keys (csrc/cpu, csrc/cuda), autograd under the Autograd key (csrc/autograd.cpp);
// Python registers the fake kernels (fusedtie/ops.py).
#include <torch/library.h>

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
  // f(source) as a new tensor: the derived weight FusedTiedConv2d.weight reports, and to_conv2d().
  m.def("transform(Tensor source, str transform, float alpha) -> Tensor");
  // grad * f'(source): the fused chain-rule pass on its own.
  m.def("_transform_backward(Tensor grad, Tensor source, str transform, float alpha) -> Tensor");
}
