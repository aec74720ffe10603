// See depthwise_conv2d.h. Shapes: input [N, C, H, W], weight [C*m, 1, kh, kw] (m output channels per
// input channel), output [N, C*m, out_h, out_w]. Work is split by planes: forward by output plane,
// input gradient by input plane (which sums its m output channels), weight gradient by output channel
// (which sums over the batch), so no two tasks write the same element and the sums run in a fixed
// order whatever the thread count.
#include "depthwise_conv2d.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <vector>

#include "conv_algorithm.h"
#include "transform_passes.h"

// The row loops below are plain loops that the compiler vectorises. Where GCC can, every plane
// kernel is compiled twice, for AVX2 and for the baseline, and the dynamic loader picks the one the
// machine runs (function multi-versioning); elsewhere the baseline build alone.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FUSEDTIE_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FUSEDTIE_VECTOR_CLONES
#endif
#if defined(__GNUC__)
#define FUSEDTIE_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FUSEDTIE_ALWAYS_INLINE inline
#endif

namespace fusedtie {
namespace {

// ---- Stride 1: flat loops. With stride 1, output (y, x) of a plane padded to row width R reads
// src[(y + ky*dh) * R + x + kx*dw], which is src[i + offset_t] for the flat index i = y*R + x and a
// fixed offset per tap t. So a whole plane is one long loop over i (vectorised, no short rows), whose
// entries at x >= out_w are the wrap-around between rows and are never used.

// out[i] = bias (or out[i]) + sum over taps of taps[t] * src[i + offsets[t]], i in [0, n).
template <int kTaps, typename T>
FUSEDTIE_ALWAYS_INLINE void flat_correlate_fixed(const T* src, const int64_t* offsets, const T* taps, T bias,
                                                 bool accumulate, T* __restrict__ out, int64_t n) {
  T w[kTaps];
  const T* in[kTaps];
  for (int t = 0; t < kTaps; ++t) {
    w[t] = taps[t];
    in[t] = src + offsets[t];
  }
  for (int64_t i = 0; i < n; ++i) {
    T sum = accumulate ? out[i] : bias;
    for (int t = 0; t < kTaps; ++t) sum += w[t] * in[t][i];
    out[i] = sum;
  }
}

template <typename T>
FUSEDTIE_ALWAYS_INLINE void flat_correlate_any(const T* src, const int64_t* offsets, const T* taps, int64_t num_taps,
                                               T bias, bool accumulate, T* __restrict__ out, int64_t n) {
  if (!accumulate) std::fill(out, out + n, bias);
  for (int64_t t = 0; t < num_taps; ++t) {
    const T w = taps[t];
    const T* __restrict__ in = src + offsets[t];
    for (int64_t i = 0; i < n; ++i) out[i] += w * in[i];
  }
}

// sum of a[i] * b[i], in lanes the compiler turns into vector accumulators; a fixed order.
template <typename T>
FUSEDTIE_ALWAYS_INLINE T flat_dot(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  constexpr int kLanes = 64 / sizeof(T);  // two AVX2 registers' worth
  T lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += a[i + l] * b[i + l];
  }
  T sum = 0;
  for (; i < n; ++i) sum += a[i] * b[i];
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

// sum of a[i], in the same lanes.
template <typename T>
FUSEDTIE_ALWAYS_INLINE T lane_sum(const T* __restrict__ a, int64_t n) {
  constexpr int kLanes = 64 / sizeof(T);
  T lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += a[i + l];
  }
  T sum = 0;
  for (; i < n; ++i) sum += a[i];
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

// ---- Any stride: one row update per tap. Output (y, x) reads src[y*sh + ky*dh][x*sw + kx*dw] of a
// padded plane.

// A plane in memory: element (r, c) at data[r * row_stride + c].
template <typename T>
struct PlaneView {
  T* data;
  int64_t row_stride;
  T* row(int64_t r) const { return data + r * row_stride; }
};

struct Correlation {
  int64_t out_h, out_w, kernel_h, kernel_w, stride_h, stride_w, dilation_h, dilation_w;
};

template <typename T>
FUSEDTIE_ALWAYS_INLINE void rows_correlate(PlaneView<const T> src, const T* taps, T bias, PlaneView<T> out,
                                           const Correlation& c) {
  for (int64_t y = 0; y < c.out_h; ++y) {
    T* __restrict__ out_row = out.row(y);
    std::fill(out_row, out_row + c.out_w, bias);
    for (int64_t ky = 0; ky < c.kernel_h; ++ky) {
      const T* in_row = src.row(y * c.stride_h + ky * c.dilation_h);
      for (int64_t kx = 0; kx < c.kernel_w; ++kx) {
        const T w = taps[ky * c.kernel_w + kx];
        const T* __restrict__ in = in_row + kx * c.dilation_w;
        for (int64_t x = 0; x < c.out_w; ++x) out_row[x] += w * in[x * c.stride_w];
      }
    }
  }
}

// The forward's adjoint: grad spread back over the padded plane dst (accumulating).
template <typename T>
FUSEDTIE_ALWAYS_INLINE void rows_scatter(PlaneView<const T> grad, const T* taps, PlaneView<T> dst,
                                         const Correlation& c) {
  for (int64_t y = 0; y < c.out_h; ++y) {
    const T* __restrict__ grad_row = grad.row(y);
    for (int64_t ky = 0; ky < c.kernel_h; ++ky) {
      T* dst_row = dst.row(y * c.stride_h + ky * c.dilation_h);
      for (int64_t kx = 0; kx < c.kernel_w; ++kx) {
        const T w = taps[ky * c.kernel_w + kx];
        T* __restrict__ d = dst_row + kx * c.dilation_w;
        for (int64_t x = 0; x < c.out_w; ++x) d[x * c.stride_w] += w * grad_row[x];
      }
    }
  }
}

// tap_sums[t * out_w + x] += sum over rows y of grad[y][x] * src[y*sh + ky*dh][x*sw + kx*dw], per
// output column x (summed by the caller), so the loops stay elementwise.
template <typename T>
FUSEDTIE_ALWAYS_INLINE void rows_weight_sums(PlaneView<const T> grad, PlaneView<const T> src, T* tap_sums,
                                             const Correlation& c) {
  for (int64_t y = 0; y < c.out_h; ++y) {
    const T* __restrict__ grad_row = grad.row(y);
    for (int64_t ky = 0; ky < c.kernel_h; ++ky) {
      const T* in_row = src.row(y * c.stride_h + ky * c.dilation_h);
      for (int64_t kx = 0; kx < c.kernel_w; ++kx) {
        T* __restrict__ sums = tap_sums + (ky * c.kernel_w + kx) * c.out_w;
        const T* __restrict__ in = in_row + kx * c.dilation_w;
        for (int64_t x = 0; x < c.out_w; ++x) sums[x] += grad_row[x] * in[x * c.stride_w];
      }
    }
  }
}

// The multi-versioned entry points, one set per dtype (function multi-versioning takes functions,
// not templates). The tap counts of 3x3, 5x5 and 7x7 kernels (MobileNet, EfficientNet, ConvNeXt)
// are unrolled, so each output is written once; other kernels take one pass per tap.
#define FUSEDTIE_DEPTHWISE_PLANE_KERNELS(T)                                                                         \
  FUSEDTIE_VECTOR_CLONES void flat_correlate(const T* src, const int64_t* offsets, const T* taps, int64_t num_taps, \
                                             T bias, bool accumulate, T* out, int64_t n) {                          \
    switch (num_taps) {                                                                                             \
      case 9: return flat_correlate_fixed<9>(src, offsets, taps, bias, accumulate, out, n);                         \
      case 25: return flat_correlate_fixed<25>(src, offsets, taps, bias, accumulate, out, n);                       \
      case 49: return flat_correlate_fixed<49>(src, offsets, taps, bias, accumulate, out, n);                       \
      default: return flat_correlate_any(src, offsets, taps, num_taps, bias, accumulate, out, n);                   \
    }                                                                                                               \
  }                                                                                                                 \
  FUSEDTIE_VECTOR_CLONES T flat_sum(const T* values, int64_t n) { return lane_sum(values, n); }                     \
  FUSEDTIE_VECTOR_CLONES void flat_dots(const T* grad, const T* src, const int64_t* offsets, int64_t num_taps,      \
                                        T* tap_sums, int64_t n) {                                                   \
    for (int64_t t = 0; t < num_taps; ++t) tap_sums[t] += flat_dot(grad, src + offsets[t], n);                      \
  }                                                                                                                 \
  FUSEDTIE_VECTOR_CLONES void rows_correlate(PlaneView<const T> src, const T* taps, T bias, PlaneView<T> out,       \
                                             const Correlation& c) {                                                \
    rows_correlate<T>(src, taps, bias, out, c);                                                                     \
  }                                                                                                                 \
  FUSEDTIE_VECTOR_CLONES void rows_scatter(PlaneView<const T> grad, const T* taps, PlaneView<T> dst,                \
                                           const Correlation& c) {                                                  \
    rows_scatter<T>(grad, taps, dst, c);                                                                            \
  }                                                                                                                 \
  FUSEDTIE_VECTOR_CLONES void rows_weight_sums(PlaneView<const T> grad, PlaneView<const T> src, T* tap_sums,        \
                                               const Correlation& c) {                                              \
    rows_weight_sums<T>(grad, src, tap_sums, c);                                                                    \
  }
FUSEDTIE_DEPTHWISE_PLANE_KERNELS(float)
FUSEDTIE_DEPTHWISE_PLANE_KERNELS(double)
#undef FUSEDTIE_DEPTHWISE_PLANE_KERNELS

struct DepthwiseGeometry {
  int64_t batch, in_channels, out_channels, multiplier;
  int64_t in_h, in_w, out_h, out_w, kernel_h, kernel_w;
  int64_t pad_top, pad_left, padded_h, padded_w;
  int64_t stride_h, stride_w, dilation_h, dilation_w;

  DepthwiseGeometry(const at::Tensor& input, const at::Tensor& weight, const TiedConv2dParams& p)
      : batch(input.size(0)),
        in_channels(input.size(1)),
        out_channels(weight.size(0)),
        multiplier(weight.size(0) / input.size(1)),
        in_h(input.size(2)),
        in_w(input.size(3)),
        kernel_h(weight.size(2)),
        kernel_w(weight.size(3)),
        pad_top(p.padding[0]),
        pad_left(p.padding[2]),
        padded_h(input.size(2) + p.padding[0] + p.padding[1]),
        padded_w(input.size(3) + p.padding[2] + p.padding[3]),
        stride_h(p.stride[0]),
        stride_w(p.stride[1]),
        dilation_h(p.dilation[0]),
        dilation_w(p.dilation[1]) {
    const auto out = p.output_size(input, weight);
    out_h = out[2];
    out_w = out[3];
  }
  int64_t taps() const { return kernel_h * kernel_w; }
  int64_t in_plane() const { return in_h * in_w; }
  int64_t out_plane() const { return out_h * out_w; }
  int64_t padded_plane() const { return padded_h * padded_w; }
  bool has_padding() const { return padded_h != in_h || padded_w != in_w; }
  bool unit_stride() const { return stride_h == 1 && stride_w == 1; }
  Correlation forward() const { return {out_h, out_w, kernel_h, kernel_w, stride_h, stride_w, dilation_h, dilation_w}; }
  // The flat offset of every tap (row-major) in a plane of row width `row_width`.
  std::vector<int64_t> tap_offsets(int64_t row_width) const {
    std::vector<int64_t> offsets;
    for (int64_t ky = 0; ky < kernel_h; ++ky) {
      for (int64_t kx = 0; kx < kernel_w; ++kx) offsets.push_back(ky * dilation_h * row_width + kx * dilation_w);
    }
    return offsets;
  }
  // Planes per parallel task: enough multiply-adds (about 32k) that a task outweighs its scheduling.
  int64_t planes_per_task() const { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, out_plane() * taps())); }
};

// A zero-bordered plane whose interior is rewritten plane after plane: zeroed once when sized, after
// which only the interior rows are copied in (every plane of one convolution has the same interior).
template <typename T>
class PaddedPlane {
 public:
  // An h x w plane placed at (top, left) of a height x width one; returns the padded plane.
  const T* place(const T* src, int64_t h, int64_t w, int64_t height, int64_t width, int64_t top, int64_t left) {
    if (height != height_ || width != width_ || top != top_ || left != left_) {
      data_.assign(height * width, T(0));
      height_ = height, width_ = width, top_ = top, left_ = left;
    }
    for (int64_t y = 0; y < h; ++y) std::copy(src + y * w, src + (y + 1) * w, data_.data() + (top + y) * width + left);
    return data_.data();
  }

 private:
  std::vector<T> data_;
  int64_t height_ = -1, width_ = -1, top_ = -1, left_ = -1;
};

// Rows [0, h) of width w from a plane of row width `src_width` into a dense plane.
template <typename T>
void copy_rows(const T* src, int64_t src_width, int64_t h, int64_t w, T* dst) {
  for (int64_t y = 0; y < h; ++y) std::copy(src + y * src_width, src + y * src_width + w, dst + y * w);
}

// Per-task memory: a channel's transformed (and flipped) taps, and the scratch planes, all reused
// across the task's planes.
template <typename T>
struct TaskBuffers {
  explicit TaskBuffers(int64_t num_taps) : taps(num_taps), flipped(num_taps) {}
  std::vector<T> taps, flipped, result;
  // The input plane padded; the output gradient padded by the kernel's extent (input gradient);
  // the output gradient at the padded input's row width (weight gradient).
  PaddedPlane<T> input, grad, grad_rows;
  int64_t taps_channel = -1, flipped_channel = -1;  // whose taps current_taps and `flipped` hold
  const T* current_taps = nullptr;                  // channel taps_channel's taps: in `taps`, or the source (identity)
  bool taps_finite = true;  // whether every tap this task loaded was finite (depthwise_conv2d.h)
};

// Output channel c's kh*kw weights as the convolution uses them: f(W) computed by the shared
// transform pass as the task loads them (once per channel and task), or the source for identity.
// Loading a channel also notes whether its taps are finite: kh*kw compares per channel and task, the
// whole cost of the rule for non-finite values (tied_conv2d_kernel.cpp) in the forward and the input
// gradient.
template <typename T>
const T* channel_taps(const T* weight, int64_t c, int64_t num_taps, const TransformSpec& spec,
                      TaskBuffers<T>& buffers) {
  if (buffers.taps_channel != c) {
    const T* source = weight + c * num_taps;
    if (!spec.is_identity()) {
      cpu_transform_passes().forward(spec.kind, c10::CppTypeToScalarType<T>::value, source, buffers.taps.data(),
                                     num_taps, spec.alpha);
    }
    const T* taps = spec.is_identity() ? source : buffers.taps.data();
    buffers.taps_finite =
        buffers.taps_finite && std::all_of(taps, taps + num_taps, [](T v) { return std::isfinite(v); });
    buffers.current_taps = taps;
    buffers.taps_channel = c;
  }
  return buffers.current_taps;
}

// One input plane as the forward and the weight gradient read it: padded when the convolution pads,
// the plane itself otherwise.
template <typename T>
PlaneView<const T> padded_input(const T* plane, const DepthwiseGeometry& g, TaskBuffers<T>& buffers) {
  if (!g.has_padding()) return {plane, g.in_w};
  return {buffers.input.place(plane, g.in_h, g.in_w, g.padded_h, g.padded_w, g.pad_top, g.pad_left), g.padded_w};
}

// The same taps in reverse order: the kernel rotated by 180 degrees, for the input gradient.
template <typename T>
const T* flipped_channel_taps(const T* weight, int64_t c, int64_t num_taps, const TransformSpec& spec,
                              TaskBuffers<T>& buffers) {
  if (buffers.flipped_channel != c) {
    const T* taps = channel_taps(weight, c, num_taps, spec, buffers);
    std::reverse_copy(taps, taps + num_taps, buffers.flipped.begin());
    buffers.flipped_channel = c;
  }
  return buffers.flipped.data();
}

template <typename T>
void forward_plane(const T* in, const T* taps, T bias, T* out, const DepthwiseGeometry& g,
                   const std::vector<int64_t>& offsets, TaskBuffers<T>& buffers) {
  const PlaneView<const T> src = padded_input(in, g, buffers);
  if (!g.unit_stride()) return rows_correlate(src, taps, bias, PlaneView<T>{out, g.out_w}, g.forward());
  // The flat loop writes rows of the source's width; the output's own rows are narrower unless the
  // kernel is one column wide and nothing is padded.
  const int64_t width = src.row_stride;
  const int64_t n = (g.out_h - 1) * width + g.out_w;
  if (width == g.out_w) return flat_correlate(src.data, offsets.data(), taps, g.taps(), bias, false, out, n);
  buffers.result.resize(g.out_h * width);
  flat_correlate(src.data, offsets.data(), taps, g.taps(), bias, false, buffers.result.data(), n);
  copy_rows(buffers.result.data(), width, g.out_h, g.out_w, out);
}

// The input gradient of one input plane: the sum over its output channels [first, first + count).
// Stride 1: each channel's share is the correlation of its output gradient, zero-padded by the
// kernel's extent, with the flipped taps. Larger strides: the forward's adjoint scattered into a
// padded plane, whose interior is the gradient.
template <typename T>
void input_grad_plane(const T* grad_out, const T* weight, int64_t first, int64_t count, T* grad_in,
                      const DepthwiseGeometry& g, const TransformSpec& spec, TaskBuffers<T>& buffers) {
  if (g.unit_stride()) {
    const int64_t margin_h = (g.kernel_h - 1) * g.dilation_h, margin_w = (g.kernel_w - 1) * g.dilation_w;
    const int64_t width = g.out_w + 2 * margin_w, height = g.out_h + 2 * margin_h;
    const std::vector<int64_t> offsets = g.tap_offsets(width);
    // grad_in[iy][ix] = sum over flipped taps of grad_padded[iy + pad_top + ...][ix + pad_left + ...]
    const int64_t origin = g.pad_top * width + g.pad_left;
    const int64_t n = (g.in_h - 1) * width + g.in_w;
    buffers.result.resize(g.in_h * width);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t channel = first + i;
      const T* flipped = flipped_channel_taps(weight, channel, g.taps(), spec, buffers);
      const T* padded =
          buffers.grad.place(grad_out + channel * g.out_plane(), g.out_h, g.out_w, height, width, margin_h, margin_w);
      flat_correlate(padded + origin, offsets.data(), flipped, g.taps(), T(0),
                     /*accumulate=*/i > 0, buffers.result.data(), n);
    }
    copy_rows(buffers.result.data(), width, g.in_h, g.in_w, grad_in);
    return;
  }
  buffers.result.assign(g.padded_plane(), T(0));
  for (int64_t i = 0; i < count; ++i) {
    const int64_t channel = first + i;
    const T* taps = channel_taps(weight, channel, g.taps(), spec, buffers);
    rows_scatter(PlaneView<const T>{grad_out + channel * g.out_plane(), g.out_w}, taps,
                 PlaneView<T>{buffers.result.data(), g.padded_w}, g.forward());
  }
  copy_rows(buffers.result.data() + g.pad_top * g.padded_w + g.pad_left, g.padded_w, g.in_h, g.in_w, grad_in);
}

// One image's contribution to an output channel's weight gradient, added into grad_taps (kh*kw).
// Stride 1: one flat dot product per tap, with the output gradient laid out at the padded input's
// row width (zeros in the extra columns). Larger strides: per-column sums, added up at the end.
template <typename T>
void weight_grad_plane(const T* grad_out, const T* in, T* grad_taps, const DepthwiseGeometry& g,
                       const std::vector<int64_t>& offsets, TaskBuffers<T>& buffers) {
  const PlaneView<const T> src = padded_input(in, g, buffers);
  if (g.unit_stride()) {
    const int64_t width = src.row_stride;
    const int64_t n = (g.out_h - 1) * width + g.out_w;
    const T* grad = grad_out;
    if (width != g.out_w) grad = buffers.grad_rows.place(grad_out, g.out_h, g.out_w, g.out_h, width, 0, 0);
    return flat_dots(grad, src.data, offsets.data(), g.taps(), grad_taps, n);
  }
  buffers.result.assign(g.taps() * g.out_w, T(0));
  rows_weight_sums(PlaneView<const T>{grad_out, g.out_w}, src, buffers.result.data(), g.forward());
  for (int64_t t = 0; t < g.taps(); ++t) {
    const T* sums = buffers.result.data() + t * g.out_w;
    grad_taps[t] += std::accumulate(sums, sums + g.out_w, T(0));
  }
}

}  // namespace

bool depthwise_applies(const at::Tensor& input, const at::Tensor& weight, const TiedConv2dParams& p) {
  const auto dtype = input.scalar_type();
  return input.dim() == 4 && p.groups == input.size(1) && weight.size(1) == 1 &&
         (dtype == at::kFloat || dtype == at::kDouble) && input.numel() > 0 && weight.numel() > 0 &&
         is_nchw_call(input, weight);
}

at::Tensor depthwise_conv2d_forward(const at::Tensor& input, const at::Tensor& source_weight,
                                    const std::optional<at::Tensor>& bias, const TiedConv2dParams& p,
                                    bool* taps_finite) {
  const DepthwiseGeometry g(input, source_weight, p);
  std::atomic<bool> all_taps_finite{true};
  at::Tensor out = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options());
  const at::Tensor bias_values = bias.has_value() ? bias->contiguous() : at::Tensor();
  const std::vector<int64_t> offsets = g.tap_offsets(g.has_padding() ? g.padded_w : g.in_w);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fusedtie_depthwise_forward", [&] {
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    const scalar_t* weight = source_weight.const_data_ptr<scalar_t>();
    const scalar_t* b = bias_values.defined() ? bias_values.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    // Channel-major order, so a task transforms each channel's taps once for all its images.
    at::parallel_for(0, g.out_channels * g.batch, g.planes_per_task(), [&](int64_t begin, int64_t end) {
      TaskBuffers<scalar_t> buffers(g.taps());
      for (int64_t i = begin; i < end; ++i) {
        const int64_t c = i / g.batch, n = i % g.batch;
        const scalar_t* taps = channel_taps(weight, c, g.taps(), p.weight_transform, buffers);
        forward_plane(in + (n * g.in_channels + c / g.multiplier) * g.in_plane(), taps,
                      b != nullptr ? b[c] : scalar_t(0), o + (n * g.out_channels + c) * g.out_plane(), g, offsets,
                      buffers);
      }
      if (!buffers.taps_finite) all_taps_finite.store(false, std::memory_order_relaxed);
    });
  });
  *taps_finite = all_taps_finite.load();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& source_weight, const TiedConv2dParams& p,
    std::array<bool, 3> output_mask, bool* taps_finite) {
  const DepthwiseGeometry g(input, source_weight, p);
  std::atomic<bool> all_taps_finite{true};
  const at::Tensor grad = grad_output.contiguous();
  at::Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0]) grad_input = at::empty_like(input);
  if (output_mask[1]) grad_weight = at::empty_like(source_weight);
  if (output_mask[2]) grad_bias = at::empty({g.out_channels}, input.options());
  const std::vector<int64_t> offsets = g.tap_offsets(g.has_padding() ? g.padded_w : g.in_w);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fusedtie_depthwise_backward", [&] {
    const scalar_t* go = grad.const_data_ptr<scalar_t>();
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    const scalar_t* weight = source_weight.const_data_ptr<scalar_t>();
    scalar_t* gi = output_mask[0] ? grad_input.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gw = output_mask[1] ? grad_weight.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gb = output_mask[2] ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr;
    const auto& passes = cpu_transform_passes();
    // One task per input channel computes everything that channel owns: its input gradient and the
    // weight and bias gradients of its output channels. One parallel region for the whole backward.
    const int64_t grain = std::max<int64_t>(1, g.planes_per_task() / (g.batch * g.multiplier));
    at::parallel_for(0, g.in_channels, grain, [&](int64_t begin, int64_t end) {
      TaskBuffers<scalar_t> buffers(g.taps());
      for (int64_t ci = begin; ci < end; ++ci) {
        const int64_t first = ci * g.multiplier, last = first + g.multiplier;
        if (gw != nullptr) std::fill(gw + first * g.taps(), gw + last * g.taps(), scalar_t(0));
        if (gb != nullptr) std::fill(gb + first, gb + last, scalar_t(0));
        for (int64_t n = 0; n < g.batch; ++n) {
          const scalar_t* grad_image = go + n * g.out_channels * g.out_plane();
          const scalar_t* in_plane = in + (n * g.in_channels + ci) * g.in_plane();
          if (gi != nullptr) {
            input_grad_plane(grad_image, weight, first, g.multiplier, gi + (n * g.in_channels + ci) * g.in_plane(), g,
                             p.weight_transform, buffers);
          }
          for (int64_t c = first; c < last; ++c) {
            const scalar_t* grad_plane = grad_image + c * g.out_plane();
            if (gw != nullptr) weight_grad_plane(grad_plane, in_plane, gw + c * g.taps(), g, offsets, buffers);
            if (gb != nullptr) gb[c] += flat_sum(grad_plane, g.out_plane());
          }
        }
        // The chain rule, before the gradient leaves the kernel: dL/dW_src = f'(W_src) * dL/dW.
        if (gw != nullptr && !p.weight_transform.is_identity()) {
          passes.chain_rule(p.weight_transform.kind, input.scalar_type(), gw + first * g.taps(),
                            weight + first * g.taps(), gw + first * g.taps(), g.multiplier * g.taps(),
                            p.weight_transform.alpha);
        }
      }
      if (!buffers.taps_finite) all_taps_finite.store(false, std::memory_order_relaxed);
    });
  });
  *taps_finite = all_taps_finite.load();
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace fusedtie
