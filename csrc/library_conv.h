#pragma once
// The convolution on the derived weight through ATen (at::convolution and
// at::convolution_backward: oneDNN on the CPU, cuDNN on CUDA), shared by every backend's "library"
// algorithm: at::convolution pads symmetrically, so an asymmetric padding (padding="same" with even
// kernels) is padded explicitly by its remainder, and the input gradient cropped back. The
// transposed convolution (tied_conv_transpose2d) has only symmetric padding; it takes this path on
// the CPU always and on CUDA when the fused kernels do not run, with the backend's elementwise passes
// for f(W) and the chain rule (TensorPasses, conv_params.h).
#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "conv_params.h"
#include "conv_transpose_params.h"

namespace fusedtie {

// The input as at::convolution sees it: padded explicitly only by the part of an asymmetric padding
// that at::convolution's symmetric padding cannot express.
inline at::Tensor pad_asymmetric_remainder(const at::Tensor& input, const TiedConv2dParams& p) {
  if (p.symmetric_padding()) return input;
  const auto extra = p.asymmetric_remainder();
  return at::constant_pad_nd(input, {extra[0], extra[1], extra[2], extra[3]}, 0);
}

// The gradient of the explicitly padded input, cropped to the input and laid out in the input's
// suggested memory format (the rule the fake kernel states for every gradient).
inline at::Tensor crop_input_gradient(at::Tensor grad_input, const at::Tensor& input, const TiedConv2dParams& p) {
  if (!p.symmetric_padding()) {
    const auto extra = p.asymmetric_remainder();
    // A fresh tensor, not a view into the padded gradient (an empty view would keep its offset).
    grad_input = grad_input.narrow(2, extra[2], input.size(2))
                     .narrow(3, extra[0], input.size(3))
                     .clone(input.suggest_memory_format());
  }
  return grad_input.contiguous(input.suggest_memory_format());
}

// at::convolution_backward, given the bias's channel count rather than its sizes (it wants them only
// when the bias gradient is asked for).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> convolution_backward_with_bias_channels(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, int64_t bias_channels,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
    at::IntArrayRef output_padding, int64_t groups, std::array<bool, 3> output_mask) {
  const std::vector<int64_t> bias_sizes{bias_channels};
  return at::convolution_backward(grad_output, input, weight,
                                  output_mask[2] ? at::OptionalIntArrayRef(bias_sizes) : std::nullopt, stride, padding,
                                  dilation, transposed, output_padding, groups, output_mask);
}

inline at::Tensor library_conv2d_forward(const at::Tensor& input, const at::Tensor& derived_weight,
                                         const std::optional<at::Tensor>& derived_bias, const TiedConv2dParams& p) {
  return at::convolution(pad_asymmetric_remainder(input, p), derived_weight, derived_bias,
                         p.library_stride(input, derived_weight), p.symmetric_part(), p.dilation, /*transposed=*/false,
                         /*output_padding=*/{0, 0}, p.groups);
}

// (grad_input cropped to the input, dL/d f(W), dL/d g(b)); undefined where output_mask is false.
// `weight` is read only for the input gradient; the weight gradient needs its shape alone.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> library_conv2d_backward(const at::Tensor& grad_output,
                                                                              const at::Tensor& input,
                                                                              const at::Tensor& weight,
                                                                              const TiedConv2dParams& p,
                                                                              std::array<bool, 3> output_mask) {
  auto [grad_input, grad_weight, grad_bias] = convolution_backward_with_bias_channels(
      grad_output, pad_asymmetric_remainder(input, p), weight, /*bias_channels=*/weight.size(0),
      p.library_stride(input, weight), p.symmetric_part(), p.dilation, /*transposed=*/false, /*output_padding=*/{0, 0},
      p.groups, output_mask);
  if (output_mask[0]) grad_input = crop_input_gradient(grad_input, input, p);
  return {grad_input, grad_weight, grad_bias};
}

// --- tied_conv_transpose2d ---------------------------------------------------------------------
//
// The CPU backend always runs this library path (one f(W) pass, the library's transposed
// convolution, one chain-rule pass); the CUDA backend runs it or the fused kernels
// (csrc/cuda/tied_conv_transpose2d_cuda.cu).

inline at::Tensor tied_conv_transpose2d_library(const at::Tensor& input, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias,
                                                const TiedConvTranspose2dParams& p, const TensorPasses& passes) {
  return at::convolution(input, derived_for_conv(weight, p.weight_transform, passes), bias, p.stride, p.padding,
                         p.dilation, /*transposed=*/true, p.output_padding, p.groups);
}

// (dL/dx, dL/dW_src, dL/db) for the entries of output_mask that are true, None elsewhere; each
// laid out in its tensor's suggested memory format (the fake kernel's rule).
inline std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>
tied_conv_transpose2d_backward_library(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                                       const TiedConvTranspose2dParams& p, std::array<bool, 3> output_mask,
                                       const TensorPasses& passes) {
  // f(W) is recomputed rather than saved, and only for the input gradient: the weight gradient
  // reads W's shape alone, so the source weight stands in when the input gradient is not wanted.
  const at::Tensor weight_for_conv = output_mask[0] ? derived_for_conv(weight, p.weight_transform, passes) : weight;
  auto [grad_input, grad_weight, grad_bias] = convolution_backward_with_bias_channels(
      grad_output, input, weight_for_conv, /*bias_channels=*/weight.size(1) * p.groups, p.stride, p.padding, p.dilation,
      /*transposed=*/true, p.output_padding, p.groups, output_mask);
  std::optional<at::Tensor> grad_input_out, grad_weight_out, grad_bias_out;
  if (output_mask[0]) grad_input_out = grad_input.contiguous(input.suggest_memory_format());
  if (output_mask[1]) {
    grad_weight_out = gradient_through_transform(grad_weight, weight, p.weight_transform, passes);
  }
  if (output_mask[2]) grad_bias_out = grad_bias.contiguous();
  return {grad_input_out, grad_weight_out, grad_bias_out};
}

}  // namespace fusedtie
