#pragma once
// A convolution that is a matrix product: a 1x1 kernel on 1x1 images, no padding, one group, NCHW
// (what fusedtie.tied_linear runs on (N, C, 1, 1) views). The library path of every backend
// (library_conv.h) computes it with at::addmm / at::mm on (N, C) views, the calls nn.Linear makes
// (MKL or OpenBLAS on the CPU, cuBLAS on CUDA), rather than at::convolution, which would treat it
// as a convolution (oneDNN re-packs W on every call: 2.9x nn.Linear on 4096x4096 at batch 64,
// docs/cpu-algorithms.md). The CPU's linear algorithm (cpu/linear_conv2d.h) fuses f into it up to
// 8 rows. Every function here takes the derived weight f(W), as the library path has it.
#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "conv_params.h"
#include "conv_transpose_params.h"

namespace fusedtie {

// Whether input and weight are both NCHW in the sense at::convolution decides its output layout by
// (suggest_memory_format, not is_contiguous): fusedtie's own CPU kernels and the matrix product
// write NCHW results, so they may run only where F.conv2d (and the fake kernel) would give NCHW too.
// is_contiguous() alone is not enough: a 1x1 or depthwise (C, 1, kH, kW) weight converted to
// channels_last (as module.to(memory_format=torch.channels_last) does) is "contiguous" too, since
// strides of size-1 dimensions do not count, yet at::convolution treats it as channels_last and
// returns a channels_last output.
inline bool is_nchw_call(const at::Tensor& input, const at::Tensor& weight) {
  return input.is_contiguous() && weight.is_contiguous() &&
         input.suggest_memory_format() == at::MemoryFormat::Contiguous &&
         weight.suggest_memory_format() == at::MemoryFormat::Contiguous;
}

namespace matrix_product {

inline bool one_by_one(const at::Tensor& input, const at::Tensor& weight) {
  return input.size(2) == 1 && input.size(3) == 1 && weight.size(2) == 1 && weight.size(3) == 1 && input.numel() > 0 &&
         weight.numel() > 0 && is_nchw_call(input, weight);
}

// A matrix view (rows, cols) of a dense NCHW tensor with 1x1 images, and back.
inline at::Tensor as_matrix(const at::Tensor& t) { return t.reshape({t.size(0), t.size(1)}); }
inline at::Tensor as_images(const at::Tensor& m) { return m.view({m.size(0), m.size(1), 1, 1}); }

}  // namespace matrix_product

inline bool is_matrix_product(const at::Tensor& input, const at::Tensor& weight, const TiedConv2dParams& p) {
  return p.groups == 1 && p.padding == std::array<int64_t, 4>{0, 0, 0, 0} && matrix_product::one_by_one(input, weight);
}

inline bool is_matrix_product(const at::Tensor& input, const at::Tensor& weight, const TiedConvTranspose2dParams& p) {
  return p.groups == 1 && p.padding == std::array<int64_t, 2>{0, 0} &&
         p.output_padding == std::array<int64_t, 2>{0, 0} && matrix_product::one_by_one(input, weight);
}

namespace matrix_product {

// conv2d(input, derived) + bias = x f(W)^T + b.
inline at::Tensor conv2d_forward(const at::Tensor& input, const at::Tensor& derived,
                                 const std::optional<at::Tensor>& bias) {
  const at::Tensor x = as_matrix(input), w = as_matrix(derived);
  return as_images(bias.has_value() ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t()));
}

// (dL/dx, dL/d f(W), dL/db), undefined where output_mask is false; `weight` (f(W)) is read only for
// dL/dx, its shape otherwise. dL/d f(W) is a fresh tensor (the caller's chain rule runs in place).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward(const at::Tensor& grad_output,
                                                                      const at::Tensor& input, const at::Tensor& weight,
                                                                      std::array<bool, 3> output_mask) {
  const at::Tensor dy = as_matrix(grad_output);  // (M, O)
  at::Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0]) grad_input = as_images(at::mm(dy, as_matrix(weight)));
  if (output_mask[1]) grad_weight = at::mm(dy.t(), as_matrix(input)).view(weight.sizes());
  if (output_mask[2]) grad_bias = dy.sum(0);
  return {grad_input, grad_weight, grad_bias};
}

// conv_transpose2d(input, derived) + bias = x f(W) + b, for f(W) (O, C, 1, 1) and input (N, O, 1, 1).
inline at::Tensor conv_transpose2d_forward(const at::Tensor& input, const at::Tensor& derived,
                                           const std::optional<at::Tensor>& bias) {
  const at::Tensor x = as_matrix(input), w = as_matrix(derived);
  return as_images(bias.has_value() ? at::addmm(*bias, x, w) : at::mm(x, w));
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_transpose2d_backward(const at::Tensor& grad_output,
                                                                                const at::Tensor& input,
                                                                                const at::Tensor& weight,
                                                                                std::array<bool, 3> output_mask) {
  const at::Tensor dy = as_matrix(grad_output);  // (M, C)
  at::Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0]) grad_input = as_images(at::mm(dy, as_matrix(weight).t()));
  if (output_mask[1]) grad_weight = at::mm(as_matrix(input).t(), dy).view(weight.sizes());
  if (output_mask[2]) grad_bias = dy.sum(0);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace matrix_product
}  // namespace fusedtie
