#pragma once
// Layout helpers shared by the CPU and CUDA elementwise passes: a flat loop over two tensors is
// right only when their elements are laid out identically and densely.
#include <ATen/ATen.h>

#include <utility>

namespace fusedtie {

inline bool same_dense_layout(const at::Tensor& a, const at::Tensor& b) {
  return a.is_non_overlapping_and_dense() && b.is_non_overlapping_and_dense() && a.sizes() == b.sizes() &&
         a.strides() == b.strides();
}

// (grad, source), copied where needed so both are laid out densely in source's suggested format.
inline std::pair<at::Tensor, at::Tensor> in_one_dense_layout(at::Tensor grad, at::Tensor source) {
  if (!same_dense_layout(grad, source)) {
    const auto format = source.suggest_memory_format();
    source = source.contiguous(format);
    grad = grad.contiguous(format);
  }
  return {std::move(grad), std::move(source)};
}

}  // namespace fusedtie
