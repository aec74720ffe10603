// CPU implementation of the fusedtie operators. Each pass runs the algorithm conv_algorithm.cpp
// chooses: the library (f(W) in one vectorised pass, at::convolution, then f'(W) * dL/dW in one
// pass), the GEMM path (gemm_conv2d.h: the same passes around BLAS), the brgemm path
// (brgemm_conv2d.h: f and f' applied tile by tile inside the GEMMs) or the depthwise kernel
// (depthwise_conv2d.h: f and f' inside the convolution).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../conv_params.h"
#include "../fusedtie.h"
#include "../library_conv.h"
#include "brgemm_conv2d.h"
#include "conv_algorithm.h"
#include "depthwise_conv2d.h"
#include "gemm_conv2d.h"
#include "linear_conv2d.h"
#include "nonfinite.h"
#include "transform_tensors.h"

namespace fusedtie {
namespace {

at::Tensor transform_cpu(const at::Tensor& source, c10::string_view transform, double alpha) {
  check_supported_dtype(source.scalar_type(), "transform");
  const TransformSpec spec{parse_transform(transform), alpha};
  // An operator's output must not alias its input, so identity returns a copy.
  return spec.is_identity() ? source.clone() : apply_transform(source, spec);
}

at::Tensor transform_backward_cpu(const at::Tensor& grad, const at::Tensor& source, c10::string_view transform,
                                  double alpha) {
  check_transform_backward(grad, source);
  const TransformSpec spec{parse_transform(transform), alpha};
  // The result takes the source's layout whatever the gradient's (the fake kernel's rule), so the
  // gradient is copied once into that layout and the chain rule runs on the copy in place.
  at::Tensor out = at::empty_like(source);
  out.copy_(grad);
  return spec.is_identity() ? out : apply_chain_rule_in_place(out, source, spec);
}

at::Tensor tied_conv2d_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           c10::string_view transform, double alpha, c10::string_view bias_transform, double bias_alpha,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const auto p =
      TiedConv2dParams::from_schema(transform, alpha, bias_transform, bias_alpha, stride, padding, dilation, groups);
  p.check(input, weight, bias);
  const std::optional<at::Tensor> derived_bias = fusedtie::derived_bias(bias, p.bias_transform);
  const CpuConvAlgorithm algorithm = choose_algorithm(input, weight, p, ConvPass::kForward);
  // A matrix product (linear_conv2d.h): no padding, so no rule for non-finite values applies.
  if (algorithm == CpuConvAlgorithm::kLinear)
    return linear_conv2d_forward(input, weight, p.weight_transform, derived_bias);
  // The depthwise kernel applies f itself, as it loads each channel's weights. Its result, and the
  // GEMM's, stands unless the rule for non-finite values above sends the call to the library.
  if (algorithm == CpuConvAlgorithm::kDepthwise) {
    bool taps_finite = true;
    at::Tensor out = depthwise_conv2d_forward(input, weight, derived_bias, p, &taps_finite);
    if (taps_finite) return out;
  }
  // The brgemm path applies f to each weight tile as it packs it for oneDNN's micro-kernel.
  if (algorithm == CpuConvAlgorithm::kBrgemm) {
    at::Tensor out = brgemm_conv2d_forward(pad_asymmetric_remainder(input, p), weight, p.weight_transform, derived_bias,
                                           p.stride, p.symmetric_part(), p.dilation);
    if (!pads(p) || all_finite(out)) return out;
  }
  const at::Tensor weight_for_conv = derived_for_conv(weight, p.weight_transform, kCpuPasses);
  if (algorithm == CpuConvAlgorithm::kGemm) {
    at::Tensor out = gemm_conv2d_forward(pad_asymmetric_remainder(input, p), weight_for_conv, derived_bias, p.stride,
                                         p.symmetric_part(), p.dilation);
    if (!pads(p) || all_finite(out)) return out;
  }
  return library_conv_forward(input, weight_for_conv, derived_bias, p);
}

// (dL/dx, dL/dW_src, dL/d g(b)) by the gemm or the library algorithm, undefined where output_mask is
// false; f(W) recomputed for the input gradient only, as library_backward_through_transform does.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gemm_or_library_backward(
    CpuConvAlgorithm algorithm, const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const TiedConv2dParams& p, std::array<bool, 3> output_mask) {
  if (algorithm != CpuConvAlgorithm::kGemm) {
    return library_backward_through_transform(grad_output, input, weight, p, output_mask, kCpuPasses);
  }
  const at::Tensor weight_for_conv = output_mask[0] ? derived_for_conv(weight, p.weight_transform, kCpuPasses) : weight;
  auto [grad_input, grad_weight, grad_bias] =
      gemm_conv2d_backward(grad_output, pad_asymmetric_remainder(input, p), weight_for_conv, p.stride,
                           p.symmetric_part(), p.dilation, output_mask);
  if (output_mask[0]) grad_input = crop_input_gradient(grad_input, input, p);
  // grad_weight is a fresh tensor of the GEMM's, so the chain rule runs in place.
  if (output_mask[1]) grad_weight = gradient_through_transform(grad_weight, weight, p.weight_transform, kCpuPasses);
  return {grad_input, grad_weight, grad_bias};
}

OptionalGradients tied_conv2d_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                           const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                           c10::string_view transform, double alpha, c10::string_view bias_transform,
                                           double bias_alpha, at::IntArrayRef stride, at::IntArrayRef padding,
                                           at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  const auto p =
      TiedConv2dParams::from_schema(transform, alpha, bias_transform, bias_alpha, stride, padding, dilation, groups);
  p.check_backward(grad_output, input, weight, bias, output_mask);
  const CpuConvAlgorithm algorithm =
      choose_algorithm(input, weight, p, output_mask[0] ? ConvPass::kBackward : ConvPass::kWeightBackward);
  at::Tensor grad_input, grad_weight, grad_bias;  // dL/dx, dL/dW_src, dL/d g(b)
  // The gradients the library computes after all (nonfinite.h).
  std::array<bool, 3> by_library{false, false, false};
  if (algorithm == CpuConvAlgorithm::kLinear) {
    std::tie(grad_input, grad_weight, grad_bias) =
        linear_conv2d_backward(grad_output, input, weight, p.weight_transform, output_mask);
  } else if (algorithm == CpuConvAlgorithm::kDepthwise) {
    // The depthwise kernel applies f to the weights it reads and the chain rule to the weight
    // gradient it writes, and handles every padding itself.
    bool taps_finite = true;
    std::tie(grad_input, grad_weight, grad_bias) =
        depthwise_conv2d_backward(grad_output, input, weight, p, output_mask, &taps_finite);
    by_library[0] = output_mask[0] && !taps_finite;
    by_library[1] = output_mask[1] && !all_finite(grad_weight);
  } else if (algorithm == CpuConvAlgorithm::kBrgemm || algorithm == CpuConvAlgorithm::kGemm) {
    // Both pad by im2col: the same rule for non-finite values (nonfinite.h).
    by_library[1] = output_mask[1] && pads(p) && !all_finite(grad_output);
    const std::array<bool, 3> mask{output_mask[0], output_mask[1] && !by_library[1], output_mask[2]};
    if (algorithm == CpuConvAlgorithm::kBrgemm) {
      // f and f' are applied tile by tile inside the GEMMs.
      std::tie(grad_input, grad_weight, grad_bias) =
          brgemm_conv2d_backward(grad_output, pad_asymmetric_remainder(input, p), weight, p.weight_transform, p.stride,
                                 p.symmetric_part(), p.dilation, mask);
      if (output_mask[0]) grad_input = crop_input_gradient(grad_input, input, p);
    } else {
      std::tie(grad_input, grad_weight, grad_bias) =
          gemm_or_library_backward(algorithm, grad_output, input, weight, p, mask);
    }
  } else {
    by_library = output_mask;  // the library algorithm: every gradient
  }
  if (by_library[0] || by_library[1] || by_library[2]) {
    auto [library_input, library_weight, library_bias] =
        gemm_or_library_backward(CpuConvAlgorithm::kLibrary, grad_output, input, weight, p, by_library);
    if (by_library[0]) grad_input = library_input;
    if (by_library[1]) grad_weight = library_weight;
    if (by_library[2]) grad_bias = library_bias;
  }
  std::optional<at::Tensor> grad_input_out, grad_weight_out, grad_bias_out;
  if (output_mask[0]) grad_input_out = grad_input;
  if (output_mask[1]) grad_weight_out = grad_weight;
  // dL/db_src from dL/d g(b), a fresh tensor of the convolution's (so the chain rule runs in place).
  if (output_mask[2]) grad_bias_out = gradient_through_transform(grad_bias, *bias, p.bias_transform, kCpuPasses);
  return {grad_input_out, grad_weight_out, grad_bias_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtie, CPU, m) {
  register_kernel<ops::tied_conv2d>(m, "tied_conv2d", &tied_conv2d_cpu);
  register_kernel<ops::_tied_conv2d_backward>(m, "_tied_conv2d_backward", &tied_conv2d_backward_cpu);
  register_kernel<ops::transform>(m, "transform", &transform_cpu);
  register_kernel<ops::_transform_backward>(m, "_transform_backward", &transform_backward_cpu);
}

}  // namespace fusedtie
