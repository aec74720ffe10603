// The fused skinny GEMMs of the "linear" algorithm (linear_conv2d.h), included by
// transform_passes_impl.h once per CPU capability. One side of the product has at most
// kSkinnyMaxRows rows, so the product reads W once and is bound by that read: f is applied to each
// vector of W as it is loaded, and f' to each vector of dW as it is written, so f(W) never exists
// and the tie costs no pass over W of its own.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../transforms.h"
#include "transform_passes.h"

namespace fusedtie {
namespace {

// Rows of W a dot product takes at once, so that each load of x feeds that many FMAs: R * M
// accumulators in 16 of AVX-512's 32 vector registers, 8 of the 16 elsewhere.
template <typename T>
constexpr int dot_row_block(int m) {
  constexpr int budget = at::vec::Vectorized<T>::size() * sizeof(T) >= 64 ? 16 : 8;
  return m >= budget ? 1 : std::min(4, budget / m);
}

template <typename T>
T sum_lanes(at::vec::Vectorized<T> v) {
  return at::vec::vec_reduce_all<T>([](at::vec::Vectorized<T> a, at::vec::Vectorized<T> b) { return a + b; }, v);
}

// y[m * ldy + o] = sum_k x[m * ldx + k] * f(w[o * K + k]) (+ bias[o]), for m < M, o in [o_begin, o_end).
template <typename T, typename Transform, int M>
void skinny_dot_loop(const T* x, int64_t ldx, const T* w, int64_t K, const T* bias, T* y, int64_t ldy, int64_t o_begin,
                     int64_t o_end, double alpha) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const Vec alpha_vec(static_cast<T>(alpha));
  const int64_t k_full = K - K % V;
  const int rest = static_cast<int>(K - k_full);
  auto rows = [&](int64_t o, auto block) {
    constexpr int R = decltype(block)::value;
    Vec acc[R][M];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) acc[r][m] = Vec(T(0));
    }
    for (int64_t k = 0; k < k_full; k += V) {
      Vec fw[R];
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) fw[r] = Transform::forward(Vec::loadu(w + (o + r) * K + k), alpha_vec);
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) {
        const Vec xv = Vec::loadu(x + m * ldx + k);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) acc[r][m] = at::vec::fmadd(xv, fw[r], acc[r][m]);
      }
    }
    if (rest > 0) {
      // The lanes past K are zeroed after f, which need not map 0 to 0.
      Vec fw[R];
      for (int r = 0; r < R; ++r) {
        fw[r] = Vec::set(Vec(T(0)), Transform::forward(Vec::loadu(w + (o + r) * K + k_full, rest), alpha_vec), rest);
      }
      for (int m = 0; m < M; ++m) {
        const Vec xv = Vec::loadu(x + m * ldx + k_full, rest);
        for (int r = 0; r < R; ++r) acc[r][m] = at::vec::fmadd(xv, fw[r], acc[r][m]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const T b = bias == nullptr ? T(0) : bias[o + r];
      for (int m = 0; m < M; ++m) y[m * ldy + o + r] = sum_lanes(acc[r][m]) + b;
    }
  };
  constexpr int R = dot_row_block<T>(M);
  int64_t o = o_begin;
  for (; o + R <= o_end; o += R) rows(o, std::integral_constant<int, R>{});
  for (; o < o_end; ++o) rows(o, std::integral_constant<int, 1>{});
}

// For o in [o_begin, o_end), with a the coefficients a[m * lda + o] (m < rows):
//   spread (if not null):  spread[m * K + k] += sum_o a[m, o] * f(w[o * K + k])
//   grad_w (if not null):  grad_w[o * K + k] = f'(w[o * K + k]) * sum_m a[m, o] * b[m * ldb + k]
// Four rows of W at a time, so each load and store of spread, and each load of b, serves four.
template <typename T, typename Transform, bool kSpread, bool kGradW>
void skinny_rows_loop(const T* w, int64_t K, const T* a, int64_t lda, int64_t rows, const T* b, int64_t ldb, T* spread,
                      T* grad_w, int64_t o_begin, int64_t o_end, double alpha) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const Vec alpha_vec(static_cast<T>(alpha));
  auto block_of_rows = [&](int64_t o, auto block) {
    constexpr int R = decltype(block)::value;
    for (int64_t k = 0; k < K; k += V) {
      const int n = static_cast<int>(std::min<int64_t>(V, K - k));
      Vec wv[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) wv[r] = n == V ? Vec::loadu(w + (o + r) * K + k) : Vec::loadu(w + (o + r) * K + k, n);
      Vec fw[R];  // f(W), where the spread needs it (and f' reads it then)
      if constexpr (kSpread) {
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) fw[r] = Transform::forward(wv[r], alpha_vec);
        for (int64_t m = 0; m < rows; ++m) {
          T* target = spread + m * K + k;
          Vec s = n == V ? Vec::loadu(target) : Vec::loadu(target, n);
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) s = at::vec::fmadd(Vec(a[m * lda + o + r]), fw[r], s);
          s.store(target, n);
        }
      }
      if constexpr (kGradW) {
        Vec g[R];
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) g[r] = Vec(T(0));
        for (int64_t m = 0; m < rows; ++m) {
          const T* source = b + m * ldb + k;
          const Vec bv = n == V ? Vec::loadu(source) : Vec::loadu(source, n);
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) g[r] = at::vec::fmadd(Vec(a[m * lda + o + r]), bv, g[r]);
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          Vec derivative;
          if constexpr (kSpread) {
            derivative = derivative_given_value<Transform>(wv[r], fw[r], alpha_vec);
          } else {
            derivative = Transform::derivative(wv[r], alpha_vec);
          }
          (g[r] * derivative).store(grad_w + (o + r) * K + k, n);
        }
      }
    }
  };
  int64_t o = o_begin;
  for (; o + 4 <= o_end; o += 4) block_of_rows(o, std::integral_constant<int, 4>{});
  for (; o < o_end; ++o) block_of_rows(o, std::integral_constant<int, 1>{});
}

template <typename T, typename Transform>
void skinny_dot_rows(const T* x, int64_t rows, int64_t ldx, const T* w, int64_t K, const T* bias, T* y, int64_t ldy,
                     int64_t o_begin, int64_t o_end, double alpha) {
  switch (rows) {
#define FUSEDTIE_SKINNY_CASE(m) \
  case m: return skinny_dot_loop<T, Transform, m>(x, ldx, w, K, bias, y, ldy, o_begin, o_end, alpha);
    FUSEDTIE_SKINNY_CASE(1)
    FUSEDTIE_SKINNY_CASE(2)
    FUSEDTIE_SKINNY_CASE(3)
    FUSEDTIE_SKINNY_CASE(4)
    FUSEDTIE_SKINNY_CASE(5)
    FUSEDTIE_SKINNY_CASE(6)
    FUSEDTIE_SKINNY_CASE(7)
    FUSEDTIE_SKINNY_CASE(8)
#undef FUSEDTIE_SKINNY_CASE
    default: break;  // the caller keeps rows within kSkinnyMaxRows
  }
}
static_assert(kSkinnyMaxRows == 8, "skinny_dot_rows instantiates one kernel per row count");

// float and double only (the caller's rule); built-in transforms only (user transforms have no
// vector functor).
void skinny_dot(TransformKind kind, c10::ScalarType dtype, const void* x, int64_t rows, int64_t ldx, const void* w,
                int64_t K, const void* bias, void* y, int64_t ldy, int64_t o_begin, int64_t o_end, double alpha) {
  dispatch_transform(kind, [&](auto transform) {
    using Transform = decltype(transform);
    if (dtype == c10::ScalarType::Double) {
      skinny_dot_rows<double, Transform>(static_cast<const double*>(x), rows, ldx, static_cast<const double*>(w), K,
                                         static_cast<const double*>(bias), static_cast<double*>(y), ldy, o_begin, o_end,
                                         alpha);
    } else {
      skinny_dot_rows<float, Transform>(static_cast<const float*>(x), rows, ldx, static_cast<const float*>(w), K,
                                        static_cast<const float*>(bias), static_cast<float*>(y), ldy, o_begin, o_end,
                                        alpha);
    }
  });
}

template <typename T, typename Transform>
void skinny_rows_typed(const T* w, int64_t K, const T* a, int64_t lda, int64_t rows, const T* b, int64_t ldb, T* spread,
                       T* grad_w, int64_t o_begin, int64_t o_end, double alpha) {
  if (spread != nullptr && grad_w != nullptr) {
    skinny_rows_loop<T, Transform, true, true>(w, K, a, lda, rows, b, ldb, spread, grad_w, o_begin, o_end, alpha);
  } else if (spread != nullptr) {
    skinny_rows_loop<T, Transform, true, false>(w, K, a, lda, rows, b, ldb, spread, grad_w, o_begin, o_end, alpha);
  } else if (grad_w != nullptr) {
    skinny_rows_loop<T, Transform, false, true>(w, K, a, lda, rows, b, ldb, spread, grad_w, o_begin, o_end, alpha);
  }
}

void skinny_rows(TransformKind kind, c10::ScalarType dtype, const void* w, int64_t K, const void* a, int64_t lda,
                 int64_t rows, const void* b, int64_t ldb, void* spread, void* grad_w, int64_t o_begin, int64_t o_end,
                 double alpha) {
  dispatch_transform(kind, [&](auto transform) {
    using Transform = decltype(transform);
    if (dtype == c10::ScalarType::Double) {
      skinny_rows_typed<double, Transform>(static_cast<const double*>(w), K, static_cast<const double*>(a), lda, rows,
                                           static_cast<const double*>(b), ldb, static_cast<double*>(spread),
                                           static_cast<double*>(grad_w), o_begin, o_end, alpha);
    } else {
      skinny_rows_typed<float, Transform>(static_cast<const float*>(w), K, static_cast<const float*>(a), lda, rows,
                                          static_cast<const float*>(b), ldb, static_cast<float*>(spread),
                                          static_cast<float*>(grad_w), o_begin, o_end, alpha);
    }
  });
}

}  // namespace
}  // namespace fusedtie
