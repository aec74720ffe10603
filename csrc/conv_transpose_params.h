#pragma once
// The arguments of fusedtie::tied_conv_transpose2d bundled in one struct and checked in one place,
// before any kernel (CPU or CUDA) sees them. The rules are F.conv_transpose2d's; the messages name
// the problem and the values. The transform parsing and dtype rule are conv_params.h's.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>

#include "conv_params.h"

namespace fusedtie {

// Geometry and transform of one tied_conv_transpose2d call: y = conv_transpose2d(x, f(W), b) with
// W the source weight (an encoder nn.Conv2d's: in_channels of this op x out_channels/groups x kH x kW).
// The bias is the decoder's own parameter, never derived from the source, so there is no bias
// transform.
struct TiedConvTranspose2dParams {
  TransformSpec weight_transform;
  std::array<int64_t, 2> stride{1, 1};
  std::array<int64_t, 2> padding{0, 0};
  std::array<int64_t, 2> output_padding{0, 0};
  std::array<int64_t, 2> dilation{1, 1};
  int64_t groups = 1;

  static TiedConvTranspose2dParams from_schema(c10::string_view transform, double alpha, at::IntArrayRef stride,
                                               at::IntArrayRef padding, at::IntArrayRef output_padding,
                                               at::IntArrayRef dilation, int64_t groups) {
    TiedConvTranspose2dParams p;
    p.weight_transform = {parse_transform(transform), alpha};
    TORCH_CHECK_VALUE(stride.size() == 2, "stride must have 2 elements, got ", stride);
    TORCH_CHECK_VALUE(padding.size() == 2, "padding must have 2 elements, got ", padding);
    TORCH_CHECK_VALUE(output_padding.size() == 2, "output_padding must have 2 elements, got ", output_padding);
    TORCH_CHECK_VALUE(dilation.size() == 2, "dilation must have 2 elements, got ", dilation);
    for (int d = 0; d < 2; ++d) {
      TORCH_CHECK_VALUE(stride[d] > 0, "stride must be positive, got ", stride);
      TORCH_CHECK_VALUE(dilation[d] > 0, "dilation must be positive, got ", dilation);
      TORCH_CHECK_VALUE(padding[d] >= 0, "negative padding is not supported, got ", padding);
      TORCH_CHECK_VALUE(output_padding[d] >= 0, "negative output_padding is not supported, got ", output_padding);
      // F.conv_transpose2d's rule: the extra rows and columns must fall within one stride (or one
      // dilation), else they would be positions no input pixel reaches.
      TORCH_CHECK_VALUE(output_padding[d] < stride[d] || output_padding[d] < dilation[d],
                        "output_padding must be smaller than either stride or dilation, got output_padding ",
                        output_padding, ", stride ", stride, ", dilation ", dilation);
      p.stride[d] = stride[d];
      p.padding[d] = padding[d];
      p.output_padding[d] = output_padding[d];
      p.dilation[d] = dilation[d];
    }
    TORCH_CHECK_VALUE(groups > 0, "groups must be a positive integer, got ", groups);
    p.groups = groups;
    return p;
  }

  // (N, weight.size(1) * groups, H_out, W_out), H_out = (H - 1) * stride - 2 * padding +
  // dilation * (kH - 1) + output_padding + 1, as F.conv_transpose2d.
  std::array<int64_t, 4> output_size(const at::Tensor& input, const at::Tensor& weight) const {
    std::array<int64_t, 4> out{input.size(0), weight.size(1) * groups, 0, 0};
    for (int d = 0; d < 2; ++d) {
      out[2 + d] = (input.size(2 + d) - 1) * stride[d] - 2 * padding[d] + dilation[d] * (weight.size(2 + d) - 1) +
                   output_padding[d] + 1;
    }
    return out;
  }

  // Checks every tensor against the geometry.
  void check(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) const {
    TORCH_CHECK_VALUE(input.dim() == 4, "fusedtie::tied_conv_transpose2d expects a 4-D input (N, C, H, W), got ",
                      "input of size ", input.sizes());
    TORCH_CHECK_VALUE(weight.dim() == 4,
                      "fusedtie::tied_conv_transpose2d expects a 4-D weight (in_channels, out_channels/groups, "
                      "kH, kW), got weight of size ",
                      weight.sizes());
    check_kernel_not_empty(weight);
    check_supported_dtype(input.scalar_type(), "tied_conv_transpose2d");
    TORCH_CHECK_TYPE(input.scalar_type() == weight.scalar_type(),
                     "expected input and weight to have the same dtype, got input ", input.scalar_type(),
                     " and weight ", weight.scalar_type());
    TORCH_CHECK(input.device() == weight.device(), "expected input and weight on the same device, got input on ",
                input.device(), " and weight on ", weight.device());
    const int64_t in_channels = weight.size(0);
    TORCH_CHECK_VALUE(in_channels % groups == 0, "in_channels (", in_channels, ", the weight's first dimension) ",
                      "must be divisible by groups (", groups, "), got weight of size ", weight.sizes());
    TORCH_CHECK_VALUE(input.size(1) == in_channels, "Given transposed=1, weight of size ", weight.sizes(),
                      ", expected input", input.sizes(), " to have ", in_channels, " channels, but got ", input.size(1),
                      " channels instead");
    const int64_t out_channels = weight.size(1) * groups;
    if (bias.has_value()) {
      const at::Tensor& b = *bias;
      TORCH_CHECK_TYPE(b.scalar_type() == weight.scalar_type(),
                       "expected bias and weight to have the same dtype, got bias ", b.scalar_type(), " and weight ",
                       weight.scalar_type());
      TORCH_CHECK(b.device() == weight.device(), "expected bias and weight on the same device, got bias on ",
                  b.device(), " and weight on ", weight.device());
      TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == out_channels, "expected bias of size [", out_channels,
                        "] (out_channels = weight.size(1) * groups), got ", b.sizes());
    }
    const auto out = output_size(input, weight);
    TORCH_CHECK_VALUE(out[2] > 0 && out[3] > 0, "Given input size per channel: (", input.size(2), " x ", input.size(3),
                      "). Calculated output size per channel: (", out[2], " x ", out[3], "). Output size is too small");
  }

  // check() plus the backward's own arguments (check_grad_output).
  void check_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, std::array<bool, 3> output_mask) const {
    check(input, weight, bias);
    check_grad_output(grad_output, input, output_size(input, weight), bias.has_value(), output_mask);
  }
};

}  // namespace fusedtie
