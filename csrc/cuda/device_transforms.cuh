#pragma once
// f and f' on the device, from the one transforms header the CPU path uses. The transform is a
// run-time value: the switch in dispatch_transform is taken per element, and since every thread of
// a launch takes the same branch it costs no divergence. Half types are computed in float
// (at::opmath_type), as PyTorch's own kernels do.
#include <ATen/OpMathType.h>

#include "../transforms.h"
#include "../user_transforms.h"

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

// A chain of built-ins (user_transforms.h), passed to a kernel by value: f_n(...f_1(x)), and its
// derivative f_1'(x_0) * ... * f_n'(x_{n-1}) by the chain rule, composed per element.
struct DeviceChain {
  int count;
  TransformSpec stage[kMaxChainStages];
};

template <typename T>
__device__ __forceinline__ T chain_forward(const DeviceChain& chain, T x) {
  for (int s = 0; s < chain.count; ++s) {
    x = transform_forward<T>(chain.stage[s].kind, x, static_cast<T>(chain.stage[s].alpha));
  }
  return x;
}

template <typename T>
__device__ __forceinline__ T chain_derivative(const DeviceChain& chain, T x) {
  T d = T(1);
  for (int s = 0; s < chain.count; ++s) {
    const T alpha = static_cast<T>(chain.stage[s].alpha);
    d *= transform_derivative<T>(chain.stage[s].kind, x, alpha);
    x = transform_forward<T>(chain.stage[s].kind, x, alpha);
  }
  return d;
}

}  // namespace cuda
}  // namespace fusedtie
