#pragma once
// The binary interface between fusedtie's operator library and a *user transform library*: the
// shared library that fusedtie.Transform.from_expression compiles from f and f' written as C++
// expressions (fusedtie/_user_build.py generates its source, which defines one functor and includes
// this header). The header lives in the Python package (fusedtie/include/), so an installed wheel
// has it as well as a source checkout; the operator library includes it from here too
// (csrc/user_transforms.h), so both sides always compile one definition of the table. Its contents
// are part of the cache key of every compiled user library: editing it recompiles them.
//
// The library exports one C function, fusedtie_user_transform_table(), returning a table of plain
// function pointers. Errors come back as messages (nullptr: success), so no C++ exception crosses
// the boundary between the two libraries.
#include <cstdint>

#define FUSEDTIE_USER_TRANSFORM_ABI_VERSION 1
#define FUSEDTIE_USER_TRANSFORM_TABLE_SYMBOL "fusedtie_user_transform_table"

extern "C" {
// dtype is a c10::ScalarType value (Float, Double, BFloat16 or Half; the operator library checks it
// before calling); `params` holds num_params values, in the order of the sorted parameter names.
// in/out (and grad/out) may be the same memory. The CUDA functions take device pointers and launch
// on `stream` (a cudaStream_t) without synchronising.
typedef const char* (*FusedtieUserForwardFn)(int32_t dtype, const void* in, void* out, int64_t numel,
                                              const double* params);
typedef const char* (*FusedtieUserChainRuleFn)(int32_t dtype, const void* grad, const void* source,
                                                void* out, int64_t numel, const double* params);
typedef const char* (*FusedtieUserCudaForwardFn)(int32_t dtype, const void* in, void* out, int64_t numel,
                                                  const double* params, void* stream);
typedef const char* (*FusedtieUserCudaChainRuleFn)(int32_t dtype, const void* grad, const void* source,
                                                    void* out, int64_t numel, const double* params,
                                                    void* stream);

struct FusedtieUserTransformTable {
  int32_t abi_version;  // FUSEDTIE_USER_TRANSFORM_ABI_VERSION of the library
  int32_t num_params;
  FusedtieUserForwardFn cpu_forward;          // out = f(in)
  FusedtieUserChainRuleFn cpu_chain_rule;     // out = grad * f'(source)
  FusedtieUserCudaForwardFn cuda_forward;     // nullptr: compiled without CUDA kernels
  FusedtieUserCudaChainRuleFn cuda_chain_rule;
};

typedef const FusedtieUserTransformTable* (*FusedtieUserTransformTableFn)();
}

#ifdef FUSEDTIE_USER_TRANSFORM_SOURCE
// ------------------------------------------------------------------------------------------------
// The loops of a user transform library, instantiated by the generated source on its functor F:
//   struct F {
//     static constexpr int kNumParams = ...;
//     template <typename T> static FUSEDTIE_USER_HD T forward(T x, const fusedtie_user::Params<T, kNumParams>&);
//     template <typename T> static FUSEDTIE_USER_HD T derivative(T x, const fusedtie_user::Params<T, kNumParams>&);
//   };
// An arbitrary C++ expression has no vector form, so the loops are scalar, as the CUDA kernels of
// the built-ins are; they are written so that the compiler can vectorise them where the expression
// allows it (-O3: the parameters live in a local copy no store can alias). 16-bit types are
// computed in float (at::opmath_type), like the built-in passes. Only c10's light headers are
// included, never torch/extension.h: the library compiles in about a second instead of a minute.
#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#define FUSEDTIE_USER_HD __host__ __device__ __forceinline__
#else
#define FUSEDTIE_USER_HD inline
#endif

namespace fusedtie_user {

template <typename T, int N>
struct Params {
  T value[N > 0 ? N : 1];
};

template <typename T, int N>
Params<T, N> load_params(const double* params) {
  Params<T, N> p{};
  for (int i = 0; i < N; ++i) p.value[i] = static_cast<T>(params[i]);
  return p;
}

// fn(scalar_t{}) for dtype; an error message for a dtype without a loop.
template <typename Fn>
const char* dispatch_dtype(int32_t dtype, Fn&& fn) {
  switch (static_cast<c10::ScalarType>(dtype)) {
    case c10::ScalarType::Float: return fn(float{});
    case c10::ScalarType::Double: return fn(double{});
    case c10::ScalarType::BFloat16: return fn(c10::BFloat16{});
    case c10::ScalarType::Half: return fn(c10::Half{});
    default: return "no user-transform loop for this dtype (float32, float64, bfloat16, float16 only)";
  }
}

template <typename F>
const char* cpu_forward(int32_t dtype, const void* in, void* out, int64_t numel, const double* params) {
  return dispatch_dtype(dtype, [&](auto tag) -> const char* {
    using scalar_t = decltype(tag);
    using T = at::opmath_type<scalar_t>;
    const auto p = load_params<T, F::kNumParams>(params);
    const auto* x = static_cast<const scalar_t*>(in);
    auto* y = static_cast<scalar_t*>(out);
    for (int64_t i = 0; i < numel; ++i) y[i] = static_cast<scalar_t>(F::forward(static_cast<T>(x[i]), p));
    return nullptr;
  });
}

template <typename F>
const char* cpu_chain_rule(int32_t dtype, const void* grad, const void* source, void* out, int64_t numel,
                           const double* params) {
  return dispatch_dtype(dtype, [&](auto tag) -> const char* {
    using scalar_t = decltype(tag);
    using T = at::opmath_type<scalar_t>;
    const auto p = load_params<T, F::kNumParams>(params);
    const auto* g = static_cast<const scalar_t*>(grad);
    const auto* x = static_cast<const scalar_t*>(source);
    auto* y = static_cast<scalar_t*>(out);
    for (int64_t i = 0; i < numel; ++i) {
      y[i] = static_cast<scalar_t>(static_cast<T>(g[i]) * F::derivative(static_cast<T>(x[i]), p));
    }
    return nullptr;
  });
}

#if defined(__CUDACC__)
constexpr int kThreads = 256;

// Grid-stride loops with 64-bit indices, as the operator library's own elementwise kernels.
template <typename F, typename scalar_t, typename P>
__global__ void forward_kernel(const scalar_t* in, scalar_t* out, int64_t n, P p) {
  using T = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    out[i] = static_cast<scalar_t>(F::forward(static_cast<T>(in[i]), p));
  }
}

template <typename F, typename scalar_t, typename P>
__global__ void chain_rule_kernel(const scalar_t* grad, const scalar_t* source, scalar_t* out, int64_t n, P p) {
  using T = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    out[i] = static_cast<scalar_t>(static_cast<T>(grad[i]) * F::derivative(static_cast<T>(source[i]), p));
  }
}

inline unsigned blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096);
}

inline const char* launch_error() {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

template <typename F>
const char* cuda_forward(int32_t dtype, const void* in, void* out, int64_t numel, const double* params,
                         void* stream) {
  if (numel == 0) return nullptr;
  return dispatch_dtype(dtype, [&](auto tag) -> const char* {
    using scalar_t = decltype(tag);
    using T = at::opmath_type<scalar_t>;
    forward_kernel<F, scalar_t><<<blocks_for(numel), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const scalar_t*>(in), static_cast<scalar_t*>(out), numel, load_params<T, F::kNumParams>(params));
    return launch_error();
  });
}

template <typename F>
const char* cuda_chain_rule(int32_t dtype, const void* grad, const void* source, void* out, int64_t numel,
                            const double* params, void* stream) {
  if (numel == 0) return nullptr;
  return dispatch_dtype(dtype, [&](auto tag) -> const char* {
    using scalar_t = decltype(tag);
    using T = at::opmath_type<scalar_t>;
    chain_rule_kernel<F, scalar_t><<<blocks_for(numel), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const scalar_t*>(grad), static_cast<const scalar_t*>(source), static_cast<scalar_t*>(out), numel,
        load_params<T, F::kNumParams>(params));
    return launch_error();
  });
}
#endif

template <typename F>
const FusedtieUserTransformTable* make_table() {
  static const FusedtieUserTransformTable table{
      FUSEDTIE_USER_TRANSFORM_ABI_VERSION,
      F::kNumParams,
      &cpu_forward<F>,
      &cpu_chain_rule<F>,
#if defined(__CUDACC__)
      &cuda_forward<F>,
      &cuda_chain_rule<F>,
#else
      nullptr,
      nullptr,
#endif
  };
  return &table;
}

}  // namespace fusedtie_user
#endif  // FUSEDTIE_USER_TRANSFORM_SOURCE
