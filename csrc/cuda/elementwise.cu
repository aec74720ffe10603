// See elementwise.h. Grid-stride loops over dense memory with 64-bit indices, on the current stream.
#include "elementwise.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "../dense_layout.h"
#include "device_transforms.cuh"

namespace fusedtie {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void fusedtie_transform_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, int64_t n,
                                          TransformKind kind, at::opmath_type<scalar_t> alpha) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    out[i] = static_cast<scalar_t>(transform_forward<opmath_t>(kind, static_cast<opmath_t>(in[i]), alpha));
  }
}

template <typename scalar_t>
__global__ void fusedtie_chain_rule_kernel(const scalar_t* grad, const scalar_t* __restrict__ source, scalar_t* out,
                                           int64_t n, TransformKind kind, at::opmath_type<scalar_t> alpha) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    out[i] = static_cast<scalar_t>(static_cast<opmath_t>(grad[i]) *
                                   transform_derivative<opmath_t>(kind, static_cast<opmath_t>(source[i]), alpha));
  }
}

int blocks_for(int64_t n) {
  const int64_t max_blocks = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, max_blocks)));
}

}  // namespace

at::Tensor apply_transform(const at::Tensor& source, const TransformSpec& spec) {
  const at::Tensor src =
      source.is_non_overlapping_and_dense() ? source : source.contiguous(source.suggest_memory_format());
  at::Tensor out = at::empty_like(src);
  const int64_t n = src.numel();
  if (n == 0) return out;
  const c10::cuda::CUDAGuard guard(src.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "fusedtie_transform", [&] {
    fusedtie_transform_kernel<scalar_t><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        src.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n, spec.kind,
        static_cast<at::opmath_type<scalar_t>>(spec.alpha));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor apply_chain_rule_in_place(at::Tensor grad, const at::Tensor& source, const TransformSpec& spec) {
  at::Tensor src;
  std::tie(grad, src) = in_one_dense_layout(std::move(grad), source);
  const int64_t n = grad.numel();
  if (n == 0) return grad;
  const c10::cuda::CUDAGuard guard(grad.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "fusedtie_chain_rule", [&] {
    fusedtie_chain_rule_kernel<scalar_t><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad.const_data_ptr<scalar_t>(), src.const_data_ptr<scalar_t>(), grad.mutable_data_ptr<scalar_t>(), n,
        spec.kind, static_cast<at::opmath_type<scalar_t>>(spec.alpha));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace cuda
}  // namespace fusedtie
