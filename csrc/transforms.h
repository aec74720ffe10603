#pragma once
// The catalog of built-in transforms, one row each (FUSEDTIE_BUILTIN_TRANSFORMS below), and their f
// and f' written once. The enum, the table Python reads (through the _C module), the dispatch switch
// and autocast's policy all come from the rows. The CPU path instantiates the functors on scalars and
// on at::vec::Vectorized<T>; the CUDA kernels on device scalars (float/double; half types are
// computed in float). Adding a built-in: its functor below and its row; Python and the tests read it
// from there (tests/reference.py needs its float64 reference).
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FUSEDTIE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FUSEDTIE_HOST_DEVICE inline
#include <ATen/cpu/vec/vec.h>
#endif

namespace fusedtie {

// One row per built-in: X(enumerator, name, functor, f, f' (both as documented), reads alpha,
// commutes with rounding). The last column says round(f(w)) == f(round(w)) for every w, overflow,
// subnormals and NaN included (bit for bit, but for relu's zero: -0 where a tiny negative w rounds
// to -0, which changes no sum with a nonzero term); under autocast such an f runs fused on the
// rounded source (autocast.cpp). New rows go at the end: an enumerator's value is its row index.
#define FUSEDTIE_BUILTIN_TRANSFORMS(X)                                                                                 \
  X(kIdentity, "identity", IdentityTransform, "x", "1", false, true)                                                   \
  X(kSquare, "square", SquareTransform, "x*x", "2*x", false, false)                                                    \
  X(kAbs, "abs", AbsTransform, "|x|", "sign(x), 0 at x=0", false, true)                                                \
  X(kNeg, "neg", NegTransform, "-x", "-1", false, true)                                                                \
  X(kScale, "scale", ScaleTransform, "alpha*x", "alpha", true, false)                                                  \
  X(kExp, "exp", ExpTransform, "exp(x)", "exp(x)", false, false)                                                       \
  X(kSigmoid, "sigmoid", SigmoidTransform, "1/(1+exp(-x))", "s*(1-s)", false, false)                                   \
  X(kTanh, "tanh", TanhTransform, "tanh(x)", "1-tanh(x)^2", false, false)                                              \
  X(kSoftplus, "softplus", SoftplusTransform, "log(1+exp(x)); x where x>20", "exp(x)/(1+exp(x)); 1 where x>20", false, \
    false)                                                                                                             \
  X(kRelu, "relu", ReluTransform, "max(x, 0); NaN stays NaN", "0 where x <= 0, else 1", false, true)

enum class TransformKind : int32_t {
#define FUSEDTIE_ENUMERATOR(kind, ...) kind,
  FUSEDTIE_BUILTIN_TRANSFORMS(FUSEDTIE_ENUMERATOR)
#undef FUSEDTIE_ENUMERATOR
};

// A transform with its constant: a built-in or a user kind (below), on the host and in kernels alike.
struct TransformSpec {
  TransformKind kind = TransformKind::kIdentity;
  double alpha = 1.0;  // only read by transforms whose row says they read alpha
  FUSEDTIE_HOST_DEVICE constexpr bool is_identity() const { return kind == TransformKind::kIdentity; }
};

// User transforms (csrc/user_transforms.h: compiled from expressions by fusedtie.Transform.
// from_expression, or chains of built-ins) are kinds from kUserTransformBase up, one per registered
// name, so a TransformSpec{kind, alpha} names either and every call site passes them on unchanged.
// Only the CPU passes (transform_passes_impl.h) and the CUDA elementwise kernels (elementwise.cu)
// know how to run them; dispatch_transform below does not (it would compute the identity), so the
// fused CUDA kernels refuse them (fused_supports).
inline constexpr int32_t kUserTransformBase = 1 << 16;
FUSEDTIE_HOST_DEVICE constexpr bool is_user_transform(TransformKind kind) {
  return static_cast<int32_t>(kind) >= kUserTransformBase;
}

struct TransformInfo {
  TransformKind kind;
  const char* name;
  const char* forward;     // f(x), for documentation and the Python table
  const char* derivative;  // f'(x)
  bool uses_alpha;         // takes the constant `alpha`
  bool commutes_with_rounding;
};

inline constexpr TransformInfo kTransforms[] = {
#define FUSEDTIE_INFO(kind, name, functor, forward, derivative, uses_alpha, commutes) \
  {TransformKind::kind, name, forward, derivative, uses_alpha, commutes},
    FUSEDTIE_BUILTIN_TRANSFORMS(FUSEDTIE_INFO)
#undef FUSEDTIE_INFO
};
inline constexpr int kNumTransforms = sizeof(kTransforms) / sizeof(kTransforms[0]);

// Elementary functions with one spelling for host scalars, device scalars and CPU vectors, so each
// transform below is a single template.
namespace math {
FUSEDTIE_HOST_DEVICE float exp(float x) { return ::expf(x); }
FUSEDTIE_HOST_DEVICE double exp(double x) { return ::exp(x); }
FUSEDTIE_HOST_DEVICE float log1p(float x) { return ::log1pf(x); }
FUSEDTIE_HOST_DEVICE double log1p(double x) { return ::log1p(x); }
FUSEDTIE_HOST_DEVICE float tanh(float x) { return ::tanhf(x); }
FUSEDTIE_HOST_DEVICE double tanh(double x) { return ::tanh(x); }
FUSEDTIE_HOST_DEVICE float abs(float x) { return ::fabsf(x); }
FUSEDTIE_HOST_DEVICE double abs(double x) { return ::fabs(x); }
template <typename T>
FUSEDTIE_HOST_DEVICE T where(bool condition, T if_true, T if_false) {
  return condition ? if_true : if_false;
}

#if !defined(__CUDACC__) && !defined(__HIPCC__)
// Comparisons of Vectorized values give all-ones lane masks; where() selects lane by lane.
template <typename T>
inline at::vec::Vectorized<T> exp(const at::vec::Vectorized<T>& x) {
  return x.exp();
}
template <typename T>
inline at::vec::Vectorized<T> log1p(const at::vec::Vectorized<T>& x) {
  return x.log1p();
}
template <typename T>
inline at::vec::Vectorized<T> tanh(const at::vec::Vectorized<T>& x) {
  return x.tanh();
}
// float32 tanh on CPU vectors. Vectorized<float>::tanh is SLEEF's 1-ulp tanhf, about 6x slower than
// torch.tanh (MKL's vector math), which made tanh-tied layers pay for the transform itself. This is
// x * P(x^2) / Q(x^2), a rational fit minimising the relative error on |x| <= 9 (beyond which tanh
// rounds to +-1 in float32); measured within 6 ulp of tanh over [-12, 12] in float32, against
// SLEEF's 1 ulp and MKL's few, and far inside the error of the convolution that consumes it.
inline at::vec::Vectorized<float> tanh(const at::vec::Vectorized<float>& x) {
  using Vec = at::vec::Vectorized<float>;
  const Vec xc = at::vec::minimum(at::vec::maximum(x, Vec(-9.0f)), Vec(9.0f));
  const Vec s = xc * xc;
  Vec p = at::vec::fmadd(s, Vec(1.335561942e-08f), Vec(2.060979781e-05f));
  p = at::vec::fmadd(s, p, Vec(3.495632721e-03f));
  p = at::vec::fmadd(s, p, Vec(1.338106359e-01f));
  p = at::vec::fmadd(s, p, Vec(9.999999796e-01f));
  Vec q = at::vec::fmadd(s, Vec(7.776957398e-07f), Vec(3.285706948e-04f));
  q = at::vec::fmadd(s, q, Vec(2.587715307e-02f));
  q = at::vec::fmadd(s, q, Vec(4.671437922e-01f));
  q = at::vec::fmadd(s, q, Vec(1.0f));
  const Vec t = xc * p / q;
  // The fit may overshoot 1 by an ulp near the clamp; NaN passes through (x*... stays NaN) because
  // minimum/maximum propagate NaN in ATen's Vectorized.
  return at::vec::minimum(at::vec::maximum(t, Vec(-1.0f)), Vec(1.0f));
}
template <typename T>
inline at::vec::Vectorized<T> abs(const at::vec::Vectorized<T>& x) {
  return x.abs();
}
template <typename T>
inline at::vec::Vectorized<T> where(const at::vec::Vectorized<T>& mask, const at::vec::Vectorized<T>& if_true,
                                    const at::vec::Vectorized<T>& if_false) {
  return at::vec::Vectorized<T>::blendv(if_false, if_true, mask);
}
#endif
}  // namespace math

// Each transform: forward(x, alpha) = f(x), derivative(x, alpha) = f'(x). V is a float type or a
// Vectorized of one; V(c) broadcasts a constant.
struct IdentityTransform {
  template <typename V>
  static FUSEDTIE_HOST_DEVICE V forward(V x, V) {
    return x;
  }
  template <typename V>
  static FUSEDTIE_HOST_DEVICE V derivative(V, V) {
    return V(1);
  }
};
struct SquareTransform {
  template <typename V>
  static FUSEDTIE_HOST_DEVICE V forward(V x, V) {
    return x * x;
  }
  template <typename V>
  static FUSEDTIE_HOST_DEVICE V derivative(V x, V) {
    return x + x;
  }
};
struct AbsTransform {
  template <typename V>
  static FUSEDTIE_HOST_DEVICE V forward(V x, V) {
    return math::abs(x);
  }
  // sign(x), and 0 at 0 and at NaN: PyTorch's abs backward (grad * sgn(x)) exactly.
  template <typename V>
  static FUSEDTIE_HOST_DEVICE V derivative(V x, V) {
    return math::where(x > V(0), V(1), math::where(x < V(0), V(-1), V(0)));
  }
};
struct NegTransform {
  // -1 * x rather than 0 - x, which would turn -0 into +0 (torch.neg flips the sign of zero too).
  template <typename V>
  static FUSEDTIE_HOST_DEVICE V forward(V x, V) {
    return V(-1) * x;
  }
  template <typename V>
  static FUSEDTIE_HOST_DEVICE V derivative(V, V) {
    return V(-1);
  }
};
struct ScaleTransform {
  template <typename V>
  static FUSEDTIE_HOST_DEVICE V forward(V x, V alpha) {
    return alpha * x;
  }
  template <typename V>
  static FUSEDTIE_HOST_DEVICE V derivative(V, V alpha) {
    return alpha;
  }
};
struct ExpTransform {
  template <typename V>
  static FUSEDTIE_HOST_DEVICE V forward(V x, V) {
    return math::exp(x);
  }
  template <typename V>
  static FUSEDTIE_HOST_DEVICE V derivative(V x, V) {
    return math::exp(x);
  }
  template <typename V>
  static FUSEDTIE_HOST_DEVICE V derivative_from_value(V, V fx, V) {
    return fx;
  }
};
struct SigmoidTransform {
  template <typename V>
  static FUSEDTIE_HOST_DEVICE V forward(V x, V) {
    return V(1) / (V(1) + math::exp(V(0) - x));
  }
  template <typename V>
  static FUSEDTIE_HOST_DEVICE V derivative(V x, V) {
    V s = V(1) / (V(1) + math::exp(V(0) - x));
    return s * (V(1) - s);
  }
  template <typename V>
  static FUSEDTIE_HOST_DEVICE V derivative_from_value(V, V s, V) {
    return s * (V(1) - s);
  }
};
struct TanhTransform {
  template <typename V>
  static FUSEDTIE_HOST_DEVICE V forward(V x, V) {
    return math::tanh(x);
  }
  template <typename V>
  static FUSEDTIE_HOST_DEVICE V derivative(V x, V) {
    V t = math::tanh(x);
    return V(1) - t * t;
  }
  template <typename V>
  static FUSEDTIE_HOST_DEVICE V derivative_from_value(V, V t, V) {
    return V(1) - t * t;
  }
};
// torch.nn.functional.softplus with beta=1, threshold=20: linear above the threshold, where
// log1p(exp(x)) == x in float32 anyway. The derivative follows PyTorch's softplus_backward.
struct SoftplusTransform {
  template <typename V>
  static FUSEDTIE_HOST_DEVICE V forward(V x, V) {
    return math::where(x > V(20), x, math::log1p(math::exp(x)));
  }
  template <typename V>
  static FUSEDTIE_HOST_DEVICE V derivative(V x, V) {
    V z = math::exp(x);
    return math::where(x > V(20), V(1), z / (z + V(1)));
  }
};
// max(x, 0) as torch.relu: -0 and NaN pass through. f' as PyTorch's relu backward (threshold_backward
// on the result): 0 where x <= 0, else 1, so 1 at NaN.
struct ReluTransform {
  template <typename V>
  static FUSEDTIE_HOST_DEVICE V forward(V x, V) {
    return math::where(x < V(0), V(0), x);
  }
  template <typename V>
  static FUSEDTIE_HOST_DEVICE V derivative(V x, V) {
    return math::where(x <= V(0), V(0), V(1));
  }
};

// f'(x) where f(x) is at hand already (a pass computing both): the transforms whose derivative is a
// function of their value (exp, sigmoid, tanh) define derivative_from_value, the same arithmetic
// as their derivative after its own f, so the result is the same bit for bit; the rest compute
// derivative(x).
template <typename Transform, typename V>
FUSEDTIE_HOST_DEVICE V derivative_given_value(V x, V fx, V alpha) {
  if constexpr (requires { Transform::derivative_from_value(x, fx, alpha); }) {
    return Transform::derivative_from_value(x, fx, alpha);
  } else {
    return Transform::derivative(x, alpha);
  }
}

// Calls fn(SomeTransform{}) for the functor of `kind`: one switch, taken once per tensor on the CPU
// and once per thread block (a uniform branch) in CUDA kernels.
template <typename Fn>
FUSEDTIE_HOST_DEVICE decltype(auto) dispatch_transform(TransformKind kind, Fn&& fn) {
  switch (kind) {
#define FUSEDTIE_CASE(kind, name, functor, ...) \
  case TransformKind::kind: return fn(functor{});
    FUSEDTIE_BUILTIN_TRANSFORMS(FUSEDTIE_CASE)
#undef FUSEDTIE_CASE
    default: return fn(IdentityTransform{});  // user kinds: see kUserTransformBase
  }
}

}  // namespace fusedtie
