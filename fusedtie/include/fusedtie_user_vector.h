#pragma once
// The vector type the CPU loops of a user transform library instantiate the user's expressions
// with (fusedtie_user_transform.h, when the generated source defines FUSEDTIE_USER_VECTOR).
//
// Why a type of our own, and not at::vec::Vectorized: an expression written for a scalar T has to
// compile unchanged for the vector T, so the type must mix with every arithmetic scalar (`3 * x`,
// `x / 2.0`), find `tanh(x)` by argument-dependent lookup, and convert from a double or an int
// (`static_cast<T>(1)`); Vectorized does none of these without a wrapper, and its header
// (ATen/cpu/vec/vec.h) took 3.7 s to compile here against 1.1 s for a whole scalar user library.
// This one is GCC/Clang vector extensions and calls to SLEEF (the vector math library libtorch_cpu
// ships and exports, the one Vectorized calls), declared here: not even <immintrin.h> is included.
//
// Semantics: the vector form computes, lane by lane, what the C++ expression means for the scalar
// T, so the vector loops and the scalar loops of the same library give the same results up to the
// last bits of the math functions, with NaN and Inf propagating alike (no fast-math; the library
// is compiled with -ffp-contract=off so that no a * b + c becomes an FMA the scalar form does not
// have):
//   * C++'s promotions are kept: a Vec<float> with a double (`0.5 * x`, or pow(x, 2), which is
//     double in C++) gives a Vec<double>, as float with double gives double; the expression's
//     value is converted to T at the end, as the scalar form's static_cast<T> does. (Write 0.5f to
//     stay in float.)
//   * The math functions are SLEEF's. For float lanes, the 3.5-ulp variant where SLEEF has one
//     (tanh, sin, cos, tan, asin, acos, atan, atan2, sinh, cosh, log, log2, exp2, cbrt, hypot),
//     else its most accurate; measured per 2^20 float32 values with AVX-512 here, tanh takes
//     0.60 ms (3.5 ulp) against 2.4 ms (1 ulp), the built-in vector tanh transform 0.6 ms (6 ulp)
//     and glibc's scalar tanhf 14.5 ms. For double lanes (float64 data, or a promoted
//     expression), always the most accurate (1 ulp or better): float64 is what one uses for
//     accuracy (gradcheck), and SLEEF's 3.5-ulp double functions gain less.
//   * sqrt, fabs/abs, floor, ceil, trunc, round, fmod, fmin, fmax, copysign, min and max are exact,
//     with C's rules (round halves away from zero; fmin/fmax ignore a NaN; min/max are std::min and
//     std::max: (b < a) ? b : a and (a < b) ? b : a).
// What has no vector form here does not compile for it, and the generated source then keeps the
// scalar loop for that expression (fusedtie_user_transform.h tests this with a requires-expression,
// so a library always compiles when its scalar form does): `?:`, comparisons, `std::tanh(x)`
// (qualified: the overloads are found by argument-dependent lookup only), isnan and the other
// classification functions, functions not listed above, compound assignments, long double.
//
// Every Vec has as many lanes as one native float register (8 with AVX2, 16 with AVX-512), so
// that a float and a double Vec convert lane for lane; a Vec<double> spans two registers.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#if __cplusplus < 202002L
#error "fusedtie_user_vector.h needs C++20 (the generated source only includes it then)"
#endif

#if defined(__AVX512F__)
#define FUSEDTIE_VEC_BYTES 64
#define FUSEDTIE_VEC_ISA "AVX512"
// SLEEF's names: Sleef_<fn>f16_<accuracy> / Sleef_<fn>d8_<accuracy>
#define FUSEDTIE_SLEEF_F(fn, acc) Sleef_##fn##f16##acc
#define FUSEDTIE_SLEEF_D(fn, acc) Sleef_##fn##d8##acc
#elif defined(__AVX2__) && defined(__FMA__)
#define FUSEDTIE_VEC_BYTES 32
#define FUSEDTIE_VEC_ISA "AVX2"
#define FUSEDTIE_SLEEF_F(fn, acc) Sleef_##fn##f8##acc
#define FUSEDTIE_SLEEF_D(fn, acc) Sleef_##fn##d4##acc
#else
#error "fusedtie_user_vector.h needs -mavx2 -mfma or -mavx512f (fusedtie/_user_build.py passes them)"
#endif

namespace fusedtie_user {
namespace simd {

inline constexpr int kBytes = FUSEDTIE_VEC_BYTES;
inline constexpr int kLanes = kBytes / static_cast<int>(sizeof(float));

template <typename E>
inline constexpr bool kIsLane = std::is_same_v<E, float> || std::is_same_v<E, double>;

// One register, as SLEEF's functions take it: the same vector types as __m256 / __m512 (and so
// the same calling convention), declared here so that neither <immintrin.h> nor <sleef.h> is
// needed: together they took 0.6 s of a 1.9 s compile.
typedef float NativeF __attribute__((vector_size(kBytes)));
typedef double NativeD __attribute__((vector_size(kBytes)));
template <typename E>
struct NativeOf {
  using type = NativeF;
};
template <>
struct NativeOf<double> {
  using type = NativeD;
};

}  // namespace simd
}  // namespace fusedtie_user

// The SLEEF functions used below, as libtorch_cpu exports them (the unsuffixed names dispatch to
// the best implementation for the CPU, as ATen's Vectorized calls them). const, as sleef.h declares
// them: 1 - tanh(x) * tanh(x) calls tanh once.
#define FUSEDTIE_SLEEF_DECLARE_1(fn, acc_f, acc_d)                                                                   \
  extern "C"                                                                                                         \
      __attribute__((const)) fusedtie_user::simd::NativeF FUSEDTIE_SLEEF_F(fn, acc_f)(fusedtie_user::simd::NativeF); \
  extern "C"                                                                                                         \
      __attribute__((const)) fusedtie_user::simd::NativeD FUSEDTIE_SLEEF_D(fn, acc_d)(fusedtie_user::simd::NativeD);
#define FUSEDTIE_SLEEF_DECLARE_2(fn, acc_f, acc_d)                                            \
  extern "C" __attribute__((const)) fusedtie_user::simd::NativeF FUSEDTIE_SLEEF_F(fn, acc_f)( \
      fusedtie_user::simd::NativeF, fusedtie_user::simd::NativeF);                            \
  extern "C" __attribute__((const)) fusedtie_user::simd::NativeD FUSEDTIE_SLEEF_D(fn, acc_d)( \
      fusedtie_user::simd::NativeD, fusedtie_user::simd::NativeD);
// float lanes: SLEEF's 3.5-ulp variant where it has one (see the top of this file); double lanes:
// the most accurate. sqrt without a suffix is the instruction itself (checked bit for bit against
// vsqrtps/vsqrtpd on 10^7 random bit patterns, NaNs included).
#define FUSEDTIE_SLEEF_UNARY(X) \
  X(exp, _u10, _u10)            \
  X(exp2, _u35, _u10)           \
  X(expm1, _u10, _u10)          \
  X(log, _u35, _u10)            \
  X(log2, _u35, _u10)           \
  X(log10, _u10, _u10)          \
  X(log1p, _u10, _u10)          \
  X(sin, _u35, _u10)            \
  X(cos, _u35, _u10)            \
  X(tan, _u35, _u10)            \
  X(asin, _u35, _u10)           \
  X(acos, _u35, _u10)           \
  X(atan, _u35, _u10)           \
  X(sinh, _u35, _u10)           \
  X(cosh, _u35, _u10)           \
  X(tanh, _u35, _u10)           \
  X(asinh, _u10, _u10)          \
  X(acosh, _u10, _u10)          \
  X(atanh, _u10, _u10)          \
  X(cbrt, _u35, _u10)           \
  X(erf, _u10, _u10)            \
  X(erfc, _u15, _u15)           \
  X(sqrt, , )                   \
  X(floor, , )                  \
  X(ceil, , )                   \
  X(trunc, , )                  \
  X(round, , )
#define FUSEDTIE_SLEEF_BINARY(X) \
  X(pow, _u10, _u10)             \
  X(atan2, _u35, _u10)           \
  X(hypot, _u35, _u05)           \
  X(fmod, , )                    \
  X(fmin, , )                    \
  X(fmax, , )                    \
  X(copysign, , )
FUSEDTIE_SLEEF_UNARY(FUSEDTIE_SLEEF_DECLARE_1)
FUSEDTIE_SLEEF_BINARY(FUSEDTIE_SLEEF_DECLARE_2)

namespace fusedtie_user {
namespace simd {

template <typename E>
struct Vec {
  static_assert(kIsLane<E>, "a Vec holds float or double lanes");
  // GCC/Clang vector extension: +, -, *, / and comparisons lane by lane, at any width (a
  // Vec<double> is lowered to two registers).
  typedef E Wide __attribute__((vector_size(kLanes * sizeof(E))));
  // The lane mask type comparisons of Wide give (0 or all ones), and the bits of each lane.
  using BitsLane = std::conditional_t<sizeof(E) == 4, int32_t, int64_t>;
  typedef BitsLane Bits __attribute__((vector_size(kLanes * sizeof(E))));
  using Native = typename NativeOf<E>::type;
  static constexpr int kParts = static_cast<int>(sizeof(Wide) / sizeof(Native));

  Wide v;

  Vec() : v{} {}
  static Vec of(Wide w) {
    Vec r;
    r.v = w;
    return r;
  }
  // Every lane s converted to E, as a scalar T would be: static_cast<T>(1), T(0.5), parameters.
  template <typename S>
    requires std::is_arithmetic_v<S>
  explicit Vec(S s) : v(Wide{} + static_cast<E>(s)) {}
  // Lane-wise conversion between float and double (C++'s conversion of each lane).
  template <typename O>
    requires(kIsLane<O> && !std::is_same_v<O, E>)
  explicit Vec(const Vec<O>& other) : v(__builtin_convertvector(other.v, Wide)) {}
};

template <typename X>
struct IsVecT : std::false_type {};
template <typename E>
struct IsVecT<Vec<E>> : std::true_type {};
template <typename X>
inline constexpr bool kIsVec = IsVecT<std::remove_cvref_t<X>>::value;

// The lane type of an operand: E for a Vec<E>, the type itself for an arithmetic scalar.
template <typename X>
struct LaneOfT {
  using type = X;
};
template <typename E>
struct LaneOfT<Vec<E>> {
  using type = E;
};
template <typename X>
using LaneOf = typename LaneOfT<std::remove_cvref_t<X>>::type;

// Operands of a mixed operation: at least one Vec, the other a Vec or an arithmetic scalar.
template <typename X, typename Y>
concept VecOperands = (kIsVec<X> || kIsVec<Y>) && (kIsVec<X> || std::is_arithmetic_v<std::remove_cvref_t<X>>) &&
                      (kIsVec<Y> || std::is_arithmetic_v<std::remove_cvref_t<Y>>);

// The lanes of x as a Vec<R> (a scalar broadcast).
template <typename R, typename X>
inline Vec<R> as(const X& x) {
  if constexpr (kIsVec<X>) {
    if constexpr (std::is_same_v<LaneOf<X>, R>) {
      return x;
    } else {
      return Vec<R>(x);
    }
  } else {
    return Vec<R>(x);
  }
}

// fn applied to each native register of x (SLEEF's functions take one register).
template <typename E, typename Fn>
inline Vec<E> per_register(const Vec<E>& x, Fn fn) {
  using Native = typename Vec<E>::Native;
  Native parts[Vec<E>::kParts];
  std::memcpy(parts, &x.v, sizeof(parts));
  for (auto& part : parts) part = fn(part);
  Vec<E> r;
  std::memcpy(&r.v, parts, sizeof(parts));
  return r;
}

template <typename E, typename Fn>
inline Vec<E> per_register(const Vec<E>& x, const Vec<E>& y, Fn fn) {
  using Native = typename Vec<E>::Native;
  Native xs[Vec<E>::kParts], ys[Vec<E>::kParts];
  std::memcpy(xs, &x.v, sizeof(xs));
  std::memcpy(ys, &y.v, sizeof(ys));
  for (int i = 0; i < Vec<E>::kParts; ++i) xs[i] = fn(xs[i], ys[i]);
  Vec<E> r;
  std::memcpy(&r.v, xs, sizeof(xs));
  return r;
}

// mask ? a : b lane by lane, on the bits (the vector ?: is GCC-only).
template <typename E>
inline Vec<E> select(typename Vec<E>::Bits mask, const Vec<E>& a, const Vec<E>& b) {
  using Bits = typename Vec<E>::Bits;
  return Vec<E>::of(reinterpret_cast<typename Vec<E>::Wide>((mask & reinterpret_cast<Bits>(a.v)) |
                                                            (~mask & reinterpret_cast<Bits>(b.v))));
}

// ---- arithmetic: the usual arithmetic conversions decide the lane type, as for scalars
template <typename X, typename Y>
using ArithLane = decltype(std::declval<LaneOf<X>>() + std::declval<LaneOf<Y>>());

#define FUSEDTIE_VEC_OPERATOR(op)                                   \
  template <typename X, typename Y>                                 \
    requires(VecOperands<X, Y> && kIsLane<ArithLane<X, Y>>)         \
  inline Vec<ArithLane<X, Y>> operator op(const X& x, const Y& y) { \
    using R = ArithLane<X, Y>;                                      \
    return Vec<R>::of(as<R>(x).v op as<R>(y).v);                    \
  }
FUSEDTIE_VEC_OPERATOR(+)
FUSEDTIE_VEC_OPERATOR(-)
FUSEDTIE_VEC_OPERATOR(*)
FUSEDTIE_VEC_OPERATOR(/)
#undef FUSEDTIE_VEC_OPERATOR

template <typename E>
inline Vec<E> operator-(const Vec<E>& x) {
  return Vec<E>::of(-x.v);
}
template <typename E>
inline Vec<E> operator+(const Vec<E>& x) {
  return x;
}

// ---- math functions of one argument: Vec<E> -> Vec<E>, as std::f(E) -> E
#define FUSEDTIE_VEC_UNARY(fn, acc_f, acc_d)                                            \
  template <typename E>                                                                 \
  inline Vec<E> fn(const Vec<E>& x) {                                                   \
    if constexpr (std::is_same_v<E, float>) {                                           \
      return per_register(x, [](NativeF r) { return FUSEDTIE_SLEEF_F(fn, acc_f)(r); }); \
    } else {                                                                            \
      return per_register(x, [](NativeD r) { return FUSEDTIE_SLEEF_D(fn, acc_d)(r); }); \
    }                                                                                   \
  }
FUSEDTIE_SLEEF_UNARY(FUSEDTIE_VEC_UNARY)
#undef FUSEDTIE_VEC_UNARY

// |x|: the sign bit cleared (abs(-0.0) is +0.0, and the sign of a NaN goes, as with std::fabs).
template <typename E>
inline Vec<E> fabs(const Vec<E>& x) {
  using Bits = typename Vec<E>::Bits;
  using Lane = typename Vec<E>::BitsLane;
  const Bits magnitude = Bits{} + std::numeric_limits<Lane>::max();  // every bit but the sign
  return Vec<E>::of(reinterpret_cast<typename Vec<E>::Wide>(reinterpret_cast<Bits>(x.v) & magnitude));
}
template <typename E>
inline Vec<E> abs(const Vec<E>& x) {
  return fabs(x);
}

// ---- math functions of two arguments: the lane type is the one std::f gives for the lane types
// (pow(float, int) is double in C++, pow(float, float) float).
#define FUSEDTIE_VEC_BINARY(fn, acc_f, acc_d)                                                                          \
  template <typename X, typename Y>                                                                                    \
    requires(VecOperands<X, Y> && kIsLane<decltype(std::fn(std::declval<LaneOf<X>>(), std::declval<LaneOf<Y>>()))>)    \
  inline auto fn(const X& x, const Y& y) {                                                                             \
    using R = decltype(std::fn(std::declval<LaneOf<X>>(), std::declval<LaneOf<Y>>()));                                 \
    if constexpr (std::is_same_v<R, float>) {                                                                          \
      return per_register(as<R>(x), as<R>(y), [](NativeF a, NativeF b) { return FUSEDTIE_SLEEF_F(fn, acc_f)(a, b); }); \
    } else {                                                                                                           \
      return per_register(as<R>(x), as<R>(y), [](NativeD a, NativeD b) { return FUSEDTIE_SLEEF_D(fn, acc_d)(a, b); }); \
    }                                                                                                                  \
  }
FUSEDTIE_SLEEF_BINARY(FUSEDTIE_VEC_BINARY)
#undef FUSEDTIE_VEC_BINARY

// std::min / std::max take two arguments of one type (max(x, 0.0f) for float, max(x, T(0)) for
// any T), and are (b < a) ? b : a and (a < b) ? b : a: a NaN first argument is returned, a NaN
// second one is not.
template <typename E>
inline Vec<E> min(const Vec<E>& a, const Vec<E>& b) {
  return select(b.v < a.v, b, a);
}
template <typename E>
inline Vec<E> max(const Vec<E>& a, const Vec<E>& b) {
  return select(a.v < b.v, b, a);
}
// With a scalar: of the lane type exactly, as std::max would deduce it (max(x, 0) is an error for
// a float T, and stays one).
template <typename E>
inline Vec<E> min(const Vec<E>& a, E b) {
  return min(a, Vec<E>(b));
}
template <typename E>
inline Vec<E> min(E a, const Vec<E>& b) {
  return min(Vec<E>(a), b);
}
template <typename E>
inline Vec<E> max(const Vec<E>& a, E b) {
  return max(a, Vec<E>(b));
}
template <typename E>
inline Vec<E> max(E a, const Vec<E>& b) {
  return max(Vec<E>(a), b);
}

// ---- bfloat16 and float16 storage: kLanes elements as bits, converted to and from float lanes
// with the vector instructions GCC makes of these integer operations. They round as c10's
// conversions do (to nearest, ties to even; a NaN stays a NaN), bit for bit: checked against
// c10::BFloat16 / c10::Half (its portable conversions, which these libraries compile) on every
// 16-bit pattern, on 10^8 random float bit patterns and on every float around the boundaries.
typedef uint16_t Bits16 __attribute__((vector_size(kLanes * 2)));
typedef uint32_t Bits32 __attribute__((vector_size(kLanes * 4)));
typedef int32_t Mask32 __attribute__((vector_size(kLanes * 4)));

inline Bits32 pick(Mask32 mask, Bits32 a, Bits32 b) {
  const Bits32 m = reinterpret_cast<Bits32>(mask);
  return (a & m) | (b & ~m);
}

inline Vec<float> float_from_bits(Bits32 bits) { return Vec<float>::of(reinterpret_cast<Vec<float>::Wide>(bits)); }

// bfloat16 is the top half of a float.
inline Vec<float> bfloat16_to_float(Bits16 h) { return float_from_bits(__builtin_convertvector(h, Bits32) << 16); }

inline Bits16 float_to_bfloat16(const Vec<float>& f) {
  const Bits32 u = reinterpret_cast<Bits32>(f.v);
  const Bits32 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return __builtin_convertvector(pick(f.v != f.v, Bits32{} + 0x7FC0u, rounded), Bits16);
}

// float16: sign, 5 exponent bits (bias 15), 10 mantissa bits.
inline Vec<float> half_to_float(Bits16 h) {
  const Bits32 w = __builtin_convertvector(h, Bits32);
  const Bits32 sign = (w & 0x8000u) << 16;
  const Bits32 exponent = (w >> 10) & 0x1Fu;
  const Bits32 mantissa = w & 0x3FFu;
  const Bits32 normal = sign | ((exponent + 112u) << 23) | (mantissa << 13);  // rebias 15 -> 127
  // infinity, or a NaN made quiet (as c10's conversion, which multiplies it, does)
  const Bits32 inf_nan = sign | 0x7F800000u | (mantissa << 13) | pick(mantissa != 0u, Bits32{} + 0x400000u, Bits32{});
  // zero and subnormals: mantissa * 2^-24, exact in float
  const auto small = __builtin_convertvector(reinterpret_cast<Mask32>(mantissa), Vec<float>::Wide) * 0x1p-24f;
  const Bits32 subnormal = sign | reinterpret_cast<Bits32>(small);
  return float_from_bits(pick(exponent == 0u, subnormal, pick(exponent == 0x1Fu, inf_nan, normal)));
}

inline Bits16 float_to_half(const Vec<float>& f) {
  const Bits32 u = reinterpret_cast<Bits32>(f.v);
  const Bits32 magnitude = u & 0x7FFFFFFFu;
  const Bits32 sign = (u >> 16) & 0x8000u;
  // |f| >= 2^-14, a normal half: rebias 127 -> 15 and round the 13 dropped bits to nearest even
  // (a carry into the exponent is the right result, up to 65504)
  const Bits32 normal = (magnitude - (112u << 23) + 0xFFFu + ((magnitude >> 13) & 1u)) >> 13;
  // below: a multiple of 2^-24; |f| * 2^24 is exact, and adding then subtracting 2^23 rounds it to
  // an integer, to nearest even (fp-contract is off and the compiler may not reassociate)
  const auto scaled = reinterpret_cast<Vec<float>::Wide>(magnitude) * 0x1p24f;
  const auto rounded = (scaled + 0x1p23f) - 0x1p23f;
  const Bits32 subnormal = reinterpret_cast<Bits32>(__builtin_convertvector(rounded, Mask32));
  const Bits32 finite = pick(magnitude >= 0x38800000u, normal, subnormal);
  // |f| >= 65520 (halfway from the largest half, 65504, to 2^16) rounds to infinity
  const Bits32 large = pick(magnitude > 0x7F800000u, Bits32{} + 0x7E00u, Bits32{} + 0x7C00u);
  return __builtin_convertvector(sign | pick(magnitude >= 0x477FF000u, large, finite), Bits16);
}

}  // namespace simd
}  // namespace fusedtie_user

// numeric_limits<T>::epsilon() and the like give the lane type's value in every lane (the primary
// template would silently give a zero Vec).
template <typename E>
struct std::numeric_limits<fusedtie_user::simd::Vec<E>> : public std::numeric_limits<E> {
 private:
  using V = fusedtie_user::simd::Vec<E>;
  using L = std::numeric_limits<E>;

 public:
  static V min() noexcept { return V(L::min()); }
  static V max() noexcept { return V(L::max()); }
  static V lowest() noexcept { return V(L::lowest()); }
  static V epsilon() noexcept { return V(L::epsilon()); }
  static V round_error() noexcept { return V(L::round_error()); }
  static V infinity() noexcept { return V(L::infinity()); }
  static V quiet_NaN() noexcept { return V(L::quiet_NaN()); }
  static V signaling_NaN() noexcept { return V(L::signaling_NaN()); }
  static V denorm_min() noexcept { return V(L::denorm_min()); }
};
