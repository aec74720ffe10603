// See brgemm_conv2d.h. Every GEMM here is C = A . B over row-major blocks, run by
// at::native::cpublas::brgemm (batch size 1), parallel over disjoint blocks of C only, so each
// result is summed in one fixed order whatever the thread count.
//   forward:      Yt[N, O] = cols_t[N, K] . f(W)^T[K, O]   B = f(W)^T tile, packed here
//   input grad:   dcols[K, N] = f(W)^T[K, O] . dY[O, N]     A = f(W)^T tile, packed here
//   weight grad:  dW[O, K] = dY[O, N] . cols^T[N, K]        then dW *= f'(W) on the same tile
// with K = C*kh*kw and N = batch * output positions (the batch's columns side by side).
#include "brgemm_conv2d.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/record_function.h>

#include <vector>

#include "conv_algorithm.h"
#include "gemm_conv2d.h"
#include "im2col.h"
#include "scratch.h"
#include "transform_passes.h"

namespace fusedtie {

using namespace columns_detail;

namespace {

// Weight-gradient tiles: kTileRows x kWeightCols of dW, reduced over kPositionsPerStep positions at
// a time.
constexpr int64_t kTileRows = 64;
constexpr int64_t kWeightCols = 256;
constexpr int64_t kPositionsPerStep = 1024;
// Forward: output channels per packed f(W)^T tile (whole AVX-512 or AVX2 vectors), the depth of
// each tile (128 KiB, L2-resident), and the fewest positions worth a split of their own.
constexpr int64_t kChannelBlock = 64;
constexpr int64_t kPackDepth = 512;
constexpr int64_t kMinSplitPositions = 32;
constexpr int64_t kTransposeRows = 64;
// Rows of dcols per input-gradient task and output channels per reduction step.
constexpr int64_t kGradRows = 64;
constexpr int64_t kGradDepth = 256;

void brgemm(int64_t m, int64_t n, int64_t k, int64_t ld_a, int64_t ld_b, int64_t ld_c, bool add_c, const float* a,
            const float* b, float* c) {
  at::native::cpublas::brgemm(m, n, k, ld_a, ld_b, ld_c, add_c, a, b, c, /*is_vnni=*/false);
}

// Yt[N, O] (= out_t, ld O) = cols_t[N, K] . f(W)^T[K, O] (+ bias per column). Output channels sit in
// the vector lanes (64 per tile, whole vectors), as in oneDNN's own kernels; positions are the GEMM's
// rows, so a 7x7 output wastes no lanes. Each task owns a block of output channels (and, where
// those are fewer than the threads, a range of positions) and sums over K in one fixed order.
void forward_gemm(const float* weight, const TransformSpec& f, const float* cols_t, const float* bias, float* out_t,
                  int64_t O, int64_t K, int64_t N) {
  const TransformPasses& passes = cpu_transform_passes();
  const int64_t channel_blocks = (O + kChannelBlock - 1) / kChannelBlock;
  // Splitting positions repacks the same tiles once per split, so split only to occupy threads.
  const int64_t threads = at::get_num_threads();
  const int64_t splits = std::clamp<int64_t>((threads + channel_blocks - 1) / channel_blocks, 1,
                                             std::max<int64_t>(1, N / kMinSplitPositions));
  const int64_t split_rows = (N + splits - 1) / splits;
  at::parallel_for(0, channel_blocks * splits, 1, [&](int64_t begin, int64_t end) {
    at::Tensor tile_fallback;
    float* tile = thread_scratch(ScratchSlot::kTile, kPackDepth * kChannelBlock, tile_fallback);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t o0 = (task / splits) * kChannelBlock, channels = std::min(kChannelBlock, O - o0);
      const int64_t n0 = (task % splits) * split_rows, rows = std::min(split_rows, N - n0);
      if (rows <= 0) continue;
      float* y = out_t + n0 * O + o0;
      if (bias != nullptr) {
        for (int64_t n = 0; n < rows; ++n) std::copy(bias + o0, bias + o0 + channels, y + n * O);
      }
      for (int64_t k0 = 0; k0 < K; k0 += kPackDepth) {
        const int64_t depth = std::min(kPackDepth, K - k0);
        passes.forward_transposed(f.kind, weight + o0 * K + k0, K, tile, channels, channels, depth, f.alpha);
        brgemm(rows, channels, depth, K, channels, O, bias != nullptr || k0 > 0, cols_t + n0 * K + k0, tile, y);
      }
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/false);
  });
}

// dst[c * ld_dst + r] = src[r * ld_src + c], rows x cols, in parallel over row blocks.
void transpose(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t rows, int64_t cols) {
  const TransformPasses& passes = cpu_transform_passes();
  const TransformSpec identity{};
  at::parallel_for(0, rows, kTransposeRows, [&](int64_t begin, int64_t end) {
    passes.forward_transposed(identity.kind, src + begin * ld_src, ld_src, dst + begin, ld_dst, end - begin, cols,
                              identity.alpha);
  });
}

// dcols[K, N] = f(W)^T[K, O] . dY[O, N]: each task owns kGradRows rows of dcols and sums over all
// output channels; the f(W)^T tile is f over a [o-block, k-block] tile of W, transposed.
void input_grad_gemm(const float* weight, const TransformSpec& f, const float* grad, float* dcols, int64_t O, int64_t K,
                     int64_t N) {
  const int64_t blocks = (K + kGradRows - 1) / kGradRows;
  const TransformPasses& passes = cpu_transform_passes();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor tile_fallback;
    float* tile_t = thread_scratch(ScratchSlot::kTile, kGradRows * kGradDepth, tile_fallback);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t k0 = block * kGradRows, rows = std::min(kGradRows, K - k0);
      for (int64_t o0 = 0; o0 < O; o0 += kGradDepth) {
        const int64_t depth = std::min(kGradDepth, O - o0);
        passes.forward_transposed(f.kind, weight + o0 * K + k0, K, tile_t, kGradDepth, depth, rows, f.alpha);
        brgemm(rows, N, depth, kGradDepth, N, N, o0 > 0, tile_t, grad + o0 * N, dcols + k0 * N);
      }
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/false);
  });
}

// dW[O, K] = dY[O, N] . cols_t[N, K], then dW = dW * f'(W) on each tile while it is in cache.
void weight_grad_gemm(const float* grad, const float* cols_t, const float* weight, const TransformSpec& f,
                      float* grad_weight, int64_t O, int64_t K, int64_t N) {
  const int64_t row_blocks = (O + kTileRows - 1) / kTileRows, col_blocks = (K + kWeightCols - 1) / kWeightCols;
  const TransformPasses& passes = cpu_transform_passes();
  at::parallel_for(0, row_blocks * col_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o0 = (t / col_blocks) * kTileRows, rows = std::min(kTileRows, O - o0);
      const int64_t k0 = (t % col_blocks) * kWeightCols, cols = std::min(kWeightCols, K - k0);
      float* dw = grad_weight + o0 * K + k0;
      for (int64_t n0 = 0; n0 < N; n0 += kPositionsPerStep) {
        const int64_t depth = std::min(kPositionsPerStep, N - n0);
        brgemm(rows, cols, depth, N, K, K, n0 > 0, grad + o0 * N + n0, cols_t + n0 * K + k0, dw);
      }
      if (!f.is_identity()) {
        for (int64_t r = 0; r < rows; ++r) {
          passes.chain_rule(f.kind, at::kFloat, dw + r * K, weight + (o0 + r) * K + k0, dw + r * K, cols, f.alpha);
        }
      }
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/false);
  });
}

// The batch's output gradient as [O, batch * L] (contiguous).
at::Tensor batch_grad_columns(const at::Tensor& grad_output, int64_t out_channels, int64_t L) {
  const int64_t batch = grad_output.size(0);
  const at::Tensor grad = grad_output.reshape({batch, out_channels, L});
  return batch == 1 ? grad[0].contiguous() : grad.permute({1, 0, 2}).reshape({out_channels, batch * L}).contiguous();
}

}  // namespace

bool brgemm_micro_kernel_available() {
  // The capability is fixed for the process; oneDNN can be switched off at run time.
  static const bool isa_supported = [] {
    const std::string capability = at::get_cpu_capability();
    return capability == "AVX2" || capability == "AVX512";
  }();
  return isa_supported && at::globalContext().userEnabledMkldnn();
}

bool brgemm_applies(const at::Tensor& input, const at::Tensor& weight, const TiedConv2dParams& p) {
  if (p.groups != 1 || input.scalar_type() != at::kFloat || input.numel() == 0 || weight.numel() == 0 ||
      !is_nchw_call(input, weight)) {
    return false;
  }
  const Geometry g(input, weight, p.stride, p.symmetric_part(), p.dilation);
  return input.size(0) == 1 || batched(input, g);
}

at::Tensor brgemm_conv2d_forward(const at::Tensor& input, const at::Tensor& source, const TransformSpec& f,
                                 const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation) {
  RECORD_FUNCTION("fusedtie::brgemm_conv2d_forward", std::vector<c10::IValue>());
  const Geometry g(input, source, stride, padding, dilation);
  const int64_t batch = input.size(0), O = source.size(0), K = g.rows(), L = g.positions(), N = batch * L;
  at::Tensor cols_fallback, output_fallback;
  float* cols_t = thread_scratch(ScratchSlot::kColumns, N * K, cols_fallback);
  im2col_transposed(input.const_data_ptr<float>(), batch, cols_t, g);
  const at::Tensor weight = source.contiguous();
  const at::Tensor bias_values = bias.has_value() ? bias->contiguous() : at::Tensor();
  float* result_t = thread_scratch(ScratchSlot::kOutput, N * O, output_fallback);
  forward_gemm(weight.const_data_ptr<float>(), f, cols_t,
               bias_values.defined() ? bias_values.const_data_ptr<float>() : nullptr, result_t, O, K, N);
  // Back to NCHW, the layout at::convolution returns for an NCHW input: [L, O] -> [O, L] per image.
  at::Tensor result = at::empty({batch, O, g.out_h, g.out_w}, input.options());
  for (int64_t i = 0; i < batch; ++i) {
    transpose(result_t + i * L * O, O, result.mutable_data_ptr<float>() + i * O * L, L, L, O);
  }
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> brgemm_conv2d_backward(const at::Tensor& grad_output,
                                                                      const at::Tensor& input, const at::Tensor& source,
                                                                      const TransformSpec& f, at::IntArrayRef stride,
                                                                      at::IntArrayRef padding, at::IntArrayRef dilation,
                                                                      std::array<bool, 3> output_mask) {
  RECORD_FUNCTION("fusedtie::brgemm_conv2d_backward", std::vector<c10::IValue>());
  const Geometry g(input, source, stride, padding, dilation);
  const int64_t batch = input.size(0), O = source.size(0), K = g.rows(), L = g.positions(), N = batch * L;
  const at::Tensor weight = source.contiguous();
  const at::Tensor grad = batch_grad_columns(grad_output, O, L);
  at::Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0]) {
    // A pointwise input gradient is dcols itself (a view), so it gets a tensor of its own; otherwise
    // col2im copies dcols out and it can live in scratch.
    at::Tensor dcols_tensor, dcols_fallback;
    float* dcols = nullptr;
    if (g.pointwise) {
      dcols_tensor = at::empty({K, N}, input.options());
      dcols = dcols_tensor.mutable_data_ptr<float>();
    } else {
      dcols = thread_scratch(ScratchSlot::kOutput, K * N, dcols_fallback);
    }
    input_grad_gemm(weight.const_data_ptr<float>(), f, grad.const_data_ptr<float>(), dcols, O, K, N);
    if (g.pointwise) {
      grad_input = images_first(dcols_tensor, batch, L).view(input.sizes());
    } else {
      grad_input = at::empty_like(input);
      for (int64_t i = 0; i < batch; ++i) {
        col2im(dcols + i * L, N, grad_input[i].mutable_data_ptr<float>(), g);
      }
    }
  }
  if (output_mask[1]) {
    at::Tensor cols_fallback;
    float* cols_t = thread_scratch(ScratchSlot::kColumns, N * K, cols_fallback);
    im2col_transposed(input.const_data_ptr<float>(), batch, cols_t, g);
    grad_weight = at::empty(source.sizes(), source.options().memory_format(at::MemoryFormat::Contiguous));
    weight_grad_gemm(grad.const_data_ptr<float>(), cols_t, weight.const_data_ptr<float>(), f,
                     grad_weight.mutable_data_ptr<float>(), O, K, N);
  }
  if (output_mask[2]) grad_bias = grad.sum(1);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace fusedtie
