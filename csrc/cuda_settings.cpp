// See cuda_settings.h.
#include "cuda_settings.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <mutex>
#include <unordered_map>

namespace fusedtie {
namespace {

std::atomic<CudaConvAlgorithm> g_cuda_algorithm{CudaConvAlgorithm::kAuto};

struct AutotuneCache {
  std::mutex mutex;
  std::unordered_map<std::string, bool> fused_wins;
};

AutotuneCache& autotune_cache() {
  static AutotuneCache cache;
  return cache;
}

}  // namespace

std::string set_cuda_conv_algorithm(const std::string& name) {
  CudaConvAlgorithm chosen;
  if (name == "auto") {
    chosen = CudaConvAlgorithm::kAuto;
  } else if (name == "autotune") {
    chosen = CudaConvAlgorithm::kAutotune;
  } else if (name == "fused") {
    chosen = CudaConvAlgorithm::kFused;
  } else if (name == "library") {
    chosen = CudaConvAlgorithm::kLibrary;
  } else {
    TORCH_CHECK_VALUE(false, "unknown CUDA convolution algorithm '", name,
                      "'; expected one of: auto, autotune, fused, library");
  }
  const std::string previous = cuda_conv_algorithm();
  g_cuda_algorithm.store(chosen);
  return previous;
}

CudaConvAlgorithm cuda_conv_algorithm_setting() { return g_cuda_algorithm.load(std::memory_order_relaxed); }

std::string cuda_conv_algorithm() {
  switch (cuda_conv_algorithm_setting()) {
    case CudaConvAlgorithm::kAutotune: return "autotune";
    case CudaConvAlgorithm::kFused: return "fused";
    case CudaConvAlgorithm::kLibrary: return "library";
    case CudaConvAlgorithm::kAuto: break;
  }
  return "auto";
}

std::optional<bool> autotune_lookup(const std::string& key) {
  auto& cache = autotune_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  const auto it = cache.fused_wins.find(key);
  if (it == cache.fused_wins.end()) return std::nullopt;
  return it->second;
}

void autotune_store(const std::string& key, bool fused_wins) {
  auto& cache = autotune_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  cache.fused_wins[key] = fused_wins;
}

void clear_autotune_cache() {
  auto& cache = autotune_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  cache.fused_wins.clear();
}

int64_t autotune_cache_size() {
  auto& cache = autotune_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  return static_cast<int64_t>(cache.fused_wins.size());
}

}  // namespace fusedtie
