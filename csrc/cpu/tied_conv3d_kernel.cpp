// CPU implementation of fusedtie::tied_conv3d: the library path shared with the CUDA backend
// (library_conv.h) with the CPU's passes: f(W) in one parallel vectorised pass into this thread's
// scratch buffer, at::convolution (oneDNN), and the chain rule dL/dW_src = f'(W_src) * dL/df(W) as
// one pass over the weight gradient. fusedtie's GEMM, brgemm and depthwise kernels are 2-d only, so
// the CPU algorithm setting does not apply here.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../conv_params.h"
#include "../fusedtie.h"
#include "../library_conv.h"
#include "transform_tensors.h"

namespace fusedtie {
namespace {

at::Tensor tied_conv3d_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           c10::string_view transform, double alpha, c10::string_view bias_transform, double bias_alpha,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const auto p =
      TiedConv3dParams::from_schema(transform, alpha, bias_transform, bias_alpha, stride, padding, dilation, groups);
  p.check(input, weight, bias);
  return tied_conv3d_library(input, weight, derived_bias(bias, p.bias_transform), p, kCpuPasses);
}

OptionalGradients tied_conv3d_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                           const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                           c10::string_view transform, double alpha, c10::string_view bias_transform,
                                           double bias_alpha, at::IntArrayRef stride, at::IntArrayRef padding,
                                           at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  const auto p =
      TiedConv3dParams::from_schema(transform, alpha, bias_transform, bias_alpha, stride, padding, dilation, groups);
  p.check_backward(grad_output, input, weight, bias, output_mask);
  return tied_conv3d_backward_library(grad_output, input, weight, bias, p, output_mask, kCpuPasses);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtie, CPU, m) {
  register_kernel<ops::tied_conv3d>(m, "tied_conv3d", &tied_conv3d_cpu);
  register_kernel<ops::_tied_conv3d_backward>(m, "_tied_conv3d_backward", &tied_conv3d_backward_cpu);
}

}  // namespace fusedtie
