#pragma once
// NaN and Inf: one rule for the gemm, brgemm and depthwise kernels. Those kernels multiply zeros
// they insert themselves (im2col's padding, the depthwise kernel's zero-padded planes and margins)
// by the other operand, where the library skips those positions; with a non-finite operand the
// extra products are NaN (0 * Inf). So a fast result stands when the operand its inserted zeros
// multiply is all finite, or when the result itself is (then every product was); otherwise the
// library computes that result, whose NaN/Inf pattern is F.conv2d's. Each result takes the cheaper
// of the two tests; the rule per result and its measured cost are in docs/design.md.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>

#include "../conv_params.h"

namespace fusedtie {

inline bool pads(const TiedConv2dParams& p) {
  return std::any_of(p.padding.begin(), p.padding.end(), [](int64_t side) { return side > 0; });
}

// Whether every element of `t` is finite: x - x is 0 for finite x and NaN for Inf and NaN, and a
// NaN survives the sum. Lanes the compiler turns into vector registers; no temporary tensor.
template <typename T>
bool all_finite(const T* data, int64_t n) {
  constexpr int kLanes = 64 / sizeof(T);
  T lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += data[i + l] - data[i + l];
  }
  T sum = 0;
  for (; i < n; ++i) sum += data[i] - data[i];
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum == 0;
}

inline bool all_finite(const at::Tensor& t) {
  if (!t.is_contiguous()) return at::isfinite(t).all().item<bool>();  // an expanded grad_output, say
  return AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "fusedtie_all_finite",
                                    [&] { return all_finite(t.const_data_ptr<scalar_t>(), t.numel()); });
}

}  // namespace fusedtie
