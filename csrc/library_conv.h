#pragma once
// The convolution on the derived weight through ATen (at::convolution and
// at::convolution_backward: oneDNN on the CPU, cuDNN on CUDA), shared by every backend's "library"
// algorithm: at::convolution pads symmetrically, so an asymmetric padding (padding="same" with even
// kernels) is padded explicitly by its remainder, and the input gradient cropped back; the same code
// serves tied_conv2d and tied_conv3d (whose CPU and CUDA kernels run only this path). The
// transposed convolution (tied_conv_transpose2d) has only symmetric padding; it takes this path on
// the CPU always and on CUDA when the fused kernels do not run, with the backend's elementwise passes
// for f(W) and the chain rule (TensorPasses, conv_params.h). A convolution that is a matrix product
// (fusedtie.tied_linear's) is computed by BLAS instead (matrix_product.h).
#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "conv_params.h"
#include "conv_transpose_params.h"
#include "matrix_product.h"
#include "fusedtie.h"

namespace fusedtie {

// The input as at::convolution sees it: padded explicitly only by the part of an asymmetric padding
// that at::convolution's symmetric padding cannot express. Params: TiedConv2dParams or
// TiedConv3dParams (conv_params.h).
template <typename Params>
at::Tensor pad_asymmetric_remainder(const at::Tensor& input, const Params& p) {
  if (p.symmetric_padding()) return input;
  const auto extra = p.asymmetric_remainder();
  return at::constant_pad_nd(input, extra, 0);
}

// The gradient of the explicitly padded input, cropped to the input and laid out in the input's
// suggested memory format (the rule the fake kernel states for every gradient).
template <typename Params>
at::Tensor crop_input_gradient(at::Tensor grad_input, const at::Tensor& input, const Params& p) {
  constexpr size_t N = Params::kRank;
  if (!p.symmetric_padding()) {
    const auto extra = p.asymmetric_remainder();  // the last dimension first
    for (size_t d = 0; d < N; ++d) grad_input = grad_input.narrow(2 + d, extra[2 * (N - 1 - d)], input.size(2 + d));
    // A fresh tensor, not a view into the padded gradient (an empty view would keep its offset).
    grad_input = grad_input.clone(input.suggest_memory_format());
  }
  return grad_input.contiguous(input.suggest_memory_format());
}

// --- Geometry that oneDNN mishandles, rewritten to the same convolution ------------------------
//
// Strides of kLargeStride or more go through windows where they exceed the kernel's extent e
// (dilation * (kernel - 1) + 1): output position o then reads only input[o*s, o*s + e), windows
// that do not overlap, so the convolution on the gathered windows with stride e is the same one.
// Why: oneDNN's strided kernels in torch 2.13 (brgconv_strided: a transposed convolution's forward,
// a convolution's input gradient) take time growing with the stride squared (a transposed
// convolution on 2x3x8x8 with stride (4096, 1): 0.44 s, against 0.01 s in float64, which does not
// use oneDNN) and write out of bounds from a stride of 2^15 along W. No network uses such strides,
// so the rewrite leaves every real shape alone (docs/cpu-algorithms.md, "Geometry oneDNN mishandles").
constexpr int64_t kLargeStride = 1024;

// The windows [o*step, o*step + extent) of dim, for o < count, laid end to end along dim, after
// `pad` zeros on each side of dim.
inline at::Tensor gather_windows(const at::Tensor& t, int64_t dim, int64_t pad, int64_t extent, int64_t step,
                                 int64_t count) {
  std::vector<int64_t> pads(2 * (t.dim() - dim), 0);  // constant_pad_nd's order: the last dimension first
  pads[pads.size() - 2] = pads[pads.size() - 1] = pad;
  return at::constant_pad_nd(t, pads, 0)
      .narrow(dim, 0, (count - 1) * step + extent)
      .unfold(dim, extent, step)
      .movedim(-1, dim + 1)
      .flatten(dim, dim + 1);
}

// The inverse: `windows` (count windows of extent end to end along dim) written into their places
// in zeros of size `padded` along dim, which then loses `crop` on each side.
inline at::Tensor scatter_windows(const at::Tensor& windows, int64_t dim, int64_t padded, int64_t crop, int64_t extent,
                                  int64_t step, int64_t count) {
  auto sizes = windows.sizes().vec();
  sizes[dim] = padded;
  at::Tensor full = at::zeros(sizes, windows.options());
  full.narrow(dim, 0, (count - 1) * step + extent)
      .unfold(dim, extent, step)
      .copy_(windows.unflatten(dim, {count, extent}).movedim(dim + 1, -1));
  return full.narrow(dim, crop, padded - 2 * crop);
}

inline int64_t kernel_extent(const at::Tensor& weight, int d, int64_t dilation) {
  return dilation * (weight.size(2 + d) - 1) + 1;
}

inline bool takes_windows(int64_t stride, int64_t extent) { return stride >= kLargeStride && stride > extent; }

// tied_conv2d's (tied_conv3d's) call of at::convolution: stride, padding and dilation as ATen gets
// them, and the input (asymmetric remainder padded, windows gathered) it reads.
template <typename Params>
struct LibraryConvCall {
  static constexpr size_t N = Params::kRank;
  std::array<int64_t, N> stride, padding, dilation;  // at::convolution's
  std::array<bool, N> windowed{};
  // Per windowed dimension: the window's extent and step (the operator's stride), their count (the
  // output positions), and the input's size once padded.
  std::array<int64_t, N> extent = filled<N>(1), step = filled<N>(1), positions = filled<N>(1), padded_size{};

  LibraryConvCall(const at::Tensor& input, const at::Tensor& weight, const Params& p)
      : stride(p.library_stride(input, weight)), padding(p.symmetric_part()), dilation(p.dilation) {
    const auto out = p.output_size(input, weight);
    for (size_t d = 0; d < N; ++d) {
      // One tap: the dilation means nothing. oneDNN's brg_conv_fwd (torch 2.13) writes through a null
      // pointer on a channels_last input with dilation 2 along a 1-wide kernel whose every output
      // column reads padding (tests/test_fuzz.py, channels-last-padding-only-columns-crash).
      if (weight.size(2 + d) == 1) dilation[d] = 1;
      extent[d] = kernel_extent(weight, d, dilation[d]);
      if (!takes_windows(stride[d], extent[d])) continue;
      windowed[d] = true;
      step[d] = stride[d];
      positions[d] = out[2 + d];
      padded_size[d] = input.size(2 + d) + p.padding[2 * d] + p.padding[2 * d + 1];
      stride[d] = extent[d];  // the windows laid end to end
      padding[d] = 0;         // applied by prepare
    }
  }

  bool any_windowed() const { return std::find(windowed.begin(), windowed.end(), true) != windowed.end(); }

  // The input at::convolution reads: the asymmetric remainder padded and, along a windowed
  // dimension, the symmetric padding too and the windows gathered.
  at::Tensor prepare(const at::Tensor& input, const Params& p) const {
    at::Tensor x = pad_asymmetric_remainder(input, p);
    if (!any_windowed()) return x;
    const auto sym = p.symmetric_part();
    for (size_t d = 0; d < N; ++d) {
      if (windowed[d]) x = gather_windows(x, 2 + d, sym[d], extent[d], step[d], positions[d]);
    }
    return x.contiguous(input.suggest_memory_format());
  }

  // The gradient of prepare's result, back on the input prepare padded by the asymmetric remainder
  // (crop_input_gradient removes that).
  at::Tensor restore(at::Tensor grad, const Params& p) const {
    const auto sym = p.symmetric_part();
    for (size_t d = 0; d < N; ++d) {
      if (windowed[d]) grad = scatter_windows(grad, 2 + d, padded_size[d], sym[d], extent[d], step[d], positions[d]);
    }
    return grad;
  }
};

// at::convolution_backward, given the bias's channel count rather than its sizes (it wants them only
// when the bias gradient is asked for).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> convolution_backward_with_bias_channels(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, int64_t bias_channels,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
    at::IntArrayRef output_padding, int64_t groups, std::array<bool, 3> output_mask) {
  const std::vector<int64_t> bias_sizes{bias_channels};
  return at::convolution_backward(grad_output, input, weight,
                                  output_mask[2] ? at::OptionalIntArrayRef(bias_sizes) : std::nullopt, stride, padding,
                                  dilation, transposed, output_padding, groups, output_mask);
}

// The convolution of tied_conv2d's and tied_conv3d's library algorithm, on tensors already derived.
template <typename Params>
at::Tensor library_conv_forward(const at::Tensor& input, const at::Tensor& derived_weight,
                                const std::optional<at::Tensor>& derived_bias, const Params& p) {
  if constexpr (Params::kRank == 2) {
    if (is_matrix_product(input, derived_weight, p)) {
      return matrix_product::conv2d_forward(input, derived_weight, derived_bias);
    }
  }
  const LibraryConvCall<Params> call(input, derived_weight, p);
  return at::convolution(call.prepare(input, p), derived_weight, derived_bias, call.stride, call.padding, call.dilation,
                         /*transposed=*/false, /*output_padding=*/filled<Params::kRank>(0), p.groups);
}

// (grad_input cropped to the input, dL/d f(W), dL/d g(b)); undefined where output_mask is false.
// `weight` is read only for the input gradient; the weight gradient needs its shape alone.
template <typename Params>
std::tuple<at::Tensor, at::Tensor, at::Tensor> library_conv_backward(const at::Tensor& grad_output,
                                                                     const at::Tensor& input, const at::Tensor& weight,
                                                                     const Params& p, std::array<bool, 3> output_mask) {
  if constexpr (Params::kRank == 2) {
    if (is_matrix_product(input, weight, p)) {
      return matrix_product::conv2d_backward(grad_output, input, weight, output_mask);
    }
  }
  const LibraryConvCall<Params> call(input, weight, p);
  auto [grad_input, grad_weight, grad_bias] = convolution_backward_with_bias_channels(
      grad_output, call.prepare(input, p), weight, /*bias_channels=*/weight.size(0), call.stride, call.padding,
      call.dilation, /*transposed=*/false, /*output_padding=*/filled<Params::kRank>(0), p.groups, output_mask);
  if (output_mask[0]) grad_input = crop_input_gradient(call.restore(grad_input, p), input, p);
  return {grad_input, grad_weight, grad_bias};
}

// library_conv_backward on the source weight: f(W) recomputed rather than saved by the forward (one
// pass over W, no memory held between the passes), and only for the input gradient, since the
// weight gradient reads W's shape alone; then the chain rule in place on the fresh dL/df(W).
// Returns (dL/dx, dL/dW_src, dL/d g(b)); the bias's chain rule is the caller's.
template <typename Params>
std::tuple<at::Tensor, at::Tensor, at::Tensor> library_backward_through_transform(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const Params& p,
    std::array<bool, 3> output_mask, const TensorPasses& passes) {
  const at::Tensor weight_for_conv = output_mask[0] ? derived_for_conv(weight, p.weight_transform, passes) : weight;
  auto [grad_input, grad_weight, grad_bias] =
      library_conv_backward(grad_output, input, weight_for_conv, p, output_mask);
  if (output_mask[1]) grad_weight = gradient_through_transform(grad_weight, weight, p.weight_transform, passes);
  return {grad_input, grad_weight, grad_bias};
}

// --- tied_conv_transpose2d ---------------------------------------------------------------------
//
// The CPU backend always runs this library path (one f(W) pass, the library's transposed
// convolution, one chain-rule pass); the CUDA backend runs it or the fused kernels
// (csrc/cuda/tied_conv_transpose2d_cuda.cu).

// tied_conv_transpose2d's call of at::convolution. Along a windowed dimension (see
// gather_windows) the transposed convolution runs with stride = extent and no padding, writing the
// windows end to end; spread puts them in their places, zeros between, and crops the padding.
struct LibraryConvTranspose2dCall {
  std::array<int64_t, 2> stride, padding, output_padding;  // at::convolution's
  std::array<bool, 2> windowed{false, false};
  // Per windowed dimension: extent and step of the windows, their count (the input's size), the
  // operator's padding, and the uncropped output's size.
  std::array<int64_t, 2> extent{1, 1}, step{1, 1}, count{1, 1}, crop{0, 0}, full_size{0, 0};

  LibraryConvTranspose2dCall(const at::Tensor& input, const at::Tensor& weight, const TiedConvTranspose2dParams& p)
      : stride(p.stride), padding(p.padding), output_padding(p.output_padding) {
    for (int d = 0; d < 2; ++d) {
      extent[d] = kernel_extent(weight, d, p.dilation[d]);
      if (!takes_windows(p.stride[d], extent[d])) continue;
      windowed[d] = true;
      step[d] = p.stride[d];
      count[d] = input.size(2 + d);
      crop[d] = p.padding[d];
      full_size[d] = (count[d] - 1) * step[d] + extent[d] + p.output_padding[d];
      stride[d] = extent[d];
      padding[d] = 0;
      output_padding[d] = 0;
    }
  }

  bool any_windowed() const { return windowed[0] || windowed[1]; }

  // at::convolution's result (windows end to end) spread to the operator's output, plus the bias.
  at::Tensor spread(at::Tensor out, const std::optional<at::Tensor>& bias, const at::Tensor& input) const {
    for (int d = 0; d < 2; ++d) {
      if (windowed[d]) out = scatter_windows(out, 2 + d, full_size[d], crop[d], extent[d], step[d], count[d]);
    }
    out = out.contiguous(input.suggest_memory_format());
    if (bias) out.add_(bias->view({1, -1, 1, 1}));
    return out;
  }

  // The operator's output gradient as at::convolution_backward sees it: the padding restored, the
  // windows gathered.
  at::Tensor gather(at::Tensor grad_output, const at::Tensor& input) const {
    if (!any_windowed()) return grad_output;
    for (int d = 0; d < 2; ++d) {
      if (windowed[d]) grad_output = gather_windows(grad_output, 2 + d, crop[d], extent[d], step[d], count[d]);
    }
    return grad_output.contiguous(input.suggest_memory_format());
  }
};

inline at::Tensor tied_conv_transpose2d_library(const at::Tensor& input, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias,
                                                const TiedConvTranspose2dParams& p, const TensorPasses& passes) {
  const at::Tensor derived = derived_for_conv(weight, p.weight_transform, passes);
  if (is_matrix_product(input, derived, p)) return matrix_product::conv_transpose2d_forward(input, derived, bias);
  const LibraryConvTranspose2dCall call(input, weight, p);
  if (!call.any_windowed()) {
    return at::convolution(input, derived, bias, p.stride, p.padding, p.dilation, /*transposed=*/true, p.output_padding,
                           p.groups);
  }
  return call.spread(at::convolution(input, derived, std::nullopt, call.stride, call.padding, p.dilation,
                                     /*transposed=*/true, call.output_padding, p.groups),
                     bias, input);
}

// (dL/dx, dL/dW_src, dL/db) for the entries of output_mask that are true, None elsewhere; each
// laid out in its tensor's suggested memory format (the fake kernel's rule).
inline std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>
tied_conv_transpose2d_backward_library(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                                       const TiedConvTranspose2dParams& p, std::array<bool, 3> output_mask,
                                       const TensorPasses& passes) {
  // f(W) is recomputed rather than saved, and only for the input gradient: the weight gradient
  // reads W's shape alone, so the source weight stands in when the input gradient is not wanted.
  const at::Tensor weight_for_conv = output_mask[0] ? derived_for_conv(weight, p.weight_transform, passes) : weight;
  const LibraryConvTranspose2dCall call(input, weight, p);
  at::Tensor grad_input, grad_weight, grad_bias;
  if (is_matrix_product(input, weight, p)) {
    std::tie(grad_input, grad_weight, grad_bias) =
        matrix_product::conv_transpose2d_backward(grad_output, input, weight_for_conv, output_mask);
  } else {
    // Windowed, the bias gradient is the whole output gradient's sum, not the gathered windows'.
    const std::array<bool, 3> library_mask{output_mask[0], output_mask[1], output_mask[2] && !call.any_windowed()};
    std::tie(grad_input, grad_weight, grad_bias) = convolution_backward_with_bias_channels(
        call.gather(grad_output, input), input, weight_for_conv, /*bias_channels=*/weight.size(1) * p.groups,
        call.stride, call.padding, p.dilation, /*transposed=*/true, call.output_padding, p.groups, library_mask);
  }
  std::optional<at::Tensor> grad_input_out, grad_weight_out, grad_bias_out;
  if (output_mask[0]) grad_input_out = grad_input.contiguous(input.suggest_memory_format());
  if (output_mask[1]) {
    grad_weight_out = gradient_through_transform(grad_weight, weight, p.weight_transform, passes);
  }
  if (output_mask[2]) {
    grad_bias_out = grad_bias.defined() ? grad_bias.contiguous() : grad_output.sum({0, 2, 3});
  }
  return {grad_input_out, grad_weight_out, grad_bias_out};
}

// --- tied_conv3d -------------------------------------------------------------------------------
//
// Both backends run this body, each with its elementwise passes (TensorPasses: csrc/cpu's
// kCpuPasses, csrc/cuda's kCudaPasses): f(W) in one pass, at::convolution (oneDNN on the CPU, cuDNN
// on CUDA), and the chain rule f'(W) * dL/df(W) in place on the weight gradient. The backends
// derive g(b) themselves (the CPU's f(W) lives in a scratch buffer that a second pass would reuse).

inline at::Tensor tied_conv3d_library(const at::Tensor& input, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& derived_bias, const TiedConv3dParams& p,
                                      const TensorPasses& passes) {
  return library_conv_forward(input, derived_for_conv(weight, p.weight_transform, passes), derived_bias, p);
}

// (dL/dx, dL/dW_src, dL/db_src) for the entries of output_mask that are true, None elsewhere; each
// laid out in its tensor's suggested memory format (the fake kernel's rule).
inline OptionalGradients tied_conv3d_backward_library(const at::Tensor& grad_output, const at::Tensor& input,
                                                      const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                      const TiedConv3dParams& p, std::array<bool, 3> output_mask,
                                                      const TensorPasses& passes) {
  auto [grad_input, grad_weight, grad_bias] =
      library_backward_through_transform(grad_output, input, weight, p, output_mask, passes);
  std::optional<at::Tensor> grad_input_out, grad_weight_out, grad_bias_out;
  if (output_mask[0]) grad_input_out = grad_input;
  if (output_mask[1]) grad_weight_out = grad_weight;
  // A fresh tensor of convolution_backward's, so the chain rule runs in place.
  if (output_mask[2]) grad_bias_out = gradient_through_transform(grad_bias, *bias, p.bias_transform, passes);
  return {grad_input_out, grad_weight_out, grad_bias_out};
}

}  // namespace fusedtie
