// The fusedtie operators on CUDA: per call, the fused kernels (fused_conv2d.h) or "one transform
// kernel + cuDNN" (library_conv.h with elementwise.h), chosen per pass by the dispatch (dispatch.h)
// under the CUDA setting (algorithm_choice.h): a cost rule (auto), a measurement cached per shape
// (autotune), or forced.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <ostream>

#include "../conv_params.h"
#include "../fusedtie.h"
#include "../library_conv.h"
#include "dispatch.h"
#include "elementwise.h"
#include "fused_conv2d.h"

namespace fusedtie {
namespace {

// What the dispatch (dispatch.h) needs to know of one tied_conv2d call.
struct Conv2dCall {
  static constexpr const char* kName = "conv2d";
  const at::Tensor& input;
  const at::Tensor& weight;
  const std::optional<at::Tensor>& bias;
  const TiedConv2dParams& p;

  bool fused_supported() const { return cuda::fused_supports(input, weight, p); }
  int64_t multiply_adds() const {
    const auto out = p.output_size(input, weight);
    return out[0] * out[1] * out[2] * out[3] * weight.size(1) * weight.size(2) * weight.size(3);
  }
  int64_t in_per_group() const { return weight.size(1); }
  int64_t out_per_group() const { return weight.size(0) / p.groups; }
  bool forward_on_tensor_cores() const { return cuda::mma_supports(input, weight, p, /*input_grad=*/false); }
  void describe_geometry(std::ostream& key) const {
    key << at::IntArrayRef(p.stride) << at::IntArrayRef(p.padding) << at::IntArrayRef(p.dilation) << p.groups << '|'
        << int(p.weight_transform.kind) << '|' << int(p.bias_transform.kind);
  }
};

at::Tensor library_forward(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const TiedConv2dParams& p) {
  std::optional<at::Tensor> derived_bias;
  if (bias.has_value()) derived_bias = derived_for_conv(*bias, p.bias_transform, cuda::kCudaPasses);
  return library_conv_forward(input, derived_for_conv(weight, p.weight_transform, cuda::kCudaPasses), derived_bias, p);
}

using Gradients = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// dL/dx, dL/dW_src and dL/d g(b) (the bias chain rule is applied by the caller).
Gradients library_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                           const TiedConv2dParams& p, std::array<bool, 3> output_mask) {
  return library_backward_through_transform(grad_output, input, weight, p, output_mask, cuda::kCudaPasses);
}

Gradients fused_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                         const TiedConv2dParams& p, std::array<bool, 3> output_mask) {
  at::Tensor grad_input = output_mask[0] ? cuda::fused_input_grad(grad_output, input, weight, p) : at::Tensor();
  auto [grad_weight, grad_bias] =
      cuda::fused_weight_and_bias_grad(grad_output, input, weight, p, output_mask[1], output_mask[2]);
  if (output_mask[1]) grad_weight = grad_weight.contiguous(weight.suggest_memory_format());
  return {grad_input, grad_weight, grad_bias};
}

at::Tensor tied_conv2d_cuda(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            c10::string_view transform, double alpha, c10::string_view bias_transform,
                            double bias_alpha, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups) {
  const auto p =
      TiedConv2dParams::from_schema(transform, alpha, bias_transform, bias_alpha, stride, padding, dilation, groups);
  p.check(input, weight, bias);
  const c10::cuda::CUDAGuard guard(input.device());
  return cuda::run_forward(
      Conv2dCall{input, weight, bias, p}, [&] { return cuda::fused_forward(input, weight, bias, p); },
      [&] { return library_forward(input, weight, bias, p); });
}

OptionalGradients tied_conv2d_backward_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                            const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                            c10::string_view transform, double alpha, c10::string_view bias_transform,
                                            double bias_alpha, at::IntArrayRef stride, at::IntArrayRef padding,
                                            at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  const auto p =
      TiedConv2dParams::from_schema(transform, alpha, bias_transform, bias_alpha, stride, padding, dilation, groups);
  p.check_backward(grad_output, input, weight, bias, output_mask);
  const c10::cuda::CUDAGuard guard(input.device());
  auto [grad_input, grad_weight, grad_bias] = cuda::run_backward(
      Conv2dCall{input, weight, bias, p}, grad_output, output_mask,
      [&] { return fused_backward(grad_output, input, weight, p, output_mask); },
      [&] { return library_backward(grad_output, input, weight, p, output_mask); });
  std::optional<at::Tensor> grad_input_out, grad_weight_out, grad_bias_out;
  if (output_mask[0]) grad_input_out = grad_input;
  if (output_mask[1]) grad_weight_out = grad_weight;
  // grad_bias is a fresh tensor of the convolution's, so the chain rule runs in place.
  if (output_mask[2]) grad_bias_out = gradient_through_transform(grad_bias, *bias, p.bias_transform, cuda::kCudaPasses);
  return {grad_input_out, grad_weight_out, grad_bias_out};
}

at::Tensor transform_cuda(const at::Tensor& source, c10::string_view transform, double alpha) {
  check_supported_dtype(source.scalar_type(), "transform");
  const TransformSpec spec{parse_transform(transform), alpha};
  const c10::cuda::CUDAGuard guard(source.device());
  // An operator's output must not alias its input, so identity returns a copy.
  return spec.is_identity() ? source.clone() : cuda::apply_transform(source, spec);
}

at::Tensor transform_backward_cuda(const at::Tensor& grad, const at::Tensor& source, c10::string_view transform,
                                   double alpha) {
  check_transform_backward(grad, source);
  TORCH_CHECK(grad.device() == source.device(), "expected grad on ", source.device(), ", got ", grad.device());
  const TransformSpec spec{parse_transform(transform), alpha};
  const c10::cuda::CUDAGuard guard(source.device());
  // The result takes the source's layout (the fake kernel's rule): one copy, then the chain rule on it.
  at::Tensor out = at::empty_like(source);
  out.copy_(grad);
  return spec.is_identity() ? out : cuda::apply_chain_rule_in_place(out, source, spec);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtie, CUDA, m) {
  register_kernel<ops::tied_conv2d>(m, "tied_conv2d", &tied_conv2d_cuda);
  register_kernel<ops::_tied_conv2d_backward>(m, "_tied_conv2d_backward", &tied_conv2d_backward_cuda);
  register_kernel<ops::transform>(m, "transform", &transform_cuda);
  register_kernel<ops::_transform_backward>(m, "_transform_backward", &transform_backward_cuda);
}

}  // namespace fusedtie
