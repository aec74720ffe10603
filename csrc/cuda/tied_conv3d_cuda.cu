// fusedtie::tied_conv3d on CUDA: the library path shared with the CPU backend (library_conv.h) with
// the CUDA passes (elementwise.h): one transform kernel for f(W), cuDNN's convolution, one
// chain-rule kernel. The fused kernels are 2-d only, so the CUDA algorithm setting does not apply.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../conv_params.h"
#include "../fusedtie.h"
#include "../library_conv.h"
#include "elementwise.h"

namespace fusedtie {
namespace {

at::Tensor tied_conv3d_cuda(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            c10::string_view transform, double alpha, c10::string_view bias_transform,
                            double bias_alpha, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups) {
  const auto p =
      TiedConv3dParams::from_schema(transform, alpha, bias_transform, bias_alpha, stride, padding, dilation, groups);
  p.check(input, weight, bias);
  const c10::cuda::CUDAGuard guard(input.device());
  std::optional<at::Tensor> derived_bias;
  if (bias.has_value()) derived_bias = derived_for_conv(*bias, p.bias_transform, cuda::kCudaPasses);
  return tied_conv3d_library(input, weight, derived_bias, p, cuda::kCudaPasses);
}

OptionalGradients tied_conv3d_backward_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                            const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                            c10::string_view transform, double alpha, c10::string_view bias_transform,
                                            double bias_alpha, at::IntArrayRef stride, at::IntArrayRef padding,
                                            at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  const auto p =
      TiedConv3dParams::from_schema(transform, alpha, bias_transform, bias_alpha, stride, padding, dilation, groups);
  p.check_backward(grad_output, input, weight, bias, output_mask);
  const c10::cuda::CUDAGuard guard(input.device());
  return tied_conv3d_backward_library(grad_output, input, weight, bias, p, output_mask, cuda::kCudaPasses);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtie, CUDA, m) {
  register_kernel<ops::tied_conv3d>(m, "tied_conv3d", &tied_conv3d_cuda);
  register_kernel<ops::_tied_conv3d_backward>(m, "_tied_conv3d_backward", &tied_conv3d_backward_cuda);
}

}  // namespace fusedtie
