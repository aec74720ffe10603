#pragma once
// A 2-D convolution (groups 1) as im2col and one BLAS GEMM per image, forward and backward. The
// weight is read as a [out_channels, in_channels*kh*kw] matrix exactly as the transform pass wrote
// it; no zero-filled accumulators, no re-packed weight. 1x1 kernels with stride 1 and no padding skip
// im2col (the image is already the matrix). Inputs must be contiguous NCHW; padding is symmetric
// (top = bottom, left = right), as at::convolution takes it.
#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>

namespace fusedtie {

// A 1x1 kernel with stride 1 and no padding (padding of any length: the operator's four sides or
// at::convolution's two): the image is already the GEMM's column matrix, with no im2col.
inline bool is_pointwise(int64_t kernel_h, int64_t kernel_w, at::IntArrayRef stride, at::IntArrayRef padding) {
  return kernel_h == 1 && kernel_w == 1 &&
         std::all_of(stride.begin(), stride.end(), [](int64_t s) { return s == 1; }) &&
         std::all_of(padding.begin(), padding.end(), [](int64_t p) { return p == 0; });
}

at::Tensor gemm_conv2d_forward(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation);

// (grad_input, grad_weight, grad_bias), each undefined where output_mask is false. `weight` is read
// only for grad_input; grad_weight needs its shape alone.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gemm_conv2d_backward(const at::Tensor& grad_output,
                                                                    const at::Tensor& input, const at::Tensor& weight,
                                                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                                                    at::IntArrayRef dilation,
                                                                    std::array<bool, 3> output_mask);

}  // namespace fusedtie
