#pragma once
// Each fusedtie operator's C++ entry, declared once (the schemas are in ops.cpp, which also defines
// these as calls through the dispatcher). Every kernel registered for an operator (CPU, CUDA,
// Autograd, Autocast) goes through register_kernel below, which checks at compile time that its
// signature is the one declared here; the autograd and autocast kernels and the _C module call the
// operators through these functions.
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <type_traits>

namespace fusedtie {

using OptionalTensor = std::optional<at::Tensor>;
// (dL/dinput, dL/dweight, dL/dbias), each present where output_mask asked for it.
using OptionalGradients = std::tuple<OptionalTensor, OptionalTensor, OptionalTensor>;

namespace ops {

at::Tensor tied_conv2d(const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias,
                       c10::string_view transform, double alpha, c10::string_view bias_transform, double bias_alpha,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

OptionalGradients _tied_conv2d_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                        const at::Tensor& weight, const OptionalTensor& bias,
                                        c10::string_view transform, double alpha, c10::string_view bias_transform,
                                        double bias_alpha, at::IntArrayRef stride, at::IntArrayRef padding,
                                        at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask);

at::Tensor tied_conv_transpose2d(const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias,
                                 c10::string_view transform, double alpha, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef output_padding, at::IntArrayRef dilation,
                                 int64_t groups);

OptionalGradients _tied_conv_transpose2d_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                                  const at::Tensor& weight, const OptionalTensor& bias,
                                                  c10::string_view transform, double alpha, at::IntArrayRef stride,
                                                  at::IntArrayRef padding, at::IntArrayRef output_padding,
                                                  at::IntArrayRef dilation, int64_t groups,
                                                  std::array<bool, 3> output_mask);

at::Tensor tied_conv3d(const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias,
                       c10::string_view transform, double alpha, c10::string_view bias_transform, double bias_alpha,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

OptionalGradients _tied_conv3d_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                        const at::Tensor& weight, const OptionalTensor& bias,
                                        c10::string_view transform, double alpha, c10::string_view bias_transform,
                                        double bias_alpha, at::IntArrayRef stride, at::IntArrayRef padding,
                                        at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask);

at::Tensor transform(const at::Tensor& source, c10::string_view transform, double alpha);

at::Tensor _transform_backward(const at::Tensor& grad, const at::Tensor& source, c10::string_view transform,
                               double alpha);

}  // namespace ops

// m.impl(name, kernel) for the operator declared above as `contract`, refusing at compile time a
// kernel whose signature differs from it.
template <auto& contract, typename Kernel>
void register_kernel(torch::Library& m, const char* name, Kernel* kernel) {
  static_assert(std::is_same_v<Kernel, std::remove_reference_t<decltype(contract)>>,
                "a fusedtie kernel's signature must be its operator's, as declared in csrc/fusedtie.h");
  m.impl(name, kernel);
}

}  // namespace fusedtie
