// The CUDA-core kernels of fused_conv2d.h: forward and input gradient as one implicit-GEMM template,
// the weight gradient as a split implicit GEMM with a fixed-order reduction, the bias gradient as a
// fixed-order reduction per channel. Every index is 64-bit; accumulation is in float (double for
// float64), and f / f' are evaluated in that type before anything is rounded.
//
// Plain CUDA C++ throughout (no inline PTX), launched through cuda_emulation.h, so that
// tests/cuda_emulation/ can also run this file, host code and kernels, on the CPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "cuda_emulation.h"
#include "device_transforms.cuh"
#include "fused_conv2d.h"

namespace fusedtie {
namespace cuda {
namespace {

// A 64x64 output tile per block of 256 threads, each thread a 4x4 block of it; K in steps of 16.
constexpr int kTileM = 64, kTileN = 64, kTileK = 16, kThreads = 256;

// acc (this thread's 4x4 block at rows ty*4.., columns tx*4..) += a_tile^T . b_tile over one K-step.
template <typename acc_t>
__device__ __forceinline__ void multiply_tiles(const acc_t (&a_tile)[kTileK][kTileM + 4],
                                               const acc_t (&b_tile)[kTileK][kTileN + 4], acc_t (&acc)[4][4], int tx,
                                               int ty) {
#pragma unroll
  for (int kk = 0; kk < kTileK; ++kk) {
    acc_t a[4], b[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = a_tile[kk][ty * 4 + i];
#pragma unroll
    for (int j = 0; j < 4; ++j) b[j] = b_tile[kk][tx * 4 + j];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
  }
}

// The implicit GEMM of the forward (kInputGrad false) and of the input gradient (true), for one
// group (blockIdx.z):
//   forward:        rows (n, oh, ow) of y, columns the group's output channels, K = (ci, r, s);
//                   A = x at (oh*sh - pad_top + r*dh, ow*sw - pad_left + s*dw), zero in the padding;
//                   B[k][co] = f(W[co][ci][r][s]); epilogue + g(b[co]).
//   input gradient: rows (n, h, w) of dx, columns the group's input channels, K = (co, r, s);
//                   A = dy at ((h + pad_top - r*dh) / sh, ...) where that divides exactly and lies
//                   inside dy (the positions whose window covers (h, w) through tap (r, s));
//                   B[k][ci] = f(W[co][ci][r][s]); epilogue + g(b[ci]) when there is a bias (the
//                   transposed convolution's forward, fused_transpose_forward; never a gradient).
template <typename scalar_t, bool kInputGrad>
__device__ __forceinline__ void implicit_gemm_tile(const scalar_t* __restrict__ src,
                                                   const scalar_t* __restrict__ weight,
                                                   const scalar_t* __restrict__ bias, scalar_t* __restrict__ dst,
                                                   const ConvGeometry& g, TransformSpec wt, TransformSpec bt) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t a_tile[kTileK][kTileM + 4];
  __shared__ acc_t b_tile[kTileK][kTileN + 4];

  const int group = blockIdx.z;
  const int64_t rows_h = kInputGrad ? g.in_h : g.out_h, rows_w = kInputGrad ? g.in_w : g.out_w;
  const int64_t rows = g.batch * rows_h * rows_w;
  const int64_t cols = kInputGrad ? g.in_per_group : g.out_per_group;
  const int64_t taps = int64_t(g.kernel_h) * g.kernel_w;
  const int taps32 = static_cast<int>(taps);
  const int64_t depth = (kInputGrad ? g.out_per_group : g.in_per_group) * taps;
  const int64_t* src_stride = kInputGrad ? g.y_stride : g.x_stride;
  const int64_t src_channel0 = group * (kInputGrad ? g.out_per_group : g.in_per_group);
  const int64_t row0 = blockIdx.x * int64_t(kTileM), col0 = blockIdx.y * int64_t(kTileN);
  const int tid = threadIdx.x;
  const acc_t w_alpha = static_cast<acc_t>(wt.alpha);

  // This thread's A row (fixed for the whole K loop) and B column offsets.
  const int a_row = tid % kTileM, a_k0 = tid / kTileM;  // a_k0 in [0, 4)
  const int64_t row = row0 + a_row;
  const bool row_valid = row < rows;
  const int64_t row_n = row_valid ? row / (rows_h * rows_w) : 0;
  const int64_t row_y = row_valid ? (row / rows_w) % rows_h : 0;
  const int64_t row_x = row_valid ? row % rows_w : 0;
  const int b_k = tid % kTileK, b_col0 = tid / kTileK;  // b_col0 in [0, 16)

  acc_t acc[4][4] = {};
  const int tx = tid % 16, ty = tid / 16;

  for (int64_t k0 = 0; k0 < depth; k0 += kTileK) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int kk = a_k0 + 4 * i;
      const int64_t k = k0 + kk;
      acc_t value = acc_t(0);
      if (row_valid && k < depth) {
        // 32-bit division: the host admits only depth <= INT_MAX.
        const int channel = static_cast<int>(k) / taps32;
        const int tap = static_cast<int>(k) % taps32, r = tap / g.kernel_w, s = tap % g.kernel_w;
        if (!kInputGrad) {
          const int64_t ih = row_y * g.stride_h - g.pad_top + int64_t(r) * g.dilation_h;
          const int64_t iw = row_x * g.stride_w - g.pad_left + int64_t(s) * g.dilation_w;
          if (ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w) {
            value = static_cast<acc_t>(src[row_n * src_stride[0] + (src_channel0 + channel) * src_stride[1] +
                                           ih * src_stride[2] + iw * src_stride[3]]);
          }
        } else {
          const int64_t th = row_y + g.pad_top - int64_t(r) * g.dilation_h;
          const int64_t tw = row_x + g.pad_left - int64_t(s) * g.dilation_w;
          if (th >= 0 && tw >= 0 && th % g.stride_h == 0 && tw % g.stride_w == 0) {
            const int64_t oh = th / g.stride_h, ow = tw / g.stride_w;
            if (oh < g.out_h && ow < g.out_w) {
              value = static_cast<acc_t>(src[row_n * src_stride[0] + (src_channel0 + channel) * src_stride[1] +
                                             oh * src_stride[2] + ow * src_stride[3]]);
            }
          }
        }
      }
      a_tile[kk][a_row] = value;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int cc = b_col0 + 16 * i;
      const int64_t col = col0 + cc, k = k0 + b_k;
      acc_t value = acc_t(0);
      if (col < cols && k < depth) {
        const int channel = static_cast<int>(k) / taps32;
        const int tap = static_cast<int>(k) % taps32, r = tap / g.kernel_w, s = tap % g.kernel_w;
        const int64_t co = group * g.out_per_group + (kInputGrad ? channel : col);
        const int64_t ci = kInputGrad ? col : channel;
        const scalar_t w = weight[co * g.w_stride[0] + ci * g.w_stride[1] + r * g.w_stride[2] + s * g.w_stride[3]];
        value = transform_forward<acc_t>(wt.kind, static_cast<acc_t>(w), w_alpha);
      }
      b_tile[b_k][cc] = value;
    }
    __syncthreads();
    multiply_tiles(a_tile, b_tile, acc, tx, ty);
    __syncthreads();
  }

  const int64_t* dst_stride = kInputGrad ? g.x_stride : g.y_stride;
  const int64_t dst_channel0 = group * cols;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = row0 + ty * 4 + i;
    if (m >= rows) continue;
    const int64_t n = m / (rows_h * rows_w), y = (m / rows_w) % rows_h, x = m % rows_w;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t col = col0 + tx * 4 + j;
      if (col >= cols) continue;
      acc_t value = acc[i][j];
      if (bias != nullptr) {
        value += transform_forward<acc_t>(bt.kind, static_cast<acc_t>(bias[dst_channel0 + col]),
                                          static_cast<acc_t>(bt.alpha));
      }
      dst[n * dst_stride[0] + (dst_channel0 + col) * dst_stride[1] + y * dst_stride[2] + x * dst_stride[3]] =
          static_cast<scalar_t>(value);
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fusedtie_conv2d_fprop_simt_kernel(const scalar_t* src, const scalar_t* weight, const scalar_t* bias, scalar_t* dst,
                                      ConvGeometry g, TransformSpec wt, TransformSpec bt) {
  implicit_gemm_tile<scalar_t, false>(src, weight, bias, dst, g, wt, bt);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fusedtie_conv2d_dgrad_simt_kernel(const scalar_t* src, const scalar_t* weight, const scalar_t* bias, scalar_t* dst,
                                      ConvGeometry g, TransformSpec wt, TransformSpec bt) {
  implicit_gemm_tile<scalar_t, true>(src, weight, bias, dst, g, wt, bt);
}

// The weight gradient of one group (blockIdx.z / splits) over one split of the pixels
// (blockIdx.z % splits): rows the group's output channels, columns (ci, r, s), K the pixels
// (n, oh, ow) of the split. A[co][p] = dy, B[p][(ci, r, s)] = x under tap (r, s) (zero in the
// padding). One split writes dL/dW_src directly (times f'(W)); several write partial sums that
// fusedtie_conv2d_wgrad_reduce_kernel adds in split order.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fusedtie_conv2d_wgrad_simt_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ input,
                                      const scalar_t* __restrict__ weight, scalar_t* __restrict__ grad_weight,
                                      at::opmath_type<scalar_t>* __restrict__ partial, ConvGeometry g, int splits,
                                      int64_t pixels_per_split, TransformSpec wt) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t a_tile[kTileK][kTileM + 4];
  __shared__ acc_t b_tile[kTileK][kTileN + 4];

  const int group = blockIdx.z / splits, split = blockIdx.z % splits;
  const int64_t taps = int64_t(g.kernel_h) * g.kernel_w;
  const int64_t rows = g.out_per_group, cols = g.in_per_group * taps;
  const int64_t out_plane = g.out_h * g.out_w;
  const int64_t pixels = g.batch * out_plane;
  const int64_t p_begin = split * pixels_per_split;
  const int64_t p_end = p_begin + pixels_per_split < pixels ? p_begin + pixels_per_split : pixels;
  const int64_t row0 = blockIdx.x * int64_t(kTileM), col0 = blockIdx.y * int64_t(kTileN);
  const int tid = threadIdx.x;

  // A loads: pixel kk fastest across threads would read dy with stride; the channel (row) fastest
  // suits channels-last dy, the pixel fastest NCHW. Threads take the row fastest.
  const int a_row = tid % kTileM, a_k0 = tid / kTileM;
  const int b_col = tid % kTileN, b_k0 = tid / kTileN;
  const int64_t b_c = col0 + b_col;
  const bool b_valid = b_c < cols;
  const int64_t b_ci = b_valid ? b_c / taps : 0;
  const int b_tap = b_valid ? static_cast<int>(b_c % taps) : 0;
  const int b_r = b_tap / g.kernel_w, b_s = b_tap % g.kernel_w;

  acc_t acc[4][4] = {};
  const int tx = tid % 16, ty = tid / 16;

  for (int64_t k0 = p_begin; k0 < p_end; k0 += kTileK) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int kk = a_k0 + 4 * i;
      const int64_t pixel = k0 + kk, co = row0 + a_row;
      acc_t value = acc_t(0);
      if (pixel < p_end && co < rows) {
        const int64_t n = pixel / out_plane, oh = (pixel / g.out_w) % g.out_h, ow = pixel % g.out_w;
        value = static_cast<acc_t>(grad_output[n * g.y_stride[0] + (group * g.out_per_group + co) * g.y_stride[1] +
                                               oh * g.y_stride[2] + ow * g.y_stride[3]]);
      }
      a_tile[kk][a_row] = value;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int kk = b_k0 + 4 * i;
      const int64_t pixel = k0 + kk;
      acc_t value = acc_t(0);
      if (pixel < p_end && b_valid) {
        const int64_t n = pixel / out_plane, oh = (pixel / g.out_w) % g.out_h, ow = pixel % g.out_w;
        const int64_t ih = oh * g.stride_h - g.pad_top + int64_t(b_r) * g.dilation_h;
        const int64_t iw = ow * g.stride_w - g.pad_left + int64_t(b_s) * g.dilation_w;
        if (ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w) {
          value = static_cast<acc_t>(input[n * g.x_stride[0] + (group * g.in_per_group + b_ci) * g.x_stride[1] +
                                           ih * g.x_stride[2] + iw * g.x_stride[3]]);
        }
      }
      b_tile[kk][b_col] = value;
    }
    __syncthreads();
    multiply_tiles(a_tile, b_tile, acc, tx, ty);
    __syncthreads();
  }

  const acc_t w_alpha = static_cast<acc_t>(wt.alpha);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t co = row0 + ty * 4 + i;
    if (co >= rows) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = col0 + tx * 4 + j;
      if (c >= cols) continue;
      if (splits == 1) {
        // The chain rule in the epilogue: dL/dW_src = f'(W_src) * dL/dW.
        const int64_t ci = c / taps;
        const int tap = static_cast<int>(c % taps), r = tap / g.kernel_w, s = tap % g.kernel_w;
        const int64_t offset =
            (group * g.out_per_group + co) * g.w_stride[0] + ci * g.w_stride[1] + r * g.w_stride[2] + s * g.w_stride[3];
        grad_weight[offset] = static_cast<scalar_t>(
            acc[i][j] * transform_derivative<acc_t>(wt.kind, static_cast<acc_t>(weight[offset]), w_alpha));
      } else {
        partial[((int64_t(split) * g.groups + group) * rows + co) * cols + c] = acc[i][j];
      }
    }
  }
}

// dL/dW_src[co][(ci, r, s)] = f'(W_src) * the sum of the splits' partial sums, in split order.
template <typename scalar_t>
__global__ void fusedtie_conv2d_wgrad_reduce_kernel(const at::opmath_type<scalar_t>* __restrict__ partial,
                                                    const scalar_t* __restrict__ weight,
                                                    scalar_t* __restrict__ grad_weight, ConvGeometry g, int splits,
                                                    TransformSpec wt) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t taps = int64_t(g.kernel_h) * g.kernel_w;
  const int64_t cols = g.in_per_group * taps;
  const int64_t total = g.out_channels * cols;  // groups * out_per_group rows
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(blockDim.x) * gridDim.x) {
    acc_t sum = acc_t(0);
    for (int split = 0; split < splits; ++split) sum += partial[split * total + i];
    const int64_t co = i / cols, c = i % cols, ci = c / taps;
    const int tap = static_cast<int>(c % taps), r = tap / g.kernel_w, s = tap % g.kernel_w;
    const int64_t offset = co * g.w_stride[0] + ci * g.w_stride[1] + r * g.w_stride[2] + s * g.w_stride[3];
    grad_weight[offset] = static_cast<scalar_t>(
        sum * transform_derivative<acc_t>(wt.kind, static_cast<acc_t>(weight[offset]), static_cast<acc_t>(wt.alpha)));
  }
}

// dL/d g(b)[co] = the sum of dy over (n, oh, ow): one block per channel, a fixed-order tree.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fusedtie_conv2d_bias_grad_kernel(const scalar_t* __restrict__ grad_output, scalar_t* __restrict__ grad_bias,
                                     ConvGeometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t sums[kThreads];
  const int64_t co = blockIdx.x;
  const int64_t out_plane = g.out_h * g.out_w, pixels = g.batch * out_plane;
  acc_t sum = acc_t(0);
  for (int64_t p = threadIdx.x; p < pixels; p += kThreads) {
    const int64_t n = p / out_plane, oh = (p / g.out_w) % g.out_h, ow = p % g.out_w;
    sum += static_cast<acc_t>(
        grad_output[n * g.y_stride[0] + co * g.y_stride[1] + oh * g.y_stride[2] + ow * g.y_stride[3]]);
  }
  sums[threadIdx.x] = sum;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) sums[threadIdx.x] += sums[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) grad_bias[co] = static_cast<scalar_t>(sums[0]);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

void launch_simt_conv(const at::Tensor& src, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const at::Tensor& dst, const ConvGeometry& g, TransformSpec weight_transform,
                      TransformSpec bias_transform, bool input_grad) {
  const int64_t rows = g.batch * (input_grad ? g.in_h * g.in_w : g.out_h * g.out_w);
  const int64_t cols = input_grad ? g.in_per_group : g.out_per_group;
  const dim3 grid(static_cast<unsigned>(ceil_div(rows, kTileM)), static_cast<unsigned>(ceil_div(cols, kTileN)),
                  static_cast<unsigned>(g.groups));
  const auto stream = current_stream();
  FUSEDTIE_DISPATCH_SUPPORTED_TYPES(src.scalar_type(), "fusedtie_conv2d_simt", [&] {
    if (input_grad) {
      FUSEDTIE_LAUNCH(fusedtie_conv2d_dgrad_simt_kernel<scalar_t>, grid, kThreads, stream)(
          src.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
          bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr, dst.mutable_data_ptr<scalar_t>(), g,
          weight_transform, bias_transform);
    } else {
      FUSEDTIE_LAUNCH(fusedtie_conv2d_fprop_simt_kernel<scalar_t>, grid, kThreads, stream)(
          src.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
          bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr, dst.mutable_data_ptr<scalar_t>(), g,
          weight_transform, bias_transform);
    }
    FUSEDTIE_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> fused_weight_and_bias_grad(const at::Tensor& grad_output, const at::Tensor& input,
                                                              const at::Tensor& source_weight,
                                                              const TiedConv2dParams& p, bool weight_grad,
                                                              bool bias_grad) {
  // The kernels read W_src and write dL/dW_src at the same offsets: one layout for both.
  const at::Tensor weight = source_weight.contiguous(source_weight.suggest_memory_format());
  const ConvGeometry g = make_geometry(input, weight, p, input.strides(), grad_output.strides());
  const auto stream = current_stream();
  const TransformSpec wt = p.weight_transform;
  at::Tensor grad_weight, grad_bias;
  FUSEDTIE_DISPATCH_SUPPORTED_TYPES(input.scalar_type(), "fusedtie_conv2d_wgrad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (weight_grad) {
      grad_weight = at::empty_like(weight);
      const int64_t taps = int64_t(g.kernel_h) * g.kernel_w;
      const int64_t tiles = ceil_div(g.out_per_group, kTileM) * ceil_div(g.in_per_group * taps, kTileN) * g.groups;
      const int64_t pixels = g.batch * g.out_h * g.out_w;
      // Enough blocks for two waves of the device, each split at least 8 K-steps long.
      const int64_t sms = multiprocessor_count();
      int64_t splits = std::min<int64_t>(ceil_div(2 * sms, tiles), ceil_div(pixels, 8 * kTileK));
      splits = std::max<int64_t>(1, std::min<int64_t>(splits, std::min<int64_t>(64, 65535 / g.groups)));
      const int64_t pixels_per_split = ceil_div(ceil_div(pixels, splits), kTileK) * kTileK;
      splits = ceil_div(pixels, pixels_per_split);
      at::Tensor partial;
      if (splits > 1) {
        partial = at::empty({splits, g.out_channels, g.in_per_group * taps},
                            input.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      }
      const dim3 grid(static_cast<unsigned>(ceil_div(g.out_per_group, kTileM)),
                      static_cast<unsigned>(ceil_div(g.in_per_group * taps, kTileN)),
                      static_cast<unsigned>(g.groups * splits));
      FUSEDTIE_LAUNCH(fusedtie_conv2d_wgrad_simt_kernel<scalar_t>, grid, kThreads, stream)(
          grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
          splits == 1 ? weight.const_data_ptr<scalar_t>() : nullptr,
          splits == 1 ? grad_weight.mutable_data_ptr<scalar_t>() : nullptr,
          splits > 1 ? partial.mutable_data_ptr<acc_t>() : nullptr, g, static_cast<int>(splits), pixels_per_split, wt);
      FUSEDTIE_LAUNCH_CHECK();
      if (splits > 1) {
        const int64_t total = g.out_channels * g.in_per_group * taps;
        const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(total, kThreads), 8 * sms));
        FUSEDTIE_LAUNCH(fusedtie_conv2d_wgrad_reduce_kernel<scalar_t>, blocks, kThreads, stream)(
            partial.const_data_ptr<acc_t>(), weight.const_data_ptr<scalar_t>(),
            grad_weight.mutable_data_ptr<scalar_t>(), g, static_cast<int>(splits), wt);
        FUSEDTIE_LAUNCH_CHECK();
      }
    }
    if (bias_grad) {
      grad_bias = at::empty({g.out_channels}, input.options());
      const dim3 channels(static_cast<unsigned>(g.out_channels));
      FUSEDTIE_LAUNCH(fusedtie_conv2d_bias_grad_kernel<scalar_t>, channels, kThreads, stream)(
          grad_output.const_data_ptr<scalar_t>(), grad_bias.mutable_data_ptr<scalar_t>(), g);
      FUSEDTIE_LAUNCH_CHECK();
    }
  });
  return {grad_weight, grad_bias};
}

}  // namespace cuda
}  // namespace fusedtie
