#pragma once
// The convolution on the derived weight through ATen (at::convolution and
// at::convolution_backward: oneDNN on the CPU, cuDNN on CUDA), shared by every backend's "library"
// algorithm: at::convolution pads symmetrically, so an asymmetric padding (padding="same" with even
// kernels) is padded explicitly by its remainder, and the input gradient cropped back.
#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "conv_params.h"

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

inline at::Tensor library_conv2d_forward(const at::Tensor& input, const at::Tensor& derived_weight,
                                         const std::optional<at::Tensor>& derived_bias, const TiedConv2dParams& p) {
  return at::convolution(pad_asymmetric_remainder(input, p), derived_weight, derived_bias, p.stride,
                         p.symmetric_part(), p.dilation, /*transposed=*/false, /*output_padding=*/{0, 0},
                         p.groups);
}

// (grad_input cropped to the input, dL/d f(W), dL/d g(b)); undefined where output_mask is false.
// `weight` is read only for the input gradient; the weight gradient needs its shape alone.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> library_conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const TiedConv2dParams& p,
    std::array<bool, 3> output_mask) {
  const std::vector<int64_t> bias_sizes{weight.size(0)};
  auto [grad_input, grad_weight, grad_bias] = at::convolution_backward(
      grad_output, pad_asymmetric_remainder(input, p), weight,
      output_mask[2] ? at::OptionalIntArrayRef(bias_sizes) : std::nullopt, p.stride, p.symmetric_part(),
      p.dilation, /*transposed=*/false, /*output_padding=*/{0, 0}, p.groups, output_mask);
  if (output_mask[0]) grad_input = crop_input_gradient(grad_input, input, p);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace fusedtie
