#pragma once
// A 2-D convolution (groups 1, float32) as im2col and oneDNN's batch-reduce GEMM micro-kernel
// (at::native::cpublas::brgemm), with the tie inside the weight's packing: f is applied to each
// weight tile as it is copied into the cache-sized block the micro-kernel reads, and f' to each
// tile of the weight gradient right after the micro-kernel writes it. f(W) never exists as a
// tensor and the source weight is read once per pass, as the library reads it once for its own
// reorder. Inputs must be contiguous NCHW and the whole batch must form one column matrix (batch 1,
// or small outputs; im2col.h); padding is symmetric, as at::convolution takes it.
#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "../conv_params.h"

namespace fusedtie {

// Whether the brgemm path runs this convolution: float32, groups 1, NCHW, nothing empty, one
// column matrix for the batch.
bool brgemm_applies(const at::Tensor& input, const at::Tensor& weight, const TiedConv2dParams& p);

// Whether oneDNN's micro-kernel runs the GEMMs in this process (AVX2 or wider, oneDNN enabled);
// elsewhere ATen falls back to one BLAS call per tile, which is correct but not fast.
bool brgemm_micro_kernel_available();

// conv(input, f(source)) + bias, bias already transformed.
at::Tensor brgemm_conv2d_forward(const at::Tensor& input, const at::Tensor& source, const TransformSpec& f,
                                 const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation);

// (dL/dinput, dL/dsource, dL/d bias), each undefined where output_mask is false; the weight
// gradient is already through the chain rule.
std::tuple<at::Tensor, at::Tensor, at::Tensor> brgemm_conv2d_backward(const at::Tensor& grad_output,
                                                                      const at::Tensor& input, const at::Tensor& source,
                                                                      const TransformSpec& f, at::IntArrayRef stride,
                                                                      at::IntArrayRef padding, at::IntArrayRef dilation,
                                                                      std::array<bool, 3> output_mask);

}  // namespace fusedtie
