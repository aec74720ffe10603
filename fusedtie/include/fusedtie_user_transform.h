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
//
// Two data symbols describe the CPU code; they are data, not functions, so that the loader reads
// them before it calls any function of the library (loading it runs only the C++ runtime's static
// initialisation):
//   const char fusedtie_user_transform_isa[]: the instruction set the CPU code was compiled for:
//     "DEFAULT" (the compiler's baseline), "AVX2" (with FMA) or "AVX512" (F, BW, VL, DQ, and FMA).
//     The loader refuses a library whose set this process's CPU capability lacks (ATen's, which
//     ATEN_CPU_CAPABILITY can lower), rather than crash on an illegal instruction. (Version 2 of
//     the interface added this: a loader of version 1 would not check it.)
//   const int32_t fusedtie_user_transform_vectorized: bit 0 set when cpu_forward runs f's vector
//     form for float32/bfloat16/float16 and float64 alike, bit 1 the same for cpu_chain_rule and f'
//     (else they run scalar loops).
#include <cstdint>

#define FUSEDTIE_USER_TRANSFORM_ABI_VERSION 2
#define FUSEDTIE_USER_TRANSFORM_TABLE_SYMBOL "fusedtie_user_transform_table"
#define FUSEDTIE_USER_TRANSFORM_ISA_SYMBOL "fusedtie_user_transform_isa"
#define FUSEDTIE_USER_TRANSFORM_VECTORIZED_SYMBOL "fusedtie_user_transform_vectorized"
#define FUSEDTIE_USER_VECTORIZED_FORWARD 1
#define FUSEDTIE_USER_VECTORIZED_CHAIN_RULE 2

extern "C" {
// dtype is a c10::ScalarType value (Float, Double, BFloat16 or Half; the operator library checks it
// before calling); `params` holds num_params values, in the order of the sorted parameter names.
// in/out (and grad/out) may be the same memory. The CUDA functions take device pointers and launch
// on `stream` (a cudaStream_t) without synchronising.
typedef const char* (*FusedtieUserForwardFn)(int32_t dtype, const void* in, void* out, int64_t numel,
                                             const double* params);
typedef const char* (*FusedtieUserChainRuleFn)(int32_t dtype, const void* grad, const void* source, void* out,
                                               int64_t numel, const double* params);
typedef const char* (*FusedtieUserCudaForwardFn)(int32_t dtype, const void* in, void* out, int64_t numel,
                                                 const double* params, void* stream);
typedef const char* (*FusedtieUserCudaChainRuleFn)(int32_t dtype, const void* grad, const void* source, void* out,
                                                   int64_t numel, const double* params, void* stream);

struct FusedtieUserTransformTable {
  int32_t abi_version;  // FUSEDTIE_USER_TRANSFORM_ABI_VERSION of the library
  int32_t num_params;
  FusedtieUserForwardFn cpu_forward;       // out = f(in)
  FusedtieUserChainRuleFn cpu_chain_rule;  // out = grad * f'(source)
  FusedtieUserCudaForwardFn cuda_forward;  // nullptr: compiled without CUDA kernels
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
//     // with FUSEDTIE_USER_VECTOR only: whether each expression compiles for T
//     template <typename T> static constexpr bool forward_compiles();
//     template <typename T> static constexpr bool derivative_compiles();
//   };
// 16-bit types are computed in float (at::opmath_type), like the built-in passes. Only c10's light
// headers are included, never torch/extension.h: the library compiles in about a second instead of
// a minute.
//
// CPU: scalar loops, which the compiler vectorises where the expression is plain arithmetic (-O3:
// the parameters live in a local copy no store can alias), but which call glibc once per element
// for tanh(x), exp(x)...: 29x slower than the vector loops for tanh(x), 5.6x for x / (1 + exp(-x))
// (per 2^20 float32 values, AVX-512). So where the CPU has AVX2 or AVX-512, fusedtie/_user_build.py
// compiles the library for that instruction set with FUSEDTIE_USER_VECTOR defined, and each
// expression that compiles for fusedtie_user_vector.h's vector type (a requires-expression in the
// generated functor tells) runs through the vector loops below: the expression instantiated once
// with T = Vec<float> or Vec<double> (SLEEF's math functions), whole vectors, then one partial
// vector for the last numel % kLanes elements (zero-padded, so every element, in the body or the
// tail, gets the same code and the same result). An expression that does not compile for it (`?:`,
// comparisons...) keeps the scalar loop, with nothing to do for the user;
// fusedtie_user_transform_vectorized says which the library got.
#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>

#if defined(FUSEDTIE_USER_VECTOR)
#if defined(__CUDACC__)
#error "the vector loops are host code: fusedtie/_user_build.py defines FUSEDTIE_USER_VECTOR for .cpp sources only"
#endif
#include <cstring>
#include <type_traits>

#include "fusedtie_user_vector.h"
#define FUSEDTIE_USER_ISA FUSEDTIE_VEC_ISA
#else
#define FUSEDTIE_USER_ISA "DEFAULT"
#endif

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#define FUSEDTIE_USER_HD __host__ __device__ __forceinline__
#else
#define FUSEDTIE_USER_HD inline
#endif

#if defined(FUSEDTIE_USER_CPU_ELSEWHERE)
// A CUDA library compiles its CPU code in a .cpp source of its own (for the vector instruction set,
// which the host pass of nvcc does not get), which defines these two (hidden: the library's own).
extern "C" __attribute__((visibility("hidden"))) const char* fusedtie_user_cpu_forward(int32_t dtype, const void* in,
                                                                                       void* out, int64_t numel,
                                                                                       const double* params);
extern "C" __attribute__((visibility("hidden"))) const char* fusedtie_user_cpu_chain_rule(
    int32_t dtype, const void* grad, const void* source, void* out, int64_t numel, const double* params);
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

template <typename F, typename scalar_t>
void scalar_forward(const scalar_t* x, scalar_t* y, int64_t numel, const double* params) {
  using T = at::opmath_type<scalar_t>;
  const auto p = load_params<T, F::kNumParams>(params);
  for (int64_t i = 0; i < numel; ++i) y[i] = static_cast<scalar_t>(F::forward(static_cast<T>(x[i]), p));
}

template <typename F, typename scalar_t>
void scalar_chain_rule(const scalar_t* g, const scalar_t* x, scalar_t* y, int64_t numel, const double* params) {
  using T = at::opmath_type<scalar_t>;
  const auto p = load_params<T, F::kNumParams>(params);
  for (int64_t i = 0; i < numel; ++i) {
    y[i] = static_cast<scalar_t>(static_cast<T>(g[i]) * F::derivative(static_cast<T>(x[i]), p));
  }
}

#if defined(FUSEDTIE_USER_VECTOR)
// kLanes elements of p as a vector of T (count < kLanes: the first count, the other lanes zero);
// 16-bit types converted to float as c10 converts them (fusedtie_user_vector.h).
template <typename T, typename scalar_t>
inline simd::Vec<T> load_lanes(const scalar_t* p, int64_t count) {
  if constexpr (std::is_same_v<T, scalar_t>) {
    simd::Vec<T> v;
    std::memcpy(&v.v, p, static_cast<size_t>(count) * sizeof(T));
    return v;
  } else {
    static_assert(sizeof(scalar_t) == 2 && std::is_same_v<T, float>);
    simd::Bits16 bits{};
    std::memcpy(&bits, p, static_cast<size_t>(count) * 2);
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      return simd::bfloat16_to_float(bits);
    } else {
      return simd::half_to_float(bits);
    }
  }
}

template <typename T, typename scalar_t>
inline void store_lanes(scalar_t* p, const simd::Vec<T>& v, int64_t count) {
  if constexpr (std::is_same_v<T, scalar_t>) {
    std::memcpy(p, &v.v, static_cast<size_t>(count) * sizeof(T));
  } else {
    simd::Bits16 bits;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      bits = simd::float_to_bfloat16(v);
    } else {
      bits = simd::float_to_half(v);
    }
    std::memcpy(p, &bits, static_cast<size_t>(count) * 2);
  }
}

// Whole vectors, then the rest as one zero-padded vector. in/out (grad/out) may be the same memory:
// each vector is loaded before it is stored.
template <typename F, typename scalar_t>
void vector_forward(const scalar_t* x, scalar_t* y, int64_t numel, const double* params) {
  using T = at::opmath_type<scalar_t>;
  using V = simd::Vec<T>;
  constexpr int64_t L = simd::kLanes;
  const auto p = load_params<V, F::kNumParams>(params);
  int64_t i = 0;
  for (; i + L <= numel; i += L) store_lanes(y + i, F::forward(load_lanes<T>(x + i, L), p), L);
  if (i < numel) store_lanes(y + i, F::forward(load_lanes<T>(x + i, numel - i), p), numel - i);
}

template <typename F, typename scalar_t>
void vector_chain_rule(const scalar_t* g, const scalar_t* x, scalar_t* y, int64_t numel, const double* params) {
  using T = at::opmath_type<scalar_t>;
  using V = simd::Vec<T>;
  constexpr int64_t L = simd::kLanes;
  const auto p = load_params<V, F::kNumParams>(params);
  int64_t i = 0;
  for (; i + L <= numel; i += L) {
    store_lanes(y + i, load_lanes<T>(g + i, L) * F::derivative(load_lanes<T>(x + i, L), p), L);
  }
  if (i < numel) {
    const int64_t n = numel - i;
    store_lanes(y + i, load_lanes<T>(g + i, n) * F::derivative(load_lanes<T>(x + i, n), p), n);
  }
}

template <typename F, typename T>
constexpr bool forward_vectorizes() {
  return F::template forward_compiles<simd::Vec<T>>();
}
template <typename F, typename T>
constexpr bool derivative_vectorizes() {
  return F::template derivative_compiles<simd::Vec<T>>();
}
#else
template <typename F, typename T>
constexpr bool forward_vectorizes() {
  return false;
}
template <typename F, typename T>
constexpr bool derivative_vectorizes() {
  return false;
}
// Declared only, for the branches below that these builds discard.
template <typename F, typename scalar_t>
void vector_forward(const scalar_t* x, scalar_t* y, int64_t numel, const double* params);
template <typename F, typename scalar_t>
void vector_chain_rule(const scalar_t* g, const scalar_t* x, scalar_t* y, int64_t numel, const double* params);
#endif

// fusedtie_user_transform_vectorized's value for F.
template <typename F>
constexpr int32_t vectorized_passes() {
  const bool forward = forward_vectorizes<F, float>() && forward_vectorizes<F, double>();
  const bool chain_rule = derivative_vectorizes<F, float>() && derivative_vectorizes<F, double>();
  return (forward ? FUSEDTIE_USER_VECTORIZED_FORWARD : 0) | (chain_rule ? FUSEDTIE_USER_VECTORIZED_CHAIN_RULE : 0);
}

template <typename F>
const char* cpu_forward(int32_t dtype, const void* in, void* out, int64_t numel, const double* params) {
  return dispatch_dtype(dtype, [&](auto tag) -> const char* {
    using scalar_t = decltype(tag);
    const auto* x = static_cast<const scalar_t*>(in);
    auto* y = static_cast<scalar_t*>(out);
    if constexpr (forward_vectorizes<F, at::opmath_type<scalar_t>>()) {
      vector_forward<F>(x, y, numel, params);
    } else {
      scalar_forward<F>(x, y, numel, params);
    }
    return nullptr;
  });
}

template <typename F>
const char* cpu_chain_rule(int32_t dtype, const void* grad, const void* source, void* out, int64_t numel,
                           const double* params) {
  return dispatch_dtype(dtype, [&](auto tag) -> const char* {
    using scalar_t = decltype(tag);
    const auto* g = static_cast<const scalar_t*>(grad);
    const auto* x = static_cast<const scalar_t*>(source);
    auto* y = static_cast<scalar_t*>(out);
    if constexpr (derivative_vectorizes<F, at::opmath_type<scalar_t>>()) {
      vector_chain_rule<F>(g, x, y, numel, params);
    } else {
      scalar_chain_rule<F>(g, x, y, numel, params);
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
const char* cuda_forward(int32_t dtype, const void* in, void* out, int64_t numel, const double* params, void* stream) {
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
#if defined(FUSEDTIE_USER_CPU_ELSEWHERE)
      &fusedtie_user_cpu_forward,
      &fusedtie_user_cpu_chain_rule,
#else
      &cpu_forward<F>,
      &cpu_chain_rule<F>,
#endif
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
