#pragma once
// The CUDA path's elementwise passes: f(W) and dL/dW * f'(W) as one kernel each (the "library"
// algorithm's extra kernels, and the transform operators on CUDA).
#include <ATen/core/Tensor.h>

#include "../conv_params.h"

namespace fusedtie {
namespace cuda {

// f(source) as a new tensor laid out like source (dense layouts kept, others made contiguous).
at::Tensor apply_transform(const at::Tensor& source, const TransformSpec& spec);

// grad * f'(source), in grad's memory when grad is laid out like source; grad must be a temporary
// of the caller's, since it is overwritten. The result is laid out like source.
at::Tensor apply_chain_rule_in_place(at::Tensor grad, const at::Tensor& source, const TransformSpec& spec);

// The CUDA passes for the shared convolution code (conv_params.h).
inline constexpr TensorPasses kCudaPasses{&apply_transform, &apply_chain_rule_in_place};

}  // namespace cuda
}  // namespace fusedtie
