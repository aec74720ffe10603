#pragma once
// Which convolution the CPU path runs on the derived weight f(W):
//   library: at::convolution, which on x86 is oneDNN. For NCHW float tensors it re-packs the weight
//            into its blocked layout on every call: one more pass over W.
//   gemm:    gemm_conv2d.h: our im2col (skipped for pointwise convs) and BLAS GEMMs that read f(W)
//            exactly as the transform pass wrote it, so the transform pass is the only pass over W.
//            It wins where the weight is large next to the activations; groups 1, float32/float64,
//            NCHW only (elsewhere the library runs).
//   auto:    gemm where it measurably won on the benchmark's shapes (see choose_gemm in
//            tied_conv2d_kernel.cpp and the README's Performance section), library elsewhere.
// The setting is process-wide, for benchmarks and tests; both paths compute the same convolution.
#include <string>

namespace fusedtie {

enum class CpuConvAlgorithm : int { kAuto = 0, kLibrary = 1, kGemm = 2 };

// Takes "auto", "library" or "gemm" (ValueError otherwise); returns the previous setting's name.
std::string set_cpu_conv_algorithm(const std::string& name);
std::string cpu_conv_algorithm();

}  // namespace fusedtie
