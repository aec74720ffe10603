#pragma once
// What the CUDA-core kernels and their host code need from CUDA, named once, so that the same
// source compiles two ways:
//   - with nvcc (the extension): the real thing, launches with <<<...>>> on the current stream;
//   - as plain C++ with FUSEDTIE_CUDA_EMULATION defined (tests/cuda_emulation/, test only): a CPU
//     emulation of CUDA's execution model that runs each kernel on CPU tensors, block after block,
//     with one std::thread per CUDA thread of the block, __shared__ memory shared by them, and
//     __syncthreads as a barrier over them. It checks the kernels' index arithmetic, tiling, split
//     and reduction logic and the host code that sets them up (geometry, role swaps, grids) against
//     PyTorch on a machine without a GPU. It knows nothing of warps, the memory model, timing, or
//     the tensor-core kernels (inline PTX), and it is not a GPU run.
#include <cstdint>

#ifndef FUSEDTIE_CUDA_EMULATION

#include <ATen/cuda/CUDAContext.h>
#include <ATen/native/ConvUtils.h>
#include <c10/cuda/CUDAException.h>

namespace fusedtie {
namespace cuda {

inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }
inline int64_t multiprocessor_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
// The memory format of a convolution's output on CUDA (cuDNN's rule, which F.conv2d follows).
inline at::MemoryFormat conv_output_memory_format(const at::Tensor& input, const at::Tensor& weight) {
  return at::native::cudnn_conv_suggest_memory_format(input, weight);
}

}  // namespace cuda
}  // namespace fusedtie

#define FUSEDTIE_LAUNCH(kernel, grid, block, stream) kernel<<<(grid), (block), 0, (stream)>>>
#define FUSEDTIE_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()

#else  // FUSEDTIE_CUDA_EMULATION

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <barrier>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One block runs at a time, so a function-level static is exactly "one copy per block, shared by
// its threads".
#define __shared__ static

namespace fusedtie {
namespace cuda {
namespace emulation {

inline thread_local dim3 block_index, thread_index;
inline dim3 block_dim, grid_dim;
inline std::barrier<>* block_barrier = nullptr;
inline int64_t emulated_multiprocessors = 132;  // an H200's; tests set others to vary the splits

inline void sync_threads() { block_barrier->arrive_and_wait(); }

// Runs body() as the kernel of a grid x block launch: one thread per CUDA thread of a block, the
// blocks one after another (x fastest, then y, then z), a barrier between blocks.
template <typename Body>
void run_grid(dim3 grid, dim3 block, const Body& body) {
  const unsigned threads = block.x * block.y * block.z;
  TORCH_CHECK(threads > 0 && threads <= 1024, "emulated launch: ", threads, " threads per block");
  block_dim = block;
  grid_dim = grid;
  std::barrier<> barrier(threads);
  block_barrier = &barrier;
  std::exception_ptr error;
  std::mutex error_mutex;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      thread_index = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      for (unsigned z = 0; z < grid.z; ++z) {
        for (unsigned y = 0; y < grid.y; ++y) {
          for (unsigned x = 0; x < grid.x; ++x) {
            block_index = dim3(x, y, z);
            try {
              body();
            } catch (...) {
              const std::lock_guard<std::mutex> lock(error_mutex);
              if (!error) error = std::current_exception();
            }
            barrier.arrive_and_wait();  // the block's shared memory is reused by the next one
          }
        }
      }
    });
  }
  for (auto& thread : pool) thread.join();
  block_barrier = nullptr;
  if (error) std::rethrow_exception(error);
}

template <typename... Params>
struct Launch {
  dim3 grid, block;
  void (*kernel)(Params...);
  template <typename... Args>
  void operator()(Args&&... args) const {
    run_grid(grid, block, [&] { kernel(args...); });
  }
};

template <typename... Params>
Launch<Params...> launch(dim3 grid, dim3 block, void (*kernel)(Params...)) {
  return {grid, block, kernel};
}

}  // namespace emulation

struct EmulatedStream {};
inline EmulatedStream current_stream() { return {}; }
inline int64_t multiprocessor_count() { return emulation::emulated_multiprocessors; }
// cuDNN's rule as a CUDA build with cuDNN applies it (a CPU build of torch has no cuDNN to ask):
// channels-last when either operand is, except in float64.
inline at::MemoryFormat conv_output_memory_format(const at::Tensor& input, const at::Tensor& weight) {
  const bool channels_last = input.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
                             weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  return channels_last && input.scalar_type() != at::kDouble && weight.scalar_type() != at::kDouble
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

}  // namespace cuda
}  // namespace fusedtie

#define blockIdx (::fusedtie::cuda::emulation::block_index)
#define threadIdx (::fusedtie::cuda::emulation::thread_index)
#define blockDim (::fusedtie::cuda::emulation::block_dim)
#define gridDim (::fusedtie::cuda::emulation::grid_dim)
#define __syncthreads() (::fusedtie::cuda::emulation::sync_threads())
#define FUSEDTIE_LAUNCH(kernel, grid, block, stream) ::fusedtie::cuda::emulation::launch((grid), (block), &kernel)
#define FUSEDTIE_LAUNCH_CHECK() ((void)0)

#endif  // FUSEDTIE_CUDA_EMULATION
