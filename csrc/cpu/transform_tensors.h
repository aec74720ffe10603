#pragma once
// The CPU transform passes (transform_passes.h) applied to whole tensors, in parallel: f(source) as
// a new tensor or in a reused scratch buffer, and the chain rule grad * f'(source) in place. Every
// CPU operator (tied_conv2d and tied_conv_transpose2d, all algorithms) goes through these.
#include <ATen/core/Tensor.h>

#include <optional>

#include "../conv_params.h"

namespace fusedtie {

// f(source) as a new tensor with source's layout (kept for dense tensors, contiguous otherwise).
at::Tensor apply_transform(const at::Tensor& source, const TransformSpec& spec);

// g(b) for a convolution, as a tensor of its own (the bias itself for the identity): f(W) takes this
// thread's scratch buffer, so g(b) cannot.
inline std::optional<at::Tensor> derived_bias(const std::optional<at::Tensor>& bias, const TransformSpec& spec) {
  if (!bias.has_value() || spec.is_identity()) return bias;
  return apply_transform(*bias, spec);
}

// f(source) in this thread's grow-only scratch buffer: valid until the next call on this thread,
// so only for a tensor that the caller consumes before returning (never for an operator's output).
at::Tensor apply_transform_to_scratch(const at::Tensor& source, const TransformSpec& spec);

// grad * f'(source), computed in grad's memory when it is laid out like source. grad must be a
// temporary of the caller's (a freshly made gradient), since it is overwritten.
at::Tensor apply_chain_rule_in_place(at::Tensor grad, const at::Tensor& source, const TransformSpec& spec);

// The CPU passes for the shared convolution code (conv_params.h): f(W) in the scratch buffer.
inline constexpr TensorPasses kCpuPasses{&apply_transform_to_scratch, &apply_chain_rule_in_place};

}  // namespace fusedtie
