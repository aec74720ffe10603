// fusedtie::tied_conv_transpose2d on CUDA: one transform kernel for f(W) (elementwise.h), cuDNN's
// transposed convolution (at::convolution with transposed=true), one chain-rule kernel for
// f'(W) * dL/df(W): the library path shared with the CPU backend (library_conv.h).
//
// Fused CUDA kernels for the transposed convolution are out of scope for now: the CUDA algorithm
// setting (fusedtie.use_cuda_conv_algorithm) does not apply to this operator, which always runs the
// library path. (A convolution's input gradient is a transposed convolution, so fused_conv2d's
// input-gradient kernel is where a fused forward would start.)
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../conv_transpose_params.h"
#include "../library_conv.h"
#include "elementwise.h"

namespace fusedtie {
namespace {

constexpr TransformPasses kCudaPasses{&cuda::apply_transform, &cuda::apply_chain_rule_in_place};

at::Tensor tied_conv_transpose2d_cuda(const at::Tensor& input, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, c10::string_view transform, double alpha,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
                                      at::IntArrayRef dilation, int64_t groups) {
  const auto p =
      TiedConvTranspose2dParams::from_schema(transform, alpha, stride, padding, output_padding, dilation, groups);
  p.check(input, weight, bias);
  const c10::cuda::CUDAGuard guard(input.device());
  return tied_conv_transpose2d_library(input, weight, bias, p, kCudaPasses);
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>
tied_conv_transpose2d_backward_cuda(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, c10::string_view transform, double alpha,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
                                    at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  const auto p =
      TiedConvTranspose2dParams::from_schema(transform, alpha, stride, padding, output_padding, dilation, groups);
  p.check_backward(grad_output, input, weight, bias, output_mask);
  const c10::cuda::CUDAGuard guard(input.device());
  return tied_conv_transpose2d_backward_library(grad_output, input, weight, p, output_mask, kCudaPasses);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtie, CUDA, m) {
  m.impl("tied_conv_transpose2d", &tied_conv_transpose2d_cuda);
  m.impl("_tied_conv_transpose2d_backward", &tied_conv_transpose2d_backward_cuda);
}

}  // namespace fusedtie
