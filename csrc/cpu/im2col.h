#pragma once
// The column matrix of a 2-D convolution, shared by the GEMM paths (gemm_conv2d.cpp: BLAS on f(W);
// brgemm_conv2d.cpp: oneDNN's micro-kernel on f applied tile by tile). Shapes: input [N, C, H, W],
// weight [O, C, kh, kw], one image's columns [C*kh*kw, L] with L = out_h * out_w, output [N, O, L]
// viewed as [N, O, out_h, out_w]. im2col and col2im are our own parallel loops: ATen's at::im2col
// is single-threaded and took longer than the GEMM it feeds on the 7x7 ResNet shapes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "gemm_conv2d.h"

namespace fusedtie::columns_detail {

struct Geometry {
  int64_t channels, height, width, kernel_h, kernel_w, out_h, out_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  bool pointwise;  // the image is already the column matrix

  Geometry(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
           at::IntArrayRef dilation)
      : channels(input.size(1)),
        height(input.size(2)),
        width(input.size(3)),
        kernel_h(weight.size(2)),
        kernel_w(weight.size(3)),
        stride_h(stride[0]),
        stride_w(stride[1]),
        pad_h(padding[0]),
        pad_w(padding[1]),
        dilation_h(dilation[0]),
        dilation_w(dilation[1]),
        pointwise(is_pointwise(kernel_h, kernel_w, stride, padding)) {
    out_h = (height + 2 * pad_h - dilation_h * (kernel_h - 1) - 1) / stride_h + 1;
    out_w = (width + 2 * pad_w - dilation_w * (kernel_w - 1) - 1) / stride_w + 1;
  }
  int64_t rows() const { return channels * kernel_h * kernel_w; }
  int64_t positions() const { return out_h * out_w; }
};

// Row r = (c, ki, kj) of the column matrix holds input[c, y*sh - ph + ki*dh, x*sw - pw + kj*dw] for
// every output position (y, x), zero where that falls in the padding. Each output row splits into
// a left margin, a run of valid columns (a plain copy at stride 1) and a right margin.
template <typename scalar_t>
inline void im2col(const scalar_t* image, scalar_t* cols, int64_t row_stride, const Geometry& g) {
  const int64_t taps = g.kernel_h * g.kernel_w;
  at::parallel_for(0, g.rows(), 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t c = r / taps, ki = (r / g.kernel_w) % g.kernel_h, kj = r % g.kernel_w;
      // Output columns x whose input column x*sw - pw + kj*dw lies in [0, width): [x_lo, x_hi).
      const int64_t offset = kj * g.dilation_w - g.pad_w;
      const auto ceil_div = [](int64_t a, int64_t b) { return a / b + (a % b != 0); };  // a >= 0, no overflow
      const int64_t x_lo = std::min(g.out_w, offset >= 0 ? 0 : ceil_div(-offset, g.stride_w));
      const int64_t x_hi =
          std::max(x_lo, std::min(g.out_w, g.width - offset <= 0 ? 0 : ceil_div(g.width - offset, g.stride_w)));
      scalar_t* dst = cols + r * row_stride;
      for (int64_t y = 0; y < g.out_h; ++y, dst += g.out_w) {
        const int64_t iy = y * g.stride_h - g.pad_h + ki * g.dilation_h;
        if (iy < 0 || iy >= g.height) {
          std::fill(dst, dst + g.out_w, scalar_t(0));
          continue;
        }
        const scalar_t* src = image + (c * g.height + iy) * g.width + offset;
        // Plain loops, not std::copy: rows are short (7 to 56), where a library call costs more
        // than the copy; the compiler vectorises these.
        for (int64_t x = 0; x < x_lo; ++x) dst[x] = scalar_t(0);
        if (g.stride_w == 1) {
          for (int64_t x = x_lo; x < x_hi; ++x) dst[x] = src[x];
        } else {
          for (int64_t x = x_lo; x < x_hi; ++x) dst[x] = src[x * g.stride_w];
        }
        for (int64_t x = x_hi; x < g.out_w; ++x) dst[x] = scalar_t(0);
      }
    }
  });
}

// The column matrix transposed, for a batch: cols_t[n, r] with n = image * L + position and r as in
// im2col, written row by row (one output position's K inputs are contiguous, the layout the brgemm
// forward reads as its GEMM's left operand). One pass, instead of im2col and then a transpose.
template <typename scalar_t>
inline void im2col_transposed(const scalar_t* images, int64_t batch, scalar_t* cols_t, const Geometry& g) {
  const int64_t L = g.positions(), taps = g.kernel_h * g.kernel_w, plane = g.height * g.width;
  at::parallel_for(0, batch * L, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> tap_offset(taps);  // within a channel plane; -1 where the tap is padding
    for (int64_t n = begin; n < end; ++n) {
      const int64_t y = (n % L) / g.out_w, x = n % g.out_w;
      for (int64_t ki = 0; ki < g.kernel_h; ++ki) {
        const int64_t iy = y * g.stride_h - g.pad_h + ki * g.dilation_h;
        for (int64_t kj = 0; kj < g.kernel_w; ++kj) {
          const int64_t ix = x * g.stride_w - g.pad_w + kj * g.dilation_w;
          const bool inside = iy >= 0 && iy < g.height && ix >= 0 && ix < g.width;
          tap_offset[ki * g.kernel_w + kj] = inside ? iy * g.width + ix : -1;
        }
      }
      const scalar_t* image = images + (n / L) * g.channels * plane;
      scalar_t* row = cols_t + n * g.rows();
      for (int64_t c = 0; c < g.channels; ++c, row += taps, image += plane) {
        for (int64_t t = 0; t < taps; ++t) row[t] = tap_offset[t] >= 0 ? image[tap_offset[t]] : scalar_t(0);
      }
    }
  });
}

// The adjoint of im2col: every column entry is added back onto the input pixel it was copied from.
// One task per channel, so no two tasks write the same pixel.
template <typename scalar_t>
inline void col2im(const scalar_t* cols, int64_t row_stride, scalar_t* image, const Geometry& g) {
  at::parallel_for(0, g.channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      scalar_t* plane = image + c * g.height * g.width;
      std::fill(plane, plane + g.height * g.width, scalar_t(0));
      for (int64_t ki = 0; ki < g.kernel_h; ++ki) {
        for (int64_t kj = 0; kj < g.kernel_w; ++kj) {
          const scalar_t* src = cols + ((c * g.kernel_h + ki) * g.kernel_w + kj) * row_stride;
          for (int64_t y = 0; y < g.out_h; ++y, src += g.out_w) {
            const int64_t iy = y * g.stride_h - g.pad_h + ki * g.dilation_h;
            if (iy < 0 || iy >= g.height) continue;
            scalar_t* row = plane + iy * g.width;
            for (int64_t x = 0; x < g.out_w; ++x) {
              const int64_t ix = x * g.stride_w - g.pad_w + kj * g.dilation_w;
              if (ix >= 0 && ix < g.width) row[ix] += src[x];
            }
          }
        }
      }
    }
  });
}

// Small outputs make small GEMMs: below this many output positions per image, all images' columns
// go side by side into one [C*kh*kw, N*L] matrix and each convolution step is one GEMM (at batch 8
// on 7x7 outputs, one GEMM per image was up to 1.6x slower than oneDNN; one GEMM for the batch is
// what lets the GEMM path win there). Large outputs keep one GEMM per image, which is already large
// and, for pointwise convolutions, reads the image in place instead of copying it.
inline constexpr int64_t kBatchedBelowPositions = 1024;

inline bool batched(const at::Tensor& input, const Geometry& g) {
  return input.size(0) > 1 && g.positions() < kBatchedBelowPositions;
}

// Images [n0, n0 + count) as columns: [C*kh*kw, count*L], image n0 + i in columns [i*L, (i+1)*L).
// im2col writes into `cols`, allocated at the first call and reused by the next groups of images.
inline at::Tensor columns(const at::Tensor& input, int64_t n0, int64_t count, const Geometry& g, at::Tensor& cols) {
  const int64_t L = g.positions();
  if (g.pointwise) {
    const at::Tensor images = input.narrow(0, n0, count).view({count, g.channels, L});
    return count == 1 ? images[0] : images.permute({1, 0, 2}).reshape({g.channels, count * L});
  }
  if (!cols.defined()) cols = at::empty({g.rows(), count * L}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fusedtie_im2col", [&] {
    for (int64_t i = 0; i < count; ++i) {
      im2col(input[n0 + i].const_data_ptr<scalar_t>(), cols.mutable_data_ptr<scalar_t>() + i * L, count * L, g);
    }
  });
  return cols;
}

// [count, O, L] (the output layout) from [O, count*L] (the GEMM's).
inline at::Tensor images_first(const at::Tensor& per_channel, int64_t count, int64_t L) {
  const int64_t channels = per_channel.size(0);
  return count == 1 ? per_channel.view({1, channels, L})
                    : per_channel.view({channels, count, L}).permute({1, 0, 2}).contiguous();
}

}  // namespace fusedtie::columns_detail
