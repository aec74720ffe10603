#pragma once
// Which CUDA path runs one pass of one call, shared by every convolution operator: the fused
// kernels (fused_conv2d.h) or "one transform kernel + cuDNN" (library_conv.h with elementwise.h),
// by the CUDA setting (cuda_settings.h): a cost rule (auto), a measurement cached per call signature
// (autotune), or forced (fused / library).
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>

#include <algorithm>
#include <array>
#include <functional>
#include <ostream>
#include <string>

#include "../cuda_settings.h"

namespace fusedtie {
namespace cuda {

// auto's rule, given a pass's multiply-adds, the channels per group on the weight's two sides, and
// whether the pass runs on tensor cores. NOT MEASURED: no GPU was available when it was written; it
// is a cost model, and the autotune mode (or the benchmark) gives the measured choice. The unfused
// recipe costs one extra elementwise launch per pass (about 4 us in eager mode) over cuDNN; the fused
// kernels save it but are slower per multiply-add than cuDNN's, so they should win where the
// convolution itself takes a few microseconds: up to 2^30 multiply-adds on tensor cores (a few us on
// an H100/H200 in bf16), up to 2^24 on CUDA cores (float64, exact float32, unaligned channel counts,
// and every weight gradient, which has no tensor-core kernel yet). Fewer than 16 channels per group
// on either side (depthwise convolutions, say) leave most of a 64-wide tile idle: library.
inline bool fused_wins_by_cost(int64_t multiply_adds, int64_t channels_a, int64_t channels_b, bool tensor_cores) {
  if (channels_a < 16 || channels_b < 16) return false;
  return multiply_adds <= (int64_t(1) << (tensor_cores ? 30 : 24));
}

// One warm-up call of each, then five timed calls of each, interleaved, each starting on an idle
// stream (so every one includes its launches); the medians decide.
inline bool measure_fused_wins(const std::function<void()>& fused, const std::function<void()>& library) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  auto time_ms = [&](const std::function<void()>& run) {
    stream.synchronize();
    at::cuda::CUDAEvent start(cudaEventDefault), stop(cudaEventDefault);
    start.record(stream);
    run();
    stop.record(stream);
    stop.synchronize();
    return start.elapsed_time(stop);
  };
  fused();
  library();
  constexpr int kReps = 5;
  std::array<float, kReps> fused_ms{}, library_ms{};
  for (int rep = 0; rep < kReps; ++rep) {
    fused_ms[rep] = time_ms(fused);
    library_ms[rep] = time_ms(library);
  }
  std::sort(fused_ms.begin(), fused_ms.end());
  std::sort(library_ms.begin(), library_ms.end());
  return fused_ms[kReps / 2] < library_ms[kReps / 2];
}

// The part of an autotune key that every operator shares: the operands' device, dtype, sizes and
// strides (grad_strides: the output gradient's in the backward, where they decide layout copies;
// empty in the forward), whether there is a bias, the gradients asked for, and the TF32 setting.
inline void describe_operands(std::ostream& key, const at::Tensor& input, const at::Tensor& weight, bool has_bias,
                              at::IntArrayRef grad_strides, std::array<bool, 3> output_mask, bool allow_tf32) {
  key << input.device() << '|' << input.scalar_type() << '|' << input.sizes() << input.strides() << grad_strides << '|'
      << weight.sizes() << weight.strides() << '|' << has_bias << '|' << output_mask[0] << output_mask[1]
      << output_mask[2] << '|' << allow_tf32;
}

// Whether this pass runs the fused kernels. `supported`: the fused kernels handle the call;
// `cost_rule`: auto's choice; `autotune_key`: the call signature autotune caches its choice under
// (everything that can change which is faster); `measure`: runs both choices once and says whether
// fused was faster. The last three are called only when the setting needs them.
inline bool use_fused(bool supported, const std::function<bool()>& cost_rule,
                      const std::function<std::string()>& autotune_key, const std::function<bool()>& measure) {
  if (!supported) return false;
  switch (cuda_conv_algorithm_setting()) {
    case CudaConvAlgorithm::kLibrary: return false;
    case CudaConvAlgorithm::kFused: return true;
    case CudaConvAlgorithm::kAuto: return cost_rule();
    case CudaConvAlgorithm::kAutotune: break;
  }
  // Timing synchronizes the stream, which a CUDA graph capture does not allow: the cost rule then.
  if (at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None) return cost_rule();
  const std::string key = autotune_key();
  if (const auto cached = autotune_lookup(key)) return *cached;
  const bool fused = measure();
  autotune_store(key, fused);
  return fused;
}

}  // namespace cuda
}  // namespace fusedtie
