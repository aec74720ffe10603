#pragma once
// How the CUDA path runs a convolution, and the autotune cache. Host code only, compiled in every
// build (a CPU-only build keeps the setting, which then has nothing to act on), so Python sees one
// API whatever was built.
//   library:  "one transform kernel + cuDNN": f(W) by an elementwise kernel, at::convolution /
//             at::convolution_backward (cuDNN), f'(W) * dL/dW by a second elementwise kernel.
//   fused:    fusedtie's implicit-GEMM kernels (csrc/cuda/), which apply f to the weight tiles as
//             they load them and f' in the weight gradient's epilogue, wherever they support the
//             call (elsewhere the library runs).
//   auto:     a cost rule per shape (csrc/cuda/algorithm_choice.h, fused_wins_by_cost).
//   autotune: both timed once per (device, shape, dtype, layout, transform) key, the faster one
//             cached for the process, like torch.backends.cudnn.benchmark.
#include <cstdint>
#include <optional>
#include <string>

namespace fusedtie {

enum class CudaConvAlgorithm : int { kAuto = 0, kAutotune = 1, kFused = 2, kLibrary = 3 };

// Takes "auto", "autotune", "fused" or "library" (ValueError otherwise); returns the previous name.
std::string set_cuda_conv_algorithm(const std::string& name);
std::string cuda_conv_algorithm();
CudaConvAlgorithm cuda_conv_algorithm_setting();

// The autotune cache: whether the fused kernels won for a key (one per convolution and pass).
std::optional<bool> autotune_lookup(const std::string& key);
void autotune_store(const std::string& key, bool fused_wins);
void clear_autotune_cache();
int64_t autotune_cache_size();

}  // namespace fusedtie
