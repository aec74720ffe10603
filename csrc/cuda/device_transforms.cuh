#pragma once
// f and f' on the device, from the one transforms header the CPU path uses. The transform is a
// run-time value: the switch in dispatch_transform is taken per element, and since every thread of
// a launch takes the same branch it costs no divergence. Half types are computed in float
// (at::opmath_type), as PyTorch's own kernels do.
#include <ATen/OpMathType.h>

#include "../transforms.h"

namespace fusedtie {
namespace cuda {

template <typename T>
__device__ __forceinline__ T transform_forward(TransformKind kind, T x, T alpha) {
  return dispatch_transform(kind, [&](auto transform) { return decltype(transform)::forward(x, alpha); });
}

template <typename T>
__device__ __forceinline__ T transform_derivative(TransformKind kind, T x, T alpha) {
  return dispatch_transform(kind, [&](auto transform) { return decltype(transform)::derivative(x, alpha); });
}

}  // namespace cuda
}  // namespace fusedtie
