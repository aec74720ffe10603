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

// The transform of one launch as a device functor: a built-in (kind, alpha), or a chain of
// built-ins (a user transform composed in the kernel). Compiled user transforms launch their own
// library's kernels instead (user_transforms.h).
template <typename T>
struct BuiltinOp {
  TransformKind kind;
  T alpha;
  __device__ __forceinline__ T forward(T x) const { return transform_forward<T>(kind, x, alpha); }
  __device__ __forceinline__ T derivative(T x) const { return transform_derivative<T>(kind, x, alpha); }
};

template <typename T>
struct ChainOp {
  DeviceChain chain;
  __device__ __forceinline__ T forward(T x) const { return chain_forward<T>(chain, x); }
  __device__ __forceinline__ T derivative(T x) const { return chain_derivative<T>(chain, x); }
};

template <typename scalar_t, typename Op>
__global__ void fusedtie_transform_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, int64_t n,
                                          Op op) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    out[i] = static_cast<scalar_t>(op.forward(static_cast<opmath_t>(in[i])));
  }
}

template <typename scalar_t, typename Op>
__global__ void fusedtie_chain_rule_kernel(const scalar_t* grad, const scalar_t* __restrict__ source, scalar_t* out,
                                           int64_t n, Op op) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    out[i] = static_cast<scalar_t>(static_cast<opmath_t>(grad[i]) * op.derivative(static_cast<opmath_t>(source[i])));
  }
}

int blocks_for(int64_t n) {
  const int64_t max_blocks = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, max_blocks)));
}

bool is_compiled_user_transform(TransformKind kind) {
  return is_user_transform(kind) && user_chain_stages(kind) == nullptr;
}

// Calls launch(op) with spec's device functor (not for compiled user transforms).
template <typename opmath_t, typename Launch>
void with_device_op(const TransformSpec& spec, Launch&& launch) {
  if (const auto* stages = user_chain_stages(spec.kind)) {
    ChainOp<opmath_t> op{};
    op.chain.count = static_cast<int>(stages->size());  // at most kMaxChainStages (checked at registration)
    for (int s = 0; s < op.chain.count; ++s) op.chain.stage[s] = (*stages)[s];
    launch(op);
  } else {
    launch(BuiltinOp<opmath_t>{spec.kind, static_cast<opmath_t>(spec.alpha)});
  }
}

}  // namespace

at::Tensor apply_transform(const at::Tensor& source, const TransformSpec& spec) {
  const at::Tensor src =
      source.is_non_overlapping_and_dense() ? source : source.contiguous(source.suggest_memory_format());
  at::Tensor out = at::empty_like(src);
  const int64_t n = src.numel();
  if (n == 0) return out;
  const c10::cuda::CUDAGuard guard(src.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (is_compiled_user_transform(spec.kind)) {
    user_cuda_forward_pass(spec.kind, src.scalar_type(), src.const_data_ptr(), out.mutable_data_ptr(), n,
                           stream.stream());
    return out;
  }
  FUSEDTIE_DISPATCH_SUPPORTED_TYPES(src.scalar_type(), "fusedtie_transform", [&] {
    with_device_op<at::opmath_type<scalar_t>>(spec, [&](auto op) {
      fusedtie_transform_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
          src.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n, op);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor apply_chain_rule_in_place(at::Tensor grad, const at::Tensor& source, const TransformSpec& spec) {
  at::Tensor src;
  std::tie(grad, src) = in_one_dense_layout(std::move(grad), source);
  const int64_t n = grad.numel();
  if (n == 0) return grad;
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (is_compiled_user_transform(spec.kind)) {
    user_cuda_chain_rule_pass(spec.kind, grad.scalar_type(), grad.const_data_ptr(), src.const_data_ptr(),
                              grad.mutable_data_ptr(), n, stream.stream());
    return grad;
  }
  FUSEDTIE_DISPATCH_SUPPORTED_TYPES(grad.scalar_type(), "fusedtie_chain_rule", [&] {
    with_device_op<at::opmath_type<scalar_t>>(spec, [&](auto op) {
      fusedtie_chain_rule_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), src.const_data_ptr<scalar_t>(), grad.mutable_data_ptr<scalar_t>(), n, op);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad;
}

}  // namespace cuda
}  // namespace fusedtie
