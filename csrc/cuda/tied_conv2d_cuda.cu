// The fusedtie operators on CUDA: per call, the fused kernels (fused_conv2d.h) or "one transform
// kernel + cuDNN" (library_conv.h with elementwise.h), chosen by the CUDA setting
// (cuda_settings.h): a heuristic (auto), a measurement cached per shape (autotune), or forced.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <sstream>

#include "../conv_params.h"
#include "../cuda_settings.h"
#include "../library_conv.h"
#include "elementwise.h"
#include "fused_conv2d.h"

namespace fusedtie {
namespace {

enum class Pass { kForward, kBackward };

int64_t multiply_adds(const at::Tensor& input, const at::Tensor& weight, const TiedConv2dParams& p) {
  const auto out = p.output_size(input, weight);
  return out[0] * out[1] * out[2] * out[3] * weight.size(1) * weight.size(2) * weight.size(3);
}

// auto's rule. NOT MEASURED: no GPU was available when it was written; it is a cost model, and the
// autotune mode (or the benchmark) gives the measured choice. The unfused recipe costs one extra
// elementwise launch per pass (about 4 us in eager mode) over cuDNN; the fused kernels save it but
// are slower per multiply-add than cuDNN's, so they should win where the convolution itself takes
// a few microseconds: up to 2^30 multiply-adds for the tensor-core forward (a few us on an
// H100/H200 in bf16), up to 2^24 where a CUDA-core kernel would run (float64, exact float32, and the
// weight gradient, which has no tensor-core kernel yet). Fewer than 16 channels per group on either
// side (depthwise convolutions, say) leave most of a 64-wide tile idle: library.
bool fused_wins(Pass pass, const at::Tensor& input, const at::Tensor& weight, const TiedConv2dParams& p) {
  if (weight.size(1) < 16 || weight.size(0) / p.groups < 16) return false;
  const int64_t work = multiply_adds(input, weight, p);
  if (pass == Pass::kForward && cuda::mma_supports(input, weight, p, /*input_grad=*/false)) {
    return work <= (int64_t(1) << 30);
  }
  return work <= (int64_t(1) << 24);
}

// grad_strides: the output gradient's strides in the backward (they decide layout copies), empty
// in the forward.
std::string autotune_key(Pass pass, const at::Tensor& input, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const TiedConv2dParams& p,
                         std::array<bool, 3> output_mask, at::IntArrayRef grad_strides) {
  std::ostringstream key;
  key << (pass == Pass::kForward ? "fwd" : "bwd") << '|' << input.device() << '|' << input.scalar_type() << '|'
      << input.sizes() << input.strides() << grad_strides << '|' << weight.sizes() << weight.strides() << '|'
      << bias.has_value()
      << '|' << at::IntArrayRef(p.stride) << at::IntArrayRef(p.padding) << at::IntArrayRef(p.dilation) << p.groups
      << '|' << int(p.weight_transform.kind) << '|' << int(p.bias_transform.kind) << '|' << output_mask[0]
      << output_mask[1] << output_mask[2] << '|' << cuda::allow_tf32();
  return key.str();
}

// One warm-up call of each, then five timed calls of each, interleaved, each starting on an idle
// stream (so every one includes its launches); the medians decide.
bool measure_fused_wins(const std::function<void()>& fused, const std::function<void()>& library) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  auto time_ms = [&](const std::function<void()>& run) {
    stream.synchronize();
    at::cuda::CUDAEvent start(cudaEventDefault), stop(cudaEventDefault);
    start.record(stream);
    run();
    stop.record(stream);
    stop.synchronize();
    return start.elapsed_time(stop);
  };
  fused();
  library();
  constexpr int kReps = 5;
  std::array<float, kReps> fused_ms{}, library_ms{};
  for (int rep = 0; rep < kReps; ++rep) {
    fused_ms[rep] = time_ms(fused);
    library_ms[rep] = time_ms(library);
  }
  std::sort(fused_ms.begin(), fused_ms.end());
  std::sort(library_ms.begin(), library_ms.end());
  return fused_ms[kReps / 2] < library_ms[kReps / 2];
}

at::Tensor library_forward(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const TiedConv2dParams& p) {
  const at::Tensor derived_weight =
      p.weight_transform.is_identity() ? weight : cuda::apply_transform(weight, p.weight_transform);
  std::optional<at::Tensor> derived_bias;
  if (bias.has_value()) {
    derived_bias = p.bias_transform.is_identity() ? *bias : cuda::apply_transform(*bias, p.bias_transform);
  }
  return library_conv2d_forward(input, derived_weight, derived_bias, p);
}

using Gradients = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// dL/dx, dL/dW_src and dL/d g(b) (the bias chain rule is applied by the caller).
Gradients library_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                           const TiedConv2dParams& p, std::array<bool, 3> output_mask) {
  // f(W) is needed only for the input gradient; the weight gradient reads W's shape alone.
  const at::Tensor weight_for_conv = (output_mask[0] && !p.weight_transform.is_identity())
                                         ? cuda::apply_transform(weight, p.weight_transform)
                                         : weight;
  auto [grad_input, grad_weight, grad_bias] = library_conv2d_backward(grad_output, input, weight_for_conv, p, output_mask);
  if (output_mask[1]) {
    grad_weight = (p.weight_transform.is_identity()
                       ? grad_weight
                       : cuda::apply_chain_rule_in_place(grad_weight, weight, p.weight_transform))
                      .contiguous(weight.suggest_memory_format());
  }
  return {grad_input, grad_weight, grad_bias};
}

Gradients fused_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                         const TiedConv2dParams& p, std::array<bool, 3> output_mask) {
  at::Tensor grad_input = output_mask[0] ? cuda::fused_input_grad(grad_output, input, weight, p) : at::Tensor();
  auto [grad_weight, grad_bias] =
      cuda::fused_weight_and_bias_grad(grad_output, input, weight, p, output_mask[1], output_mask[2]);
  if (output_mask[1]) grad_weight = grad_weight.contiguous(weight.suggest_memory_format());
  return {grad_input, grad_weight, grad_bias};
}

// Whether this pass runs the fused kernels. `measure` runs both choices once (autotune only).
bool use_fused(Pass pass, const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
               const TiedConv2dParams& p, std::array<bool, 3> output_mask, at::IntArrayRef grad_strides,
               const std::function<bool()>& measure) {
  if (!cuda::fused_supports(input, weight, p)) return false;
  switch (cuda_conv_algorithm_setting()) {
    case CudaConvAlgorithm::kLibrary: return false;
    case CudaConvAlgorithm::kFused: return true;
    case CudaConvAlgorithm::kAuto: return fused_wins(pass, input, weight, p);
    case CudaConvAlgorithm::kAutotune: break;
  }
  // Timing synchronizes the stream, which a CUDA graph capture does not allow: the heuristic then.
  if (at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None) {
    return fused_wins(pass, input, weight, p);
  }
  const std::string key = autotune_key(pass, input, weight, bias, p, output_mask, grad_strides);
  if (const auto cached = autotune_lookup(key)) return *cached;
  const bool fused = measure();
  autotune_store(key, fused);
  return fused;
}

at::Tensor tied_conv2d_cuda(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            c10::string_view transform, double alpha, c10::string_view bias_transform,
                            double bias_alpha, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups) {
  const auto p = TiedConv2dParams::from_schema(transform, alpha, bias_transform, bias_alpha, stride, padding,
                                               dilation, groups);
  p.check(input, weight, bias);
  const c10::cuda::CUDAGuard guard(input.device());
  const bool fused = use_fused(Pass::kForward, input, weight, bias, p, {true, true, true}, {}, [&] {
    return measure_fused_wins([&] { cuda::fused_forward(input, weight, bias, p); },
                              [&] { library_forward(input, weight, bias, p); });
  });
  return fused ? cuda::fused_forward(input, weight, bias, p) : library_forward(input, weight, bias, p);
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>
tied_conv2d_backward_cuda(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, c10::string_view transform, double alpha,
                          c10::string_view bias_transform, double bias_alpha, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                          std::array<bool, 3> output_mask) {
  const auto p = TiedConv2dParams::from_schema(transform, alpha, bias_transform, bias_alpha, stride, padding,
                                               dilation, groups);
  p.check_backward(grad_output, input, weight, bias, output_mask);
  const c10::cuda::CUDAGuard guard(input.device());
  const bool fused = use_fused(Pass::kBackward, input, weight, bias, p, output_mask, grad_output.strides(), [&] {
    return measure_fused_wins([&] { fused_backward(grad_output, input, weight, p, output_mask); },
                              [&] { library_backward(grad_output, input, weight, p, output_mask); });
  });
  auto [grad_input, grad_weight, grad_bias] = fused ? fused_backward(grad_output, input, weight, p, output_mask)
                                                    : library_backward(grad_output, input, weight, p, output_mask);
  std::optional<at::Tensor> grad_input_out, grad_weight_out, grad_bias_out;
  if (output_mask[0]) grad_input_out = grad_input;
  if (output_mask[1]) grad_weight_out = grad_weight;
  if (output_mask[2]) {
    // grad_bias is a fresh tensor of the convolution's, so the chain rule runs in place.
    grad_bias_out = (p.bias_transform.is_identity()
                         ? grad_bias
                         : cuda::apply_chain_rule_in_place(grad_bias, *bias, p.bias_transform))
                        .contiguous();
  }
  return {grad_input_out, grad_weight_out, grad_bias_out};
}

at::Tensor transform_cuda(const at::Tensor& source, c10::string_view transform, double alpha) {
  check_supported_dtype(source.scalar_type(), "transform");
  const TransformSpec spec{parse_transform(transform), alpha};
  const c10::cuda::CUDAGuard guard(source.device());
  // An operator's output must not alias its input, so identity returns a copy.
  return spec.is_identity() ? source.clone() : cuda::apply_transform(source, spec);
}

at::Tensor transform_backward_cuda(const at::Tensor& grad, const at::Tensor& source, c10::string_view transform,
                                   double alpha) {
  check_transform_backward(grad, source);
  TORCH_CHECK(grad.device() == source.device(), "expected grad on ", source.device(), ", got ", grad.device());
  const TransformSpec spec{parse_transform(transform), alpha};
  const c10::cuda::CUDAGuard guard(source.device());
  // The result takes the source's layout (the fake kernel's rule): one copy, then the chain rule on it.
  at::Tensor out = at::empty_like(source);
  out.copy_(grad);
  return spec.is_identity() ? out : cuda::apply_chain_rule_in_place(out, source, spec);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtie, CUDA, m) {
  m.impl("tied_conv2d", &tied_conv2d_cuda);
  m.impl("_tied_conv2d_backward", &tied_conv2d_backward_cuda);
  m.impl("transform", &transform_cuda);
  m.impl("_transform_backward", &transform_backward_cuda);
}

}  // namespace fusedtie
