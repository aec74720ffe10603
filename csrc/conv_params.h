#pragma once
// The PyTorch-facing side of the operator: arguments bundled in one struct and checked in one place,
// before any kernel (CPU now, CUDA later) sees them.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <array>
#include <optional>
#include <sstream>
#include <string>

#include "transforms.h"
#include "user_transforms.h"

namespace fusedtie {

// Looks a transform up by name: the built-ins, then the user transforms registered in this process
// (user_transforms.h). An unknown name is a ValueError that lists the valid ones.
inline TransformKind parse_transform(c10::string_view name) {
  for (const auto& info : kTransforms) {
    if (name == info.name) return info.kind;
  }
  if (const auto user = find_user_transform(name)) return *user;
  std::ostringstream valid;
  for (int i = 0; i < kNumTransforms; ++i) valid << (i ? ", " : "") << kTransforms[i].name;
  for (const auto& user_name : user_transform_names()) valid << ", " << user_name;
  TORCH_CHECK_VALUE(false, "unknown transform '", std::string(name), "'; valid transforms: ", valid.str());
  return TransformKind::kIdentity;  // not reached: the check above throws
}

// The dtypes with transform passes and a convolution on every backend, listed once: the check below,
// the CUDA kernels' dispatch (FUSEDTIE_DISPATCH_SUPPORTED_TYPES) and the fused kernels' support test.
// fusedtie/ops.py's fake kernels repeat the check for tracing, where these kernels do not run.
inline bool is_supported_dtype(c10::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf;
}
#define FUSEDTIE_DISPATCH_SUPPORTED_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

inline void check_supported_dtype(c10::ScalarType dtype, const char* op) {
  TORCH_CHECK_TYPE(is_supported_dtype(dtype), "fusedtie::", op,
                   " supports floating-point tensors (float32, float64, bfloat16, "
                   "float16), got ",
                   dtype);
}

// The arguments of _transform_backward: a gradient shaped and typed like its source.
inline void check_transform_backward(const at::Tensor& grad, const at::Tensor& source) {
  check_supported_dtype(source.scalar_type(), "_transform_backward");
  TORCH_CHECK_VALUE(grad.sizes() == source.sizes(), "expected grad of size ", source.sizes(), ", got ", grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == source.scalar_type(), "expected grad of dtype ", source.scalar_type(),
                   ", got ", grad.scalar_type());
}

// Every convolution operator: a kernel with no taps has no meaning (F.conv2d answers with an
// IndexError from inside its kernel).
inline void check_kernel_not_empty(const at::Tensor& weight) {
  bool empty = false;
  std::string least = "1";
  for (int64_t d = 2; d < weight.dim(); ++d) {
    empty = empty || weight.size(d) == 0;
    if (d > 2) least += " x 1";
  }
  TORCH_CHECK_VALUE(!empty, "expected a kernel of at least ", least, ", got weight of size ", weight.sizes());
}

// The backward's own arguments, for every convolution operator: grad_output shaped, typed and
// placed like the forward's output, and a bias gradient asked for only when there is a bias.
inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input, at::IntArrayRef expected_size,
                              bool has_bias, std::array<bool, 3> output_mask) {
  TORCH_CHECK_VALUE(grad_output.sizes() == expected_size, "expected grad_output of size ", expected_size, ", got ",
                    grad_output.sizes());
  TORCH_CHECK_TYPE(grad_output.scalar_type() == input.scalar_type(), "expected grad_output of dtype ",
                   input.scalar_type(), ", got ", grad_output.scalar_type());
  TORCH_CHECK(grad_output.device() == input.device(), "expected grad_output on ", input.device(), ", got ",
              grad_output.device());
  TORCH_CHECK_VALUE(!output_mask[2] || has_bias, "output_mask asks for a bias gradient, but bias is None");
}

// A backend's elementwise passes over whole tensors (cpu/transform_tensors.h, cuda/elementwise.h;
// not cpu/transform_passes.h's raw per-instruction-set TransformPasses): f(source) for a
// tensor that the convolution consumes before the call returns (so the CPU may use its scratch
// buffer), and grad * f'(source) in grad's memory.
struct TensorPasses {
  at::Tensor (*transform_for_conv)(const at::Tensor& source, const TransformSpec& spec);
  at::Tensor (*chain_rule_in_place)(at::Tensor grad, const at::Tensor& source, const TransformSpec& spec);
};

// f(source) for a convolution to consume: the source itself for the identity.
inline at::Tensor derived_for_conv(const at::Tensor& source, const TransformSpec& spec, const TensorPasses& passes) {
  return spec.is_identity() ? source : passes.transform_for_conv(source, spec);
}

// dL/d source = f'(source) * dL/d f(source), laid out like the source (a weight's suggested format, a
// bias contiguous). grad must be a fresh tensor of the caller's (a convolution's gradient): the
// chain rule overwrites it.
inline at::Tensor gradient_through_transform(const at::Tensor& grad, const at::Tensor& source,
                                             const TransformSpec& spec, const TensorPasses& passes) {
  return (spec.is_identity() ? grad : passes.chain_rule_in_place(grad, source, spec))
      .contiguous(source.suggest_memory_format());
}

// The sizes joined by " x ", as F.conv2d's and F.conv3d's messages write them.
template <typename Sizes>
std::string joined_sizes(const Sizes& sizes) {
  std::ostringstream out;
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? " x " : "") << sizes[i];
  return out.str();
}

template <size_t N>
constexpr std::array<int64_t, N> filled(int64_t value) {
  std::array<int64_t, N> a{};
  a.fill(value);
  return a;
}

// Geometry and transforms of one convolution call of spatial rank N: tied_conv2d's
// (TiedConv2dParams) or tied_conv3d's (TiedConv3dParams), each naming its operator and layouts for
// the messages (Self::kOp, kInputLayout, kWeightLayout, kPaddingOrder). padding is (before, after)
// per spatial dimension, outermost first, so the asymmetric padding of padding="same" with even
// kernels is expressible.
template <size_t N, typename Self>
struct TiedConvParams {
  static constexpr size_t kRank = N;
  TransformSpec weight_transform;
  TransformSpec bias_transform;
  std::array<int64_t, N> stride = filled<N>(1);
  std::array<int64_t, 2 * N> padding = filled<2 * N>(0);
  std::array<int64_t, N> dilation = filled<N>(1);
  int64_t groups = 1;

  static Self from_schema(c10::string_view transform, double alpha, c10::string_view bias_transform, double bias_alpha,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
    Self p;
    p.weight_transform = {parse_transform(transform), alpha};
    p.bias_transform = {parse_transform(bias_transform), bias_alpha};
    TORCH_CHECK_VALUE(stride.size() == N, "stride must have ", N, " elements, got ", stride);
    TORCH_CHECK_VALUE(padding.size() == 2 * N, "padding must have ", 2 * N, " elements ", Self::kPaddingOrder, ", got ",
                      padding);
    TORCH_CHECK_VALUE(dilation.size() == N, "dilation must have ", N, " elements, got ", dilation);
    for (size_t i = 0; i < N; ++i) {
      TORCH_CHECK_VALUE(stride[i] > 0, "stride must be positive, got ", stride);
      TORCH_CHECK_VALUE(dilation[i] > 0, "dilation must be positive, got ", dilation);
      p.stride[i] = stride[i];
      p.dilation[i] = dilation[i];
    }
    for (size_t i = 0; i < 2 * N; ++i) {
      TORCH_CHECK_VALUE(padding[i] >= 0, "negative padding is not supported, got ", padding);
      p.padding[i] = padding[i];
    }
    TORCH_CHECK_VALUE(groups > 0, "groups must be a positive integer, got ", groups);
    p.groups = groups;
    return p;
  }

  bool symmetric_padding() const {
    for (size_t d = 0; d < N; ++d) {
      if (padding[2 * d] != padding[2 * d + 1]) return false;
    }
    return true;
  }
  // The padding at::convolution applies itself (the smaller side of each pair) ...
  std::array<int64_t, N> symmetric_part() const {
    std::array<int64_t, N> sym{};
    for (size_t d = 0; d < N; ++d) sym[d] = std::min(padding[2 * d], padding[2 * d + 1]);
    return sym;
  }
  // ... and what is left to pad explicitly, in at::constant_pad_nd order (the last dimension first:
  // left, right, top, bottom[, front, back]).
  std::array<int64_t, 2 * N> asymmetric_remainder() const {
    const auto sym = symmetric_part();
    std::array<int64_t, 2 * N> extra{};
    for (size_t d = 0; d < N; ++d) {
      extra[2 * (N - 1 - d)] = padding[2 * d] - sym[d];
      extra[2 * (N - 1 - d) + 1] = padding[2 * d + 1] - sym[d];
    }
    return extra;
  }

  // Checks every tensor against the geometry; the messages name the problem and the values.
  void check(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) const {
    constexpr int64_t dim = N + 2;
    TORCH_CHECK_VALUE(input.dim() == dim, "fusedtie::", Self::kOp, " expects a ", dim, "-D input ", Self::kInputLayout,
                      ", got input of size ", input.sizes());
    TORCH_CHECK_VALUE(weight.dim() == dim, "fusedtie::", Self::kOp, " expects a ", dim, "-D weight ",
                      Self::kWeightLayout, ", got weight of size ", weight.sizes());
    check_kernel_not_empty(weight);
    check_supported_dtype(input.scalar_type(), Self::kOp);
    TORCH_CHECK_TYPE(input.scalar_type() == weight.scalar_type(),
                     "expected input and weight to have the same dtype, got input ", input.scalar_type(),
                     " and weight ", weight.scalar_type());
    TORCH_CHECK(input.device() == weight.device(), "expected input and weight on the same device, got input on ",
                input.device(), " and weight on ", weight.device());
    const int64_t out_channels = weight.size(0);
    TORCH_CHECK_VALUE(out_channels % groups == 0, "out_channels (", out_channels, ") must be divisible by groups (",
                      groups, ")");
    TORCH_CHECK_VALUE(input.size(1) == weight.size(1) * groups, "Given groups=", groups, ", weight of size ",
                      weight.sizes(), ", expected input", input.sizes(), " to have ", weight.size(1) * groups,
                      " channels, but got ", input.size(1), " channels instead");
    if (bias.has_value()) {
      const at::Tensor& b = *bias;
      TORCH_CHECK_TYPE(b.scalar_type() == weight.scalar_type(),
                       "expected bias and weight to have the same dtype, got bias ", b.scalar_type(), " and weight ",
                       weight.scalar_type());
      TORCH_CHECK(b.device() == weight.device(), "expected bias and weight on the same device, got bias on ",
                  b.device(), " and weight on ", weight.device());
      TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == out_channels, "expected bias of size [", out_channels,
                        "] (out_channels), got ", b.sizes());
    }
    std::array<int64_t, N> padded{}, extent{};
    for (size_t d = 0; d < N; ++d) {
      // In 64 bits with overflow checks: a padding or dilation near 2^63 must be an error, not a
      // wrapped size that a kernel then indexes with.
      TORCH_CHECK(!c10::add_overflows(input.size(2 + d), padding[2 * d], &padded[d]) &&
                      !c10::add_overflows(padded[d], padding[2 * d + 1], &padded[d]) &&
                      !c10::mul_overflows(dilation[d], weight.size(2 + d) - 1, &extent[d]),
                  "fusedtie::", Self::kOp, ": the padded input or the dilated kernel overflows 64 bits (input ",
                  input.sizes(), ", kernel ", weight.sizes().slice(2), ", padding ", at::IntArrayRef(padding),
                  ", dilation ", at::IntArrayRef(dilation), ")");
      extent[d] += 1;
    }
    for (size_t d = 0; d < N; ++d) {
      TORCH_CHECK_VALUE(padded[d] >= extent[d], "Calculated padded input size per channel: (", joined_sizes(padded),
                        "). Kernel size: (", joined_sizes(extent),
                        "). Kernel size can't be greater than actual input size");
    }
    // output_size's arithmetic cannot overflow past the checks above; its product can.
    const auto out_sizes = output_size(input, weight);
    int64_t out_numel = 1;
    for (const int64_t size : out_sizes) {
      TORCH_CHECK(!c10::mul_overflows(out_numel, size, &out_numel), "fusedtie::", Self::kOp, ": the output of size ",
                  at::IntArrayRef(out_sizes), " has more elements than 64 bits can count");
    }
  }

  // Where a dimension has a single output position, every stride at least as large as the padded
  // input gives the same convolution. The library gets the smallest such stride: ATen's kernels
  // index with the stride and crash on huge ones (torch 2.13: stride 32768 on an 8x8 input).
  std::array<int64_t, N> library_stride(const at::Tensor& input, const at::Tensor& weight) const {
    std::array<int64_t, N> s = stride;
    for (size_t d = 0; d < N; ++d) {
      const int64_t span = input.size(2 + d) + padding[2 * d] + padding[2 * d + 1] -
                           dilation[d] * (weight.size(2 + d) - 1);  // >= 1 after check()
      s[d] = std::min(s[d], span);
    }
    return s;
  }

  // check() plus the backward's own arguments (check_grad_output).
  void check_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, std::array<bool, 3> output_mask) const {
    check(input, weight, bias);
    check_grad_output(grad_output, input, output_size(input, weight), bias.has_value(), output_mask);
  }

  std::array<int64_t, N + 2> output_size(const at::Tensor& input, const at::Tensor& weight) const {
    std::array<int64_t, N + 2> out{};
    out[0] = input.size(0);
    out[1] = weight.size(0);
    for (size_t d = 0; d < N; ++d) {
      const int64_t padded = input.size(2 + d) + padding[2 * d] + padding[2 * d + 1];
      out[2 + d] = (padded - dilation[d] * (weight.size(2 + d) - 1) - 1) / stride[d] + 1;
    }
    return out;
  }
};

// tied_conv2d's: padding is (top, bottom, left, right).
struct TiedConv2dParams : TiedConvParams<2, TiedConv2dParams> {
  static constexpr const char* kOp = "tied_conv2d";
  static constexpr const char* kInputLayout = "(N, C, H, W)";
  static constexpr const char* kWeightLayout = "(out_channels, in_channels/groups, kH, kW)";
  static constexpr const char* kPaddingOrder = "(top, bottom, left, right)";
};

// tied_conv3d's: padding is (front, back, top, bottom, left, right).
struct TiedConv3dParams : TiedConvParams<3, TiedConv3dParams> {
  static constexpr const char* kOp = "tied_conv3d";
  static constexpr const char* kInputLayout = "(N, C, D, H, W)";
  static constexpr const char* kWeightLayout = "(out_channels, in_channels/groups, kD, kH, kW)";
  static constexpr const char* kPaddingOrder = "(front, back, top, bottom, left, right)";
};

}  // namespace fusedtie
