// See fused_conv2d.h: the host side of the fused kernels (which kernel runs, layouts, geometry).
// Host code only, free of CUDA runtime calls (cuda_emulation.h), so that tests/cuda_emulation/ runs
// it too.
#include "fused_conv2d.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "cuda_emulation.h"

namespace fusedtie {
namespace cuda {
namespace {

constexpr int64_t kMaxGridYZ = 65535;

bool aligned_16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; }

// A channels-last, 16-byte aligned copy of t (t itself when it already is one).
at::Tensor channels_last_aligned(const at::Tensor& t) {
  at::Tensor out = t.contiguous(at::MemoryFormat::ChannelsLast);
  return aligned_16(out) ? out : out.clone(at::MemoryFormat::ChannelsLast);
}

// The fused kernels know the built-ins only (their dispatch_transform would compute the identity for
// a user kind): fused_supports refuses user transforms, and this is the last line of defence.
TransformSpec device_transform(const TransformSpec& spec) {
  TORCH_INTERNAL_ASSERT(!is_user_transform(spec.kind), "fusedtie: a user transform reached the fused CUDA kernels");
  return spec;
}

}  // namespace

ConvGeometry make_geometry(const at::Tensor& input, const at::Tensor& weight, const TiedConv2dParams& p,
                           at::IntArrayRef x_strides, at::IntArrayRef y_strides) {
  const auto out = p.output_size(input, weight);
  ConvGeometry g{};
  g.batch = input.size(0);
  g.in_channels = input.size(1);
  g.in_h = input.size(2);
  g.in_w = input.size(3);
  g.out_channels = weight.size(0);
  g.out_h = out[2];
  g.out_w = out[3];
  g.in_per_group = weight.size(1);
  g.out_per_group = weight.size(0) / p.groups;
  g.kernel_h = static_cast<int>(weight.size(2));
  g.kernel_w = static_cast<int>(weight.size(3));
  g.stride_h = static_cast<int>(p.stride[0]);
  g.stride_w = static_cast<int>(p.stride[1]);
  g.pad_top = static_cast<int>(p.padding[0]);
  g.pad_left = static_cast<int>(p.padding[2]);
  g.dilation_h = static_cast<int>(p.dilation[0]);
  g.dilation_w = static_cast<int>(p.dilation[1]);
  g.groups = static_cast<int>(p.groups);
  for (int d = 0; d < 4; ++d) {
    g.x_stride[d] = x_strides[d];
    g.y_stride[d] = y_strides[d];
    g.w_stride[d] = weight.stride(d);
  }
  return g;
}

bool allow_tf32() { return at::globalContext().allowTF32CuDNN(at::Float32Op::CONV); }

bool fused_supports(const at::Tensor& input, const at::Tensor& weight, const TiedConv2dParams& p) {
  // User transforms run the library path: their f is an elementwise kernel of their own (or a chain
  // composed in elementwise.cu), which these kernels cannot call while loading weight tiles.
  if (is_user_transform(p.weight_transform.kind) || is_user_transform(p.bias_transform.kind)) return false;
  const auto dtype = input.scalar_type();
  if (!is_supported_dtype(dtype)) return false;
  if (input.numel() == 0 || weight.numel() == 0) return false;
  // The kernels keep geometry and the GEMM's K index in 32-bit ints, and groups and channel tiles
  // in grid dimensions (at most 65535 in y and z).
  const int64_t taps = weight.size(2) * weight.size(3);
  const int64_t groups = p.groups, in_per_group = weight.size(1), out_per_group = weight.size(0) / groups;
  for (int d = 0; d < 2; ++d) {
    if (p.stride[d] > INT_MAX || p.dilation[d] > INT_MAX || weight.size(2 + d) > INT_MAX) return false;
  }
  for (int64_t pad : p.padding) {
    if (pad > INT_MAX / 2) return false;
  }
  const int64_t depth = std::max(in_per_group, out_per_group) * taps;
  return groups <= kMaxGridYZ && depth <= INT_MAX && out_per_group <= 64 * kMaxGridYZ &&
         in_per_group <= 64 * kMaxGridYZ && in_per_group * taps <= 64 * kMaxGridYZ;
}

bool mma_supports(const at::Tensor& input, const at::Tensor& weight, const TiedConv2dParams& p, bool input_grad) {
  if (!mma_kernels_available()) return false;
  const auto dtype = input.scalar_type();
  int64_t vector = 0;  // elements per 16-byte load
  if (dtype == at::kHalf || dtype == at::kBFloat16) {
    vector = 8;
  } else if (dtype == at::kFloat && allow_tf32()) {
    vector = 4;  // TF32 only where cuDNN itself would use it
  } else {
    return false;
  }
  const int64_t gathered = input_grad ? weight.size(0) / p.groups : weight.size(1);
  return gathered % vector == 0;
}

at::Tensor fused_forward(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const TiedConv2dParams& p) {
  const auto out_size = p.output_size(input, weight);
  at::Tensor out = at::empty(out_size, input.options().memory_format(conv_output_memory_format(input, weight)));
  std::optional<at::Tensor> bias_values;
  if (bias.has_value()) bias_values = bias->contiguous();
  const TransformSpec wt = device_transform(p.weight_transform), bt = device_transform(p.bias_transform);
  if (mma_supports(input, weight, p, /*input_grad=*/false)) {
    const at::Tensor src = channels_last_aligned(input);
    launch_mma_conv(src, weight, bias_values, out, make_geometry(input, weight, p, src.strides(), out.strides()), wt,
                    bt, /*input_grad=*/false);
  } else {
    launch_simt_conv(input, weight, bias_values, out, make_geometry(input, weight, p, input.strides(), out.strides()),
                     wt, bt, /*input_grad=*/false);
  }
  return out;
}

namespace {

// dst = conv^T(src, f(W)) (+ g(b)): the input-gradient kernels, src shaped like the output of the
// convolution under p and dst like its input.
void launch_input_grad(const at::Tensor& src, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const TransformSpec& bias_transform, const at::Tensor& dst, const TiedConv2dParams& p) {
  const TransformSpec wt = device_transform(p.weight_transform), bt = device_transform(bias_transform);
  if (mma_supports(dst, weight, p, /*input_grad=*/true)) {
    const at::Tensor gathered = channels_last_aligned(src);
    launch_mma_conv(gathered, weight, bias, dst, make_geometry(dst, weight, p, dst.strides(), gathered.strides()), wt,
                    bt, /*input_grad=*/true);
  } else {
    launch_simt_conv(src, weight, bias, dst, make_geometry(dst, weight, p, dst.strides(), src.strides()), wt, bt,
                     /*input_grad=*/true);
  }
}

}  // namespace

at::Tensor fused_input_grad(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                            const TiedConv2dParams& p) {
  at::Tensor grad_input = at::empty(input.sizes(), input.options().memory_format(input.suggest_memory_format()));
  launch_input_grad(grad_output, weight, std::nullopt, TransformSpec{}, grad_input, p);
  return grad_input;
}

TiedConv2dParams convolution_of_transpose(const TiedConvTranspose2dParams& p) {
  TiedConv2dParams c;
  c.weight_transform = p.weight_transform;
  c.stride = p.stride;
  c.padding = {p.padding[0], p.padding[0], p.padding[1], p.padding[1]};
  c.dilation = p.dilation;
  c.groups = p.groups;
  return c;
}

bool fused_transpose_supports(const at::Tensor& input, const at::Tensor& weight, const TiedConvTranspose2dParams& p) {
  for (int d = 0; d < 2; ++d) {
    if (p.output_padding[d] >= p.stride[d]) return false;
  }
  // fused_supports reads the tensor it is given for its dtype and emptiness only; x is empty when y is
  // (an empty y has N, C or a spatial size 0, and then so has x), and an empty x takes the library.
  return fused_supports(input, weight, convolution_of_transpose(p));
}

bool mma_supports_transpose(const at::Tensor& input, const at::Tensor& weight, const TiedConvTranspose2dParams& p,
                            bool input_grad) {
  // The transposed forward is c's input gradient, and its input gradient c's forward.
  return mma_supports(input, weight, convolution_of_transpose(p), /*input_grad=*/!input_grad);
}

at::Tensor fused_transpose_forward(const at::Tensor& input, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const TiedConvTranspose2dParams& p) {
  const TiedConv2dParams c = convolution_of_transpose(p);
  at::Tensor out =
      at::empty(p.output_size(input, weight), input.options().memory_format(conv_output_memory_format(input, weight)));
  TORCH_INTERNAL_ASSERT(c.output_size(out, weight) ==
                            (std::array<int64_t, 4>{input.size(0), input.size(1), input.size(2), input.size(3)}),
                        "fusedtie: the transposed convolution's output does not map back onto its input");
  std::optional<at::Tensor> bias_values;
  if (bias.has_value()) bias_values = bias->contiguous();
  launch_input_grad(input, weight, bias_values, TransformSpec{}, out, c);
  return out;
}

at::Tensor fused_transpose_input_grad(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                                      const TiedConvTranspose2dParams& p) {
  return fused_forward(grad_output, weight, std::nullopt, convolution_of_transpose(p))
      .contiguous(input.suggest_memory_format());
}

at::Tensor fused_transpose_weight_grad(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                                       const TiedConvTranspose2dParams& p) {
  // c's weight gradient correlates its output gradient (here x) with its input (here dy).
  return std::get<0>(fused_weight_and_bias_grad(/*grad_output=*/input, /*input=*/grad_output, weight,
                                                convolution_of_transpose(p), /*weight_grad=*/true,
                                                /*bias_grad=*/false))
      .contiguous(weight.suggest_memory_format());
}

}  // namespace cuda
}  // namespace fusedtie
