// fusedtie::tied_conv_transpose2d on CUDA: per call and pass, the fused kernels (fused_conv2d.h: a
// transposed convolution is a convolution's input gradient, so the same kernels serve it with their
// roles swapped) or the library path shared with the CPU backend (library_conv.h: one transform
// kernel for f(W), cuDNN's transposed convolution, one chain-rule kernel), chosen per pass by the
// dispatch tied_conv2d uses too (dispatch.h, under the CUDA setting: algorithm_choice.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <ostream>

#include "../conv_transpose_params.h"
#include "../fusedtie.h"
#include "../library_conv.h"
#include "dispatch.h"
#include "elementwise.h"
#include "fused_conv2d.h"

namespace fusedtie {
namespace {

// What the dispatch (dispatch.h) needs to know of one tied_conv_transpose2d call. The forward runs
// the input-gradient kernels (tensor cores where the channels align), the backward the forward
// kernels for dx and the CUDA-core weight gradient.
struct ConvTranspose2dCall {
  static constexpr const char* kName = "conv_transpose2d";
  const at::Tensor& input;
  const at::Tensor& weight;
  const std::optional<at::Tensor>& bias;
  const TiedConvTranspose2dParams& p;

  bool fused_supported() const { return cuda::fused_transpose_supports(input, weight, p); }
  int64_t multiply_adds() const { return input.numel() * weight.size(1) * weight.size(2) * weight.size(3); }
  int64_t in_per_group() const { return weight.size(0) / p.groups; }
  int64_t out_per_group() const { return weight.size(1); }
  bool forward_on_tensor_cores() const { return cuda::mma_supports_transpose(input, weight, p, /*input_grad=*/false); }
  void describe_geometry(std::ostream& key) const {
    key << at::IntArrayRef(p.stride) << at::IntArrayRef(p.padding) << at::IntArrayRef(p.output_padding)
        << at::IntArrayRef(p.dilation) << p.groups << '|' << int(p.weight_transform.kind);
  }
};

OptionalGradients fused_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                                 const TiedConvTranspose2dParams& p, std::array<bool, 3> output_mask) {
  std::optional<at::Tensor> grad_input, grad_weight, grad_bias;
  if (output_mask[0]) grad_input = cuda::fused_transpose_input_grad(grad_output, input, weight, p);
  if (output_mask[1]) grad_weight = cuda::fused_transpose_weight_grad(grad_output, input, weight, p);
  // The bias is the decoder's own (no transform): its gradient is dy summed per channel.
  if (output_mask[2]) grad_bias = grad_output.sum({0, 2, 3});
  return {grad_input, grad_weight, grad_bias};
}

at::Tensor tied_conv_transpose2d_cuda(const at::Tensor& input, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, c10::string_view transform, double alpha,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
                                      at::IntArrayRef dilation, int64_t groups) {
  const auto p =
      TiedConvTranspose2dParams::from_schema(transform, alpha, stride, padding, output_padding, dilation, groups);
  p.check(input, weight, bias);
  const c10::cuda::CUDAGuard guard(input.device());
  return cuda::run_forward(
      ConvTranspose2dCall{input, weight, bias, p},
      [&] { return cuda::fused_transpose_forward(input, weight, bias, p); },
      [&] { return tied_conv_transpose2d_library(input, weight, bias, p, cuda::kCudaPasses); });
}

OptionalGradients tied_conv_transpose2d_backward_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                                      const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                      c10::string_view transform, double alpha, at::IntArrayRef stride,
                                                      at::IntArrayRef padding, at::IntArrayRef output_padding,
                                                      at::IntArrayRef dilation, int64_t groups,
                                                      std::array<bool, 3> output_mask) {
  const auto p =
      TiedConvTranspose2dParams::from_schema(transform, alpha, stride, padding, output_padding, dilation, groups);
  p.check_backward(grad_output, input, weight, bias, output_mask);
  const c10::cuda::CUDAGuard guard(input.device());
  return cuda::run_backward(
      ConvTranspose2dCall{input, weight, bias, p}, grad_output, output_mask,
      [&] { return fused_backward(grad_output, input, weight, p, output_mask); },
      [&] {
        return tied_conv_transpose2d_backward_library(grad_output, input, weight, p, output_mask, cuda::kCudaPasses);
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtie, CUDA, m) {
  register_kernel<ops::tied_conv_transpose2d>(m, "tied_conv_transpose2d", &tied_conv_transpose2d_cuda);
  register_kernel<ops::_tied_conv_transpose2d_backward>(m, "_tied_conv_transpose2d_backward",
                                                        &tied_conv_transpose2d_backward_cuda);
}

}  // namespace fusedtie
