#pragma once
// What the CUDA-core kernels and their host code need from CUDA, named once, so that the same
// source compiles two ways:
//   - with nvcc (the extension): the real thing, launches with <<<...>>> on the current stream;
//   - as plain C++ with FUSEDTIE_CUDA_EMULATION defined (tests/cuda_emulation/, test only): a CPU
//     emulation of CUDA's execution model that runs each kernel on CPU tensors, block after block,
//     with one std::thread per CUDA thread of the block, __shared__ memory shared by them, and
//     __syncthreads as a barrier over them, and the few PTX instructions of the tensor-core kernels
//     (mma.sync, cp.async, cvt.rna.tf32) done by their documented semantics, warp by warp. It checks
//     the kernels' index arithmetic, tiling, fragment and pipeline-stage indexing, split and
//     reduction logic, and the host code that sets them up (geometry, role swaps, grids), against
//     PyTorch on a machine without a GPU. It knows nothing of the GPU memory model, of
//     asynchronous copies still in flight, or of timing, and it is not a GPU run.
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

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <barrier>
#include <cstring>
#include <exception>
#include <latch>
#include <memory>
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
#define __align__(n) __attribute__((aligned(n)))
// One block runs at a time, so a function-level static is exactly "one copy per block, shared by
// its threads".
#define __shared__ static

namespace fusedtie {
namespace cuda {
namespace emulation {

inline thread_local dim3 block_index, thread_index;
inline thread_local int linear_thread = 0;  // threadIdx flattened, x fastest; warp = linear_thread / 32
inline dim3 block_dim, grid_dim;
inline std::barrier<>* block_barrier = nullptr;
inline int64_t emulated_multiprocessors = 132;  // an H200's; tests set others to vary the splits

inline void sync_threads() { block_barrier->arrive_and_wait(); }

// --- warp-level instructions of the tensor-core kernels (PTX ISA semantics) ----------------------
//
// mma.sync is a warp-collective: each of the 32 lanes passes its fragment registers and receives
// its part of the result. Here every lane deposits its registers in the warp's exchange area, the
// warp's 32 threads meet at a barrier, each lane computes its own accumulator elements from the
// whole warp's fragments, and they meet again before the area is reused. The fragment layouts are
// the PTX ISA's ("Matrix fragments for mma.m16n8k16" / "mma.m16n8k8"), with group = lane / 4 and
// quad = lane % 4:
//   m16n8k16, 16-bit inputs: A register r of a lane holds A(group + 8*(r % 2), 2*quad + 8*(r / 2) + h)
//     in its half h (low half first); B register r holds B(2*quad + 8*r + h, group) in half h;
//   m16n8k8, TF32: A register r holds A(group + 8*(r % 2), quad + 4*(r / 2)); B register r holds
//     B(quad + 4*r, group);
//   both: accumulator element e is D(group + 8*(e / 2), 2*quad + e % 2).
struct WarpFragments {
  uint32_t a[32][4];
  uint32_t b[32][2];
};
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline std::vector<WarpFragments> warp_fragments;

enum class MmaInput { kHalf, kBFloat16, kTF32 };

template <MmaInput kInput>
float mma_element(uint32_t reg, int half) {
  if constexpr (kInput == MmaInput::kTF32) {
    const uint32_t bits = reg & 0xffffe000u;  // the tensor cores read 19 bits of a TF32 register
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
  } else {
    const auto bits = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu);
    if constexpr (kInput == MmaInput::kHalf) return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
    return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()));
  }
}

// acc (this lane's four float accumulators) += A (16 x K) * B (K x 8), K = 16 (16-bit) or 8 (TF32).
template <MmaInput kInput>
void mma_sync(float* acc, const uint32_t* a, const uint32_t* b) {
  constexpr bool kTF32 = kInput == MmaInput::kTF32;
  constexpr int kK = kTF32 ? 8 : 16;
  const int lane = linear_thread % 32, warp = linear_thread / 32;
  TORCH_CHECK(warp < static_cast<int>(warp_barriers.size()), "emulated mma.sync outside a whole warp");
  WarpFragments& fragments = warp_fragments[warp];
  for (int r = 0; r < 4; ++r) fragments.a[lane][r] = a[r];
  for (int r = 0; r < 2; ++r) fragments.b[lane][r] = b[r];
  warp_barriers[warp]->arrive_and_wait();
  auto a_at = [&](int m, int k) {
    if constexpr (kTF32) return mma_element<kInput>(fragments.a[(m % 8) * 4 + k % 4][(m / 8) + 2 * (k / 4)], 0);
    return mma_element<kInput>(fragments.a[(m % 8) * 4 + (k % 8) / 2][(m / 8) + 2 * (k / 8)], k % 2);
  };
  auto b_at = [&](int k, int n) {
    if constexpr (kTF32) return mma_element<kInput>(fragments.b[n * 4 + k % 4][k / 4], 0);
    return mma_element<kInput>(fragments.b[n * 4 + (k % 8) / 2][k / 8], k % 2);
  };
  const int group = lane / 4, quad = lane % 4;
  float result[4];
  for (int e = 0; e < 4; ++e) {
    const int m = group + 8 * (e / 2), n = 2 * quad + e % 2;
    float sum = 0.0f;
    for (int k = 0; k < kK; ++k) sum += a_at(m, k) * b_at(k, n);
    result[e] = acc[e] + sum;
  }
  warp_barriers[warp]->arrive_and_wait();  // every lane has read the area before it is written again
  for (int e = 0; e < 4; ++e) acc[e] = result[e];
}

// cvt.rna.tf32.f32: round to 10 mantissa bits, to nearest, ties away from zero; the register keeps
// the float's bit pattern with the low 13 bits clear.
inline uint32_t round_to_tf32(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7f800000u) == 0x7f800000u) return bits;  // Inf and NaN unchanged
  return (bits + 0x1000u) & 0xffffe000u;
}

// cp.async.cg.shared.global with a source size of 16 or 0 (zero-fill), done at once: the pipeline's
// commit and wait are then no-ops, so the emulation cannot see a missing wait_group (only a
// missing __syncthreads).
inline void copy_async_16(void* shared, const void* global, bool valid) {
  if (valid) {
    std::memcpy(shared, global, 16);
  } else {
    std::memset(shared, 0, 16);
  }
}

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
  warp_barriers.clear();
  if (threads % 32 == 0) {
    for (unsigned w = 0; w < threads / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
  }
  warp_fragments.assign(threads / 32, WarpFragments{});
  std::exception_ptr error;
  std::mutex error_mutex;
  // Every thread waits at `start` until all exist: if one cannot be created (a thread limit), the
  // others are released to return instead of waiting forever at a barrier sized for all of them.
  std::latch start(1);
  bool abandoned = false;
  auto run_thread = [&](unsigned t) {
    start.wait();
    if (abandoned) return;
    thread_index = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
    linear_thread = static_cast<int>(t);
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
  };
  std::vector<std::thread> pool;
  pool.reserve(threads);
  auto finish = [&] {
    start.count_down();
    for (auto& thread : pool) thread.join();
    block_barrier = nullptr;
    warp_barriers.clear();
  };
  try {
    for (unsigned t = 0; t < threads; ++t) pool.emplace_back(run_thread, t);
  } catch (...) {
    abandoned = true;
    finish();
    throw;
  }
  finish();
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
