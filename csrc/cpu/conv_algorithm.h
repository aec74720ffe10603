#pragma once
// Which convolution the CPU path runs (on the derived weight f(W), or fused with f):
//   library: at::convolution, which on x86 is oneDNN. For NCHW float tensors it re-packs the weight
//            into its blocked layout on every call: one more pass over W.
//   gemm:    gemm_conv2d.h: our im2col (skipped for pointwise convs) and BLAS GEMMs that read f(W)
//            exactly as the transform pass wrote it, so the transform pass is the only pass over W.
//            It wins where the weight is large next to the activations; groups 1, float32/float64,
//            NCHW only (elsewhere the library runs).
//   depthwise: depthwise_conv2d.h: a direct depthwise convolution (groups == in_channels) that
//            applies f to each channel's weights as it loads them and f' to each channel's weight
//            gradient before it writes it, so there is no separate pass over W at all; float32/
//            float64, NCHW only (elsewhere the library runs).
//   brgemm:  brgemm_conv2d.h: im2col and oneDNN's micro-kernel, with f applied to each weight tile
//            as it is packed for the micro-kernel and f' to each weight-gradient tile as it is
//            written: no pass over W of the tie's own. float32, groups 1, NCHW, one column matrix
//            for the batch (elsewhere the library runs).
//   linear:  linear_conv2d.h: a convolution that is a matrix product (1x1 kernel on 1x1 images, no
//            padding, groups 1: fusedtie.tied_linear's calls) with at most 8 rows, float32/float64,
//            NCHW: fused skinny GEMMs with f and f' in registers. The transposed operator runs it
//            too (its only algorithm besides the library). With more rows the library runs, which
//            computes a matrix product with BLAS (matrix_product.h), not at::convolution.
//   auto:    linear where it applies (it reads W once, as plain nn.Linear does, so it holds on any CPU),
//            depthwise, brgemm (backward only) and gemm where they measurably won, library elsewhere;
//            gemm only where the
//            BLAS is one it won on (assess_gemm_blas: MKL on an Intel CPU at its full instruction
//            set). The rules live in conv_algorithm.cpp; their measurements in docs/cpu-algorithms.md.
// The setting is process-wide, for benchmarks and tests; every path computes the same convolution.
#include <ATen/core/Tensor.h>

#include <string>

#include "../matrix_product.h"  // is_nchw_call

namespace fusedtie {

struct TiedConv2dParams;
struct TiedConvTranspose2dParams;

// Whether stride, padding and dilation are small enough for fusedtie's own kernels (gemm, brgemm,
// depthwise) to index in 64 bits without overflow; larger ones go to the library.
inline bool geometry_fits_own_kernels(at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr int64_t kLimit = int64_t{1} << 30;
  for (auto values : {stride, padding, dilation}) {
    for (const int64_t v : values) {
      if (v > kLimit) return false;
    }
  }
  return true;
}

enum class CpuConvAlgorithm : int { kAuto = 0, kLibrary = 1, kGemm = 2, kDepthwise = 3, kBrgemm = 4, kLinear = 5 };

// Takes "auto", "library", "gemm", "depthwise", "brgemm" or "linear" (ValueError otherwise); returns the previous
// setting's name.
std::string set_cpu_conv_algorithm(const std::string& name);
std::string cpu_conv_algorithm();

// The passes of a convolution, which auto may give different algorithms: the forward, a backward
// that wants the input gradient, and one that wants only the weight and bias gradients (a
// network's first layer, or an input that needs no gradient).
enum class ConvPass : int { kForward = 0, kBackward = 1, kWeightBackward = 2 };

// The convolution this pass runs: the forced setting where it applies, else auto's choice (never kAuto).
CpuConvAlgorithm choose_algorithm(const at::Tensor& input, const at::Tensor& weight, const TiedConv2dParams& p,
                                  ConvPass pass);
// choose_algorithm's answer by name, for a call with this transform and these geometry arguments
// (the operator's schema).
std::string cpu_conv_algorithm_for(const at::Tensor& input, const at::Tensor& weight, c10::string_view transform,
                                   double alpha, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, int64_t groups, ConvPass pass);
// The transposed operator's: linear where it applies and the setting is auto or linear, else the library.
CpuConvAlgorithm choose_algorithm(const at::Tensor& input, const at::Tensor& weight,
                                  const TiedConvTranspose2dParams& p);
bool gemm_applies(const at::Tensor& input, const at::Tensor& weight, const TiedConv2dParams& p);

// Whether auto may send a convolution to the GEMM path on this machine, and why. The GEMM path calls
// the BLAS torch was built with; it beat oneDNN only with MKL on Intel at full speed.
struct BlasAssessment {
  std::string vendor;  // cpuid's vendor string, "GenuineIntel" or "AuthenticAMD"
  std::string model;   // cpuid's brand string
  std::string blas;    // "MKL" or "other"
  bool gemm_trusted = false;
  std::string reason;
};
// The rule itself, a pure function of what it reads (tests call it with other vendors' values).
BlasAssessment assess_gemm_blas(const std::string& vendor, const std::string& model, bool has_mkl,
                                const std::string& mkl_enable_instructions, const std::string& mkl_cbwr);
// This process's assessment, made once (MKL reads its environment once too).
const BlasAssessment& gemm_blas_assessment();

}  // namespace fusedtie
