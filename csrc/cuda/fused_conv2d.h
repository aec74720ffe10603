#pragma once
// fusedtie's fused convolution kernels on CUDA: implicit GEMMs that read the source weight and apply
// f to each weight element as it is loaded into shared memory (f(W) never exists in global memory),
// and whose weight-gradient epilogue multiplies by f'(W_src) before writing dL/dW_src.
//   forward:          out = conv(x, f(W)) + g(b), g applied in the epilogue;
//   input gradient:   dx = conv^T(dy, f(W)), the same kernel gathering dy instead of x;
//   weight gradient:  dW_src = f'(W) * (dy (x) x), split over N*OH*OW into partial sums reduced in a
//                     fixed order (no atomics: bitwise repeatable, so deterministic mode needs no
//                     other path); the bias gradient by a fixed-order reduction per channel.
// Two implementations: tensor cores (mma.sync; fused_conv2d_mma.cu) for float16/bfloat16, and for
// float32 when TF32 is allowed, where the layout and channel counts allow 16-byte loads; and a CUDA-core
// kernel (fused_conv2d_simt.cu) for every other case, float64 and exact float32 included.
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "../conv_params.h"
#include "../conv_transpose_params.h"

namespace fusedtie {
namespace cuda {

// Everything a kernel needs of one call, in elements. The strides of x, y (the output, or dy) and w
// are the tensors' own, so any layout is read and written in place.
struct ConvGeometry {
  int64_t batch, in_channels, in_h, in_w, out_channels, out_h, out_w;
  int64_t in_per_group, out_per_group;
  int kernel_h, kernel_w, stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w, groups;
  int64_t x_stride[4], y_stride[4], w_stride[4];
};

// The geometry of conv(input, weight) under p, reading/writing x (input-shaped) and y
// (output-shaped) through the given strides.
ConvGeometry make_geometry(const at::Tensor& input, const at::Tensor& weight, const TiedConv2dParams& p,
                           at::IntArrayRef x_strides, at::IntArrayRef y_strides);

// The fused kernels handle every call the operator accepts on CUDA tensors except empty ones and
// sizes past their 32-bit geometry and grid limits.
bool fused_supports(const at::Tensor& input, const at::Tensor& weight, const TiedConv2dParams& p);

// Whether cuDNN may use TF32 for float32 convolutions (torch.backends.cudnn.conv's setting), the
// rule the tensor-core kernels follow for float32.
bool allow_tf32();

// Whether the tensor-core kernels were compiled for this device (sm_80 or newer code in the
// binary, and a device of compute capability 8.0 or newer).
bool mma_kernels_available();

// Whether the tensor-core kernels run this call's forward / input gradient (else the CUDA-core one).
bool mma_supports(const at::Tensor& input, const at::Tensor& weight, const TiedConv2dParams& p, bool input_grad);

at::Tensor fused_forward(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const TiedConv2dParams& p);
at::Tensor fused_input_grad(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                            const TiedConv2dParams& p);
// (dL/dW_src with the chain rule applied, dL/d g(b) without it); each undefined when not asked for.
std::tuple<at::Tensor, at::Tensor> fused_weight_and_bias_grad(const at::Tensor& grad_output, const at::Tensor& input,
                                                              const at::Tensor& weight, const TiedConv2dParams& p,
                                                              bool weight_grad, bool bias_grad);

// The transposed convolution y = conv_transpose2d(x, f(W), b) with the same kernels. It is the input
// gradient of the convolution c = conv(., W) (stride, padding, dilation, groups alike) taken at
// c's output x, so:
//   forward:          y = the input-gradient kernels on x, writing y, with b added in their epilogue;
//   input gradient:   dx = conv(dy, f(W)), the forward kernels on dy;
//   weight gradient:  dW_src = f'(W) * (x (x) dy), the weight-gradient kernels with x in the place of
//                     the output gradient and dy in the place of the input.
// The convolution c of a transposed call (no bias transform: the decoder's bias is its own).
TiedConv2dParams convolution_of_transpose(const TiedConvTranspose2dParams& p);
// The fused kernels handle the call: fused_supports for c, and output_padding below the stride
// (rows past the last stride step are rows c would not read, so c's output would not be x's size).
bool fused_transpose_supports(const at::Tensor& input, const at::Tensor& weight, const TiedConvTranspose2dParams& p);
// Whether the tensor-core kernels run this transposed call's forward (input_grad false) or its input
// gradient (true); else the CUDA-core ones.
bool mma_supports_transpose(const at::Tensor& input, const at::Tensor& weight, const TiedConvTranspose2dParams& p,
                            bool input_grad);
at::Tensor fused_transpose_forward(const at::Tensor& input, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const TiedConvTranspose2dParams& p);
at::Tensor fused_transpose_input_grad(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                                      const TiedConvTranspose2dParams& p);
// dL/dW_src with the chain rule applied, in the source weight's layout.
at::Tensor fused_transpose_weight_grad(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                                       const TiedConvTranspose2dParams& p);

// The CUDA-core and tensor-core launchers behind fused_forward / fused_input_grad (internal).
void launch_simt_conv(const at::Tensor& src, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const at::Tensor& dst, const ConvGeometry& g, TransformSpec weight_transform,
                      TransformSpec bias_transform, bool input_grad);
void launch_mma_conv(const at::Tensor& src, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     const at::Tensor& dst, const ConvGeometry& g, TransformSpec weight_transform,
                     TransformSpec bias_transform, bool input_grad);

}  // namespace cuda
}  // namespace fusedtie
