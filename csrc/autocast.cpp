// Autocast for fusedtie::tied_conv2d, fusedtie::tied_conv3d and fusedtie::tied_conv_transpose2d,
// registered under the AutocastCPU and AutocastCUDA keys. All follow the design below for the source
// weight; the transposed op's bias is its own parameter and is cast as it is.
//
// Under torch.autocast the built-in convolution is a "lower precision" op: every eligible floating
// argument (on the autocast device, not float64) is cast to the autocast dtype, leaf weights through
// autocast's per-region cast cache, and the convolution runs in that dtype. fusedtie does the same,
// with one difference the tie demands: the derived weight is f(W) computed in float32 and then
// rounded, round(f(W_fp32)), never f(round(W)) — for square, exp or tanh the two differ by up to
// an ulp of the low-precision dtype, and the unfused recipe F.conv2d(x, f(W)) under autocast
// rounds f(W) computed in the source's precision too.
//
// Design (decided here, for every transform, per tensor, weight and bias alike):
//   - f commutes with rounding (the catalog's column in transforms.h: identity, neg, abs, for which
//     round-to-nearest is symmetric, so round(f(w)) == f(round(w)) bit for bit, overflow and
//     subnormals included; relu, monotone with round(0) == 0, equal up to the sign of a zero): the source is cast
//     as the built-in conv casts its weight (at::autocast::cached_cast, sharing autocast's cache
//     with any other layer that casts the same parameter) and the operator runs *fused* in the
//     autocast dtype; its backward multiplies by f', which is exactly +-1 or 0 here, so nothing is
//     lost against a float32 chain rule.
//   - any other f: f(W) is computed in float32 by fusedtie::transform, cast to the autocast dtype,
//     and passed to tied_conv2d with the identity transform. This is *unfused* under autocast (one
//     transform pass and one cast, as the recipe), but it is the only way to keep f in float32
//     without a mixed-dtype kernel (float32 source, 16-bit activations) in every CPU and CUDA
//     path, which the operator does not have. Autograd records transform -> cast -> tied_conv2d,
//     so the source's gradient is f'(W_fp32) * float32(dL/df(W)) in float32, the chain rule in
//     float32 after the 16-bit convolution gradient, as for the built-in conv's weight. Memory:
//     the 16-bit f(W) is saved for backward, as the built-in conv saves its 16-bit weight cast.
// A source already in the autocast dtype (or not eligible: float64, another device) is left as it
// is and the operator runs fused on it, as outside autocast.
//
// Why C++ and not Python (torch.library.register_autocast only casts every input, which would give
// f(round(W))): the kernel is on the dispatcher, so every entry reaches it — torch.ops, the _C eager
// binding (fusedtie/ops.py), C++ callers, and torch.compile/export tracing, which run the
// dispatcher on fake tensors with autocast's keys active and record transform, _to_copy and
// tied_conv2d as this kernel calls them. The backward operators need no autocast kernel: their
// arguments already share one dtype, and autocast's fallthrough passes them on unchanged.
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>

#include "conv_params.h"
#include "fusedtie.h"

namespace fusedtie {
namespace {

// round(f(w)) == f(round(w)) for every w: the transforms that may be applied after the cast (the
// catalog's column in transforms.h; user transforms are not known to).
bool commutes_with_rounding(c10::string_view name) {
  const TransformKind kind = parse_transform(name);
  return !is_user_transform(kind) && kTransforms[static_cast<int32_t>(kind)].commutes_with_rounding;
}

// A source tensor as the operator should receive it under autocast, with the transform to apply.
struct Operand {
  at::Tensor tensor;
  c10::string_view transform;
  double alpha;
};

Operand autocast_operand(const at::Tensor& source, c10::string_view transform, double alpha, at::ScalarType dtype,
                         c10::DeviceType device_type) {
  if (!at::autocast::is_eligible(source, device_type) || source.scalar_type() == dtype ||
      commutes_with_rounding(transform)) {
    // cached_cast leaves ineligible tensors and tensors already in `dtype` as they are.
    return {at::autocast::cached_cast(dtype, source, device_type), transform, alpha};
  }
  return {ops::transform(source, transform, alpha).to(dtype), "identity", 1.0};
}

// What every autocast kernel here does first: leave autocast for the calls it makes, read the
// autocast dtype, and cast the operands as the built-in convolution casts its own.
template <c10::DeviceType device_type>
struct AutocastRegion {
  c10::impl::ExcludeDispatchKeyGuard no_autocast{at::autocast::get_autocast_dispatch_key_from_device_type(device_type)};
  at::ScalarType dtype = at::autocast::get_lower_precision_fp_from_device_type(device_type);

  // An activation, or a tensor the operator takes as it is (the transposed op's own bias).
  at::Tensor cast(const at::Tensor& t) const { return at::autocast::cached_cast(dtype, t, device_type); }
  // A source tensor with its transform f: round(f(W)), fused where f commutes with rounding.
  Operand operand(const at::Tensor& source, c10::string_view transform, double alpha) const {
    return autocast_operand(source, transform, alpha, dtype, device_type);
  }
};

// tied_conv2d's and tied_conv3d's (`op`: ops::tied_conv2d or ops::tied_conv3d, one signature).
template <c10::DeviceType device_type, auto& op>
at::Tensor tied_conv_autocast(const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias,
                              c10::string_view transform, double alpha, c10::string_view bias_transform,
                              double bias_alpha, at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t groups) {
  const AutocastRegion<device_type> region;
  const at::Tensor x = region.cast(input);
  const Operand w = region.operand(weight, transform, alpha);
  if (!bias.has_value()) {
    return op(x, w.tensor, std::nullopt, w.transform, w.alpha, bias_transform, bias_alpha, stride, padding, dilation,
              groups);
  }
  const Operand b = region.operand(*bias, bias_transform, bias_alpha);
  return op(x, w.tensor, b.tensor, w.transform, w.alpha, b.transform, b.alpha, stride, padding, dilation, groups);
}

// The transposed op's bias is the decoder's own parameter (no transform): it is cast like the
// built-in transposed convolution's bias.
template <c10::DeviceType device_type>
at::Tensor tied_conv_transpose2d_autocast(const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias,
                                          c10::string_view transform, double alpha, at::IntArrayRef stride,
                                          at::IntArrayRef padding, at::IntArrayRef output_padding,
                                          at::IntArrayRef dilation, int64_t groups) {
  const AutocastRegion<device_type> region;
  const at::Tensor x = region.cast(input);
  const Operand w = region.operand(weight, transform, alpha);
  const OptionalTensor b = bias.has_value() ? OptionalTensor(region.cast(*bias)) : std::nullopt;
  return ops::tied_conv_transpose2d(x, w.tensor, b, w.transform, w.alpha, stride, padding, output_padding, dilation,
                                    groups);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtie, AutocastCPU, m) {
  register_kernel<ops::tied_conv2d>(m, "tied_conv2d", &tied_conv_autocast<c10::DeviceType::CPU, ops::tied_conv2d>);
  register_kernel<ops::tied_conv3d>(m, "tied_conv3d", &tied_conv_autocast<c10::DeviceType::CPU, ops::tied_conv3d>);
  register_kernel<ops::tied_conv_transpose2d>(m, "tied_conv_transpose2d",
                                              &tied_conv_transpose2d_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(fusedtie, AutocastCUDA, m) {
  register_kernel<ops::tied_conv2d>(m, "tied_conv2d", &tied_conv_autocast<c10::DeviceType::CUDA, ops::tied_conv2d>);
  register_kernel<ops::tied_conv3d>(m, "tied_conv3d", &tied_conv_autocast<c10::DeviceType::CUDA, ops::tied_conv3d>);
  register_kernel<ops::tied_conv_transpose2d>(m, "tied_conv_transpose2d",
                                              &tied_conv_transpose2d_autocast<c10::DeviceType::CUDA>);
}

}  // namespace fusedtie
