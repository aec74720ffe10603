#pragma once
// The "linear" CPU algorithm: fused skinny GEMMs for a convolution that is a matrix product
// (matrix_product.h: a 1x1 kernel on 1x1 images, what fusedtie.tied_linear runs on (N, C, 1, 1)
// views) with at most kSkinnyMaxRows rows, for tied_conv2d and tied_conv_transpose2d alike. They
// apply f to each vector of W as they load it and f' to each vector of dW as they write it
// (skinny_gemm_impl.h), so W is read once per pass, which is the product's memory-traffic floor,
// and f(W) never exists; the input and weight gradients share one pass. With more rows the library
// path runs, which computes a matrix product as f(W) and BLAS (at::addmm, the call nn.Linear makes).
#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "../conv_params.h"
#include "../conv_transpose_params.h"

namespace fusedtie {

// Whether the linear algorithm runs this call: a matrix product, float32/float64, at most
// kSkinnyMaxRows rows, a built-in transform (user transforms have no vector functor).
bool linear_applies(const at::Tensor& input, const at::Tensor& weight, const TiedConv2dParams& p);
bool linear_applies(const at::Tensor& input, const at::Tensor& weight, const TiedConvTranspose2dParams& p);

// conv2d(input, f(source)) + bias (bias already through its own transform): (N, O, 1, 1).
at::Tensor linear_conv2d_forward(const at::Tensor& input, const at::Tensor& source, const TransformSpec& f,
                                 const std::optional<at::Tensor>& bias);
// (dL/dinput, dL/dsource, dL/d bias), each undefined where output_mask is false; the source's
// gradient already through the chain rule.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_conv2d_backward(const at::Tensor& grad_output,
                                                                      const at::Tensor& input, const at::Tensor& source,
                                                                      const TransformSpec& f,
                                                                      std::array<bool, 3> output_mask);

// conv_transpose2d(input, f(source)) + bias: (N, C, 1, 1) for a source (O, C, 1, 1) and input (N, O, 1, 1).
at::Tensor linear_conv_transpose2d_forward(const at::Tensor& input, const at::Tensor& source, const TransformSpec& f,
                                           const std::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_conv_transpose2d_backward(const at::Tensor& grad_output,
                                                                                const at::Tensor& input,
                                                                                const at::Tensor& source,
                                                                                const TransformSpec& f,
                                                                                std::array<bool, 3> output_mask);

}  // namespace fusedtie
