// CPU implementation of fusedtie::tied_conv_transpose2d (the decoder of a tied autoencoder): the
// linear algorithm (linear_conv2d.h) for a matrix product (a tied Linear decoder), else
// f(W) in one parallel vectorised pass into this thread's scratch buffer, the transposed
// convolution by ATen (at::convolution with transposed=true: oneDNN), and the chain rule
// dL/dW_src = f'(W_src) * dL/df(W) as one pass over the weight gradient. The library path itself is
// shared with the CUDA backend (library_conv.h); fusedtie's GEMM and depthwise kernels are for the
// forward convolution only.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../conv_transpose_params.h"
#include "../fusedtie.h"
#include "../library_conv.h"
#include "conv_algorithm.h"
#include "linear_conv2d.h"
#include "transform_tensors.h"

namespace fusedtie {
namespace {

at::Tensor tied_conv_transpose2d_cpu(const at::Tensor& input, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, c10::string_view transform, double alpha,
                                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
                                     at::IntArrayRef dilation, int64_t groups) {
  const auto p =
      TiedConvTranspose2dParams::from_schema(transform, alpha, stride, padding, output_padding, dilation, groups);
  p.check(input, weight, bias);
  if (choose_algorithm(input, weight, p) == CpuConvAlgorithm::kLinear) {
    return linear_conv_transpose2d_forward(input, weight, p.weight_transform, bias);
  }
  return tied_conv_transpose2d_library(input, weight, bias, p, kCpuPasses);
}

OptionalGradients tied_conv_transpose2d_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                                     const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                     c10::string_view transform, double alpha, at::IntArrayRef stride,
                                                     at::IntArrayRef padding, at::IntArrayRef output_padding,
                                                     at::IntArrayRef dilation, int64_t groups,
                                                     std::array<bool, 3> output_mask) {
  const auto p =
      TiedConvTranspose2dParams::from_schema(transform, alpha, stride, padding, output_padding, dilation, groups);
  p.check_backward(grad_output, input, weight, bias, output_mask);
  if (choose_algorithm(input, weight, p) == CpuConvAlgorithm::kLinear) {
    auto [grad_input, grad_weight, grad_bias] =
        linear_conv_transpose2d_backward(grad_output, input, weight, p.weight_transform, output_mask);
    OptionalGradients out;
    if (output_mask[0]) std::get<0>(out) = grad_input;
    if (output_mask[1]) std::get<1>(out) = grad_weight;
    if (output_mask[2]) std::get<2>(out) = grad_bias;
    return out;
  }
  return tied_conv_transpose2d_backward_library(grad_output, input, weight, p, output_mask, kCpuPasses);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtie, CPU, m) {
  register_kernel<ops::tied_conv_transpose2d>(m, "tied_conv_transpose2d", &tied_conv_transpose2d_cpu);
  register_kernel<ops::_tied_conv_transpose2d_backward>(m, "_tied_conv_transpose2d_backward",
                                                        &tied_conv_transpose2d_backward_cpu);
}

}  // namespace fusedtie
