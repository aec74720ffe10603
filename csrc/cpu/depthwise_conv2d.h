#pragma once
// Depthwise convolution (groups == in_channels, one input channel per group, out_channels a multiple
// of in_channels) computed directly on NCHW planes, with the transform fused into it:
//   forward:         each task transforms its output channel's kh*kw source weights as it loads
//                    them, so f(W) never exists as a tensor;
//   weight gradient: each output channel's kh*kw sums are multiplied by f'(W_src) before they are
//                    written, so the kernel writes dL/dW_src itself.
// Why a kernel of our own: at::convolution on a float NCHW depthwise conv goes to oneDNN, which
// re-orders the activations into its blocked layout and back on every call; each plane here is a
// handful of vectorised row updates (docs/design.md, "A depthwise kernel of our own").
#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "../conv_params.h"

namespace fusedtie {

// Whether this kernel can run the convolution: depthwise, float32/float64, contiguous NCHW input and
// weight, nothing empty. Any stride, padding (including asymmetric), dilation and kernel size.
bool depthwise_applies(const at::Tensor& input, const at::Tensor& weight, const TiedConv2dParams& p);

// Both entry points set *taps_finite to whether every tap of f(W) they used was finite. The kernel
// multiplies zero padding (forward) and zero margins (input gradient) by the taps, so a non-finite tap
// gives NaN where F.conv2d may not; tied_conv2d_kernel.cpp's rule for non-finite values then has the
// library compute those results instead.

// conv(input, f(source_weight), bias) for a depthwise convolution; `bias` is already g(b).
at::Tensor depthwise_conv2d_forward(const at::Tensor& input, const at::Tensor& source_weight,
                                    const std::optional<at::Tensor>& bias, const TiedConv2dParams& p,
                                    bool* taps_finite);

// (grad_input, dL/dW_src, grad_bias), each undefined where output_mask is false. The weight gradient
// already carries the chain rule; the bias gradient does not (it is dL/d g(b), as for the library).
// Only the input gradient reads the taps (*taps_finite stays true without it).
std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& source_weight, const TiedConv2dParams& p,
    std::array<bool, 3> output_mask, bool* taps_finite);

}  // namespace fusedtie
