#pragma once
// The "linear" CPU algorithm: a convolution that is a matrix product, a 1x1 kernel on 1x1 images
// without padding and with one group (what fusedtie.tied_linear runs, on (N, C, 1, 1) views), for
// tied_conv2d and tied_conv_transpose2d alike. With at most kSkinnyMaxRows rows in the batch, the
// fused skinny GEMMs (skinny_gemm_impl.h) read W once per pass with f (and f') applied in
// registers, which is the memory-traffic floor of the product; with more, f(W) goes into the
// reused scratch buffer and BLAS (at::addmm, the call nn.Linear makes) does the product.
#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "../conv_params.h"
#include "../conv_transpose_params.h"

namespace fusedtie {

// Whether the linear algorithm runs this call: float32/float64, groups 1, 1x1 kernel and input,
// no padding (no output padding), nothing empty, NCHW (so the (N, C) matrices are views).
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
