// The tensor-core kernels of fused_conv2d.h: forward and input gradient as an implicit
// GEMM on mma.sync (m16n8k16 for float16/bfloat16, m16n8k8 TF32 for float32), float accumulation.
//
// GEMM view: rows = output pixels (n, y, x) of the result, columns = the group's channels of the
// result, K = (r, s, c) with the channel c fastest. The gathered operand (x for the forward, dy for
// the input gradient) is read channels-last, so every 16 bytes of a K-tile row are contiguous and
// come in by cp.async (zero-filled in the padding) through a 3-stage pipeline. The weight tile is
// read from W_src with ordinary loads by the loading threads, f is applied in float, and the result
// is stored to shared memory in the MMA's input type: f(W) exists only in that tile.
//   forward:        A(row, (r,s,c)) = x[n, y*sh - pad_top + r*dh, x*sw - pad_left + s*dw, c]
//                   B((r,s,c), co)  = f(W[co, c, r, s]);          epilogue + g(b[co])
//   input gradient: A(row, (r,s,co)) = dy[n, (y + pad_top - r*dh) / sh, (x + pad_left - s*dw) / sw, co]
//                                      where both divide exactly and land inside dy, else zero
//                   B((r,s,co), ci)  = f(W[co, ci, r, s])
//   (at stride s, only about 1/s^2 of the taps of a row are nonzero: the zeros are multiplied too,
//   as in the CUDA-core kernel; a per-phase decomposition would skip them)
// Block tile 128 x 64, four warps of 64 x 32, a K-tile of 64 bytes per row.
//
// The PTX instructions are wrapped below; under FUSEDTIE_CUDA_EMULATION (tests/cuda_emulation/) the
// wrappers call cuda_emulation.h's versions instead, so that this file, kernels and host code, also
// runs on the CPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "cuda_emulation.h"
#include "device_transforms.cuh"
#include "fused_conv2d.h"

// Whether the kernels' bodies are compiled: device code for sm_80 or newer, or the emulation.
#if defined(FUSEDTIE_CUDA_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
#define FUSEDTIE_MMA_CODE 1
#else
#define FUSEDTIE_MMA_CODE 0
#endif

namespace fusedtie {
namespace cuda {
namespace {

constexpr int kBlockM = 128, kBlockN = 64, kThreads = 128, kStages = 3;
constexpr int kRowBytes = 64;        // one K-tile row of A or B
constexpr int kPaddedRowBytes = 80;  // + 16: rows stay 16-byte aligned, fragment loads spread over banks
constexpr int kStageBytes = (kBlockM + kBlockN) * kPaddedRowBytes;
constexpr int kSharedBytes = kStages * kStageBytes;  // 46080: under the 48 KiB of static shared memory
static_assert(kSharedBytes <= 48 * 1024, "static shared memory");

template <typename T>
struct MmaTraits;
template <>
struct MmaTraits<c10::Half> {
  static constexpr int kStep = 16;  // K of one mma
};
template <>
struct MmaTraits<c10::BFloat16> {
  static constexpr int kStep = 16;
};
template <>
struct MmaTraits<float> {
  static constexpr int kStep = 8;
};

#ifndef FUSEDTIE_CUDA_EMULATION
__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}
#endif

// 16 bytes global -> shared, or 16 zero bytes when `valid` is false (the source is then not read).
__device__ __forceinline__ void copy_async_16(void* shared, const void* global, bool valid) {
#if defined(FUSEDTIE_CUDA_EMULATION)
  emulation::copy_async_16(shared, global, valid);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(shared)), "l"(global),
               "r"(valid ? 16 : 0));
#endif
}

__device__ __forceinline__ void copy_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int kPending>
__device__ __forceinline__ void copy_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

// acc (16x8 float) += A (16xK row-major fragment) * B (Kx8 column fragment), K = MmaTraits::kStep.
__device__ __forceinline__ void mma(float* acc, const uint32_t* a, const uint32_t* b, c10::Half) {
#if defined(FUSEDTIE_CUDA_EMULATION)
  emulation::mma_sync<emulation::MmaInput::kHalf>(acc, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
__device__ __forceinline__ void mma(float* acc, const uint32_t* a, const uint32_t* b, c10::BFloat16) {
#if defined(FUSEDTIE_CUDA_EMULATION)
  emulation::mma_sync<emulation::MmaInput::kBFloat16>(acc, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
__device__ __forceinline__ void mma(float* acc, const uint32_t* a, const uint32_t* b, float) {
#if defined(FUSEDTIE_CUDA_EMULATION)
  emulation::mma_sync<emulation::MmaInput::kTF32>(acc, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

__device__ __forceinline__ uint32_t to_tf32(float value) {
  uint32_t result = 0;
#if defined(FUSEDTIE_CUDA_EMULATION)
  result = emulation::round_to_tf32(value);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(result) : "f"(value));
#endif
  return result;
}

// Fragments from shared memory (PTX ISA, "Matrix fragments for mma.m16n8k16 / m16n8k8"): with
// group = lane / 4 and quad = lane % 4, A holds rows group and group + 8, B column group, and each
// 32-bit register two consecutive K elements (16-bit types) or one (TF32).
// `a` points at the warp tile's row 0, column k0; `b` at its column (n) 0, k0; rows are padded.
template <typename T>
__device__ __forceinline__ void load_a(uint32_t* frag, const char* a, int group, int quad) {
  if constexpr (sizeof(T) == 2) {
    const char* row0 = a + group * kPaddedRowBytes;
    const char* row8 = row0 + 8 * kPaddedRowBytes;
    frag[0] = *reinterpret_cast<const uint32_t*>(row0 + (quad * 2) * 2);
    frag[1] = *reinterpret_cast<const uint32_t*>(row8 + (quad * 2) * 2);
    frag[2] = *reinterpret_cast<const uint32_t*>(row0 + (quad * 2 + 8) * 2);
    frag[3] = *reinterpret_cast<const uint32_t*>(row8 + (quad * 2 + 8) * 2);
  } else {
    const float* row0 = reinterpret_cast<const float*>(a + group * kPaddedRowBytes);
    const float* row8 = reinterpret_cast<const float*>(a + (group + 8) * kPaddedRowBytes);
    frag[0] = to_tf32(row0[quad]);
    frag[1] = to_tf32(row8[quad]);
    frag[2] = to_tf32(row0[quad + 4]);
    frag[3] = to_tf32(row8[quad + 4]);
  }
}

template <typename T>
__device__ __forceinline__ void load_b(uint32_t* frag, const char* b, int group, int quad) {
  const char* column = b + group * kPaddedRowBytes;  // B is stored n-major: one row per column n
  if constexpr (sizeof(T) == 2) {
    frag[0] = *reinterpret_cast<const uint32_t*>(column + (quad * 2) * 2);
    frag[1] = *reinterpret_cast<const uint32_t*>(column + (quad * 2 + 8) * 2);
  } else {
    const float* values = reinterpret_cast<const float*>(column);
    frag[0] = to_tf32(values[quad]);
    frag[1] = to_tf32(values[quad + 4]);
  }
}

// The gather of one result row: which image, and where its window starts in the gathered tensor.
struct RowOrigin {
  int64_t image_offset;  // n * stride_n of the gathered tensor
  int64_t y0, x0;        // coordinate of tap (0, 0); tap (r, s) adds (r * step_h, s * step_w)
  bool valid;
};

template <typename scalar_t, bool kInputGrad>
__device__ __forceinline__ void conv_mma_body(const scalar_t* __restrict__ src, const scalar_t* __restrict__ weight,
                                              const scalar_t* __restrict__ bias, scalar_t* __restrict__ dst,
                                              const ConvGeometry& g, TransformSpec wt, TransformSpec bt) {
#if FUSEDTIE_MMA_CODE
  constexpr int kElems = kRowBytes / int(sizeof(scalar_t));  // K elements per tile row
  constexpr int kVector = 16 / int(sizeof(scalar_t));        // elements per cp.async
  constexpr int kStep = MmaTraits<scalar_t>::kStep;
  __shared__ __align__(128) char shared[kSharedBytes];

  const int group_index = blockIdx.z;
  const int64_t rows_h = kInputGrad ? g.in_h : g.out_h, rows_w = kInputGrad ? g.in_w : g.out_w;
  const int64_t rows = g.batch * rows_h * rows_w;
  const int64_t cols = kInputGrad ? g.in_per_group : g.out_per_group;
  const int64_t channels = kInputGrad ? g.out_per_group : g.in_per_group;  // gathered channels per group
  const int64_t depth = int64_t(g.kernel_h) * g.kernel_w * channels;
  const int channels32 = static_cast<int>(channels);
  const int64_t* src_stride = kInputGrad ? g.y_stride : g.x_stride;  // channels-last: stride[1] == 1
  const int64_t src_h = kInputGrad ? g.out_h : g.in_h, src_w = kInputGrad ? g.out_w : g.in_w;
  const int64_t channel0 = group_index * channels;
  const int64_t row0 = blockIdx.x * int64_t(kBlockM), col0 = blockIdx.y * int64_t(kBlockN);
  const int step_h = kInputGrad ? -g.dilation_h : g.dilation_h;
  const int step_w = kInputGrad ? -g.dilation_w : g.dilation_w;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp / 2, warp_n = warp % 2;  // 2 x 2 warps of 64 x 32
  const int group = lane / 4, quad = lane % 4;

  // This thread's A row: tile row `tid`, all four 16-byte chunks of each K-tile.
  RowOrigin origin{0, 0, 0, false};
  {
    const int64_t row = row0 + tid;
    if (row < rows) {
      const int64_t n = row / (rows_h * rows_w), y = (row / rows_w) % rows_h, x = row % rows_w;
      origin.image_offset = n * src_stride[0];
      origin.y0 = kInputGrad ? y + g.pad_top : y * g.stride_h - g.pad_top;
      origin.x0 = kInputGrad ? x + g.pad_left : x * g.stride_w - g.pad_left;
      origin.valid = true;
    }
  }
  // This thread's B column (n = tid / 2) and half of the K-tile row (tid % 2).
  const int b_col = tid / 2, b_half = tid % 2;
  const int64_t b_channel = col0 + b_col;  // co (forward) or ci (input gradient) within the group
  const float w_alpha = static_cast<float>(wt.alpha);

  auto a_stage = [&](int stage) { return shared + stage * kStageBytes; };
  auto b_stage = [&](int stage) { return shared + stage * kStageBytes + kBlockM * kPaddedRowBytes; };

  auto load_tile = [&](int stage, int64_t k0) {
    // A: four 16-byte chunks of row `tid`, by cp.async.
    char* a_row = a_stage(stage) + tid * kPaddedRowBytes;
#pragma unroll
    for (int chunk = 0; chunk < kRowBytes / 16; ++chunk) {
      const int64_t k = k0 + chunk * kVector;
      bool valid = origin.valid && k < depth;
      const scalar_t* from = src;
      if (valid) {
        // 32-bit division: the host admits only depth <= INT_MAX.
        const int c = static_cast<int>(k) % channels32, tap = static_cast<int>(k) / channels32;
        const int r = tap / g.kernel_w, s = tap % g.kernel_w;
        int64_t iy = origin.y0 + int64_t(r) * step_h, ix = origin.x0 + int64_t(s) * step_w;
        if constexpr (kInputGrad) {
          // (iy, ix) = (h + pad_top - r*dh, w + pad_left - s*dw): the dy position whose window
          // covers this dx pixel through tap (r, s) is (iy / sh, ix / sw), where the stride divides.
          valid = iy >= 0 && ix >= 0 && iy % g.stride_h == 0 && ix % g.stride_w == 0;
          iy /= g.stride_h;
          ix /= g.stride_w;
          valid = valid && iy < src_h && ix < src_w;
        } else {
          valid = iy >= 0 && iy < src_h && ix >= 0 && ix < src_w;
        }
        if (valid) from = src + origin.image_offset + iy * src_stride[2] + ix * src_stride[3] + channel0 + c;
      }
      copy_async_16(a_row + chunk * 16, from, valid);
    }
    // B: f(W) for half a row of the K-tile, stored in the MMA's input type.
    scalar_t* b_row = reinterpret_cast<scalar_t*>(b_stage(stage) + b_col * kPaddedRowBytes);
#pragma unroll 4
    for (int e = 0; e < kElems / 2; ++e) {
      const int kk = b_half * (kElems / 2) + e;
      const int64_t k = k0 + kk;
      float value = 0.0f;
      if (b_channel < cols && k < depth) {
        const int c = static_cast<int>(k) % channels32, tap = static_cast<int>(k) / channels32;
        const int r = tap / g.kernel_w, s = tap % g.kernel_w;
        const int64_t co = group_index * g.out_per_group + (kInputGrad ? c : b_channel);
        const int64_t ci = kInputGrad ? b_channel : c;
        const scalar_t w = weight[co * g.w_stride[0] + ci * g.w_stride[1] + r * g.w_stride[2] + s * g.w_stride[3]];
        value = transform_forward<float>(wt.kind, static_cast<float>(w), w_alpha);
      }
      b_row[kk] = static_cast<scalar_t>(value);
    }
  };

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
    }
  }

  const int64_t k_tiles = (depth + kElems - 1) / kElems;
#pragma unroll
  for (int stage = 0; stage < kStages - 1; ++stage) {
    if (stage < k_tiles) load_tile(stage, stage * int64_t(kElems));
    copy_async_commit();
  }
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    copy_async_wait<kStages - 2>();
    __syncthreads();  // tile kt is in shared memory; every warp is done with tile kt - 1's stage
    const int64_t next = kt + kStages - 1;
    if (next < k_tiles) load_tile(static_cast<int>(next % kStages), next * kElems);
    copy_async_commit();

    const char* a_tile = a_stage(static_cast<int>(kt % kStages)) + (warp_m * 64) * kPaddedRowBytes;
    const char* b_tile = b_stage(static_cast<int>(kt % kStages)) + (warp_n * 32) * kPaddedRowBytes;
#pragma unroll
    for (int kk = 0; kk < kElems; kk += kStep) {
      uint32_t a_frag[4][4], b_frag[4][2];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        load_a<scalar_t>(a_frag[i], a_tile + (i * 16) * kPaddedRowBytes + kk * int(sizeof(scalar_t)), group, quad);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        load_b<scalar_t>(b_frag[j], b_tile + (j * 8) * kPaddedRowBytes + kk * int(sizeof(scalar_t)), group, quad);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) mma(acc[i][j], a_frag[i], b_frag[j], scalar_t{});
      }
    }
  }
  copy_async_wait<0>();

  // Epilogue: accumulator element e of tile (i, j) is row group (+8 for e >= 2), column quad*2 + e%2.
  const int64_t* dst_stride = kInputGrad ? g.x_stride : g.y_stride;
  const int64_t dst_channel0 = group_index * cols;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t row = row0 + warp_m * 64 + i * 16 + group + half * 8;
      if (row >= rows) continue;
      const int64_t n = row / (rows_h * rows_w), y = (row / rows_w) % rows_h, x = row % rows_w;
      scalar_t* out = dst + n * dst_stride[0] + y * dst_stride[2] + x * dst_stride[3];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t col = col0 + warp_n * 32 + j * 8 + quad * 2 + e;
          if (col >= cols) continue;
          float value = acc[i][j][half * 2 + e];
          if (bias != nullptr) {  // the transposed convolution's bias too (input-gradient form)
            value += transform_forward<float>(bt.kind, static_cast<float>(bias[dst_channel0 + col]),
                                              static_cast<float>(bt.alpha));
          }
          out[(dst_channel0 + col) * dst_stride[1]] = static_cast<scalar_t>(value);
        }
      }
    }
  }
#else
  __trap();  // the host launches these kernels only on compute capability 8.0 and newer
#endif
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fusedtie_conv2d_fprop_mma_kernel(const scalar_t* src, const scalar_t* weight, const scalar_t* bias, scalar_t* dst,
                                     ConvGeometry g, TransformSpec wt, TransformSpec bt) {
  conv_mma_body<scalar_t, false>(src, weight, bias, dst, g, wt, bt);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fusedtie_conv2d_dgrad_mma_kernel(const scalar_t* src, const scalar_t* weight, const scalar_t* bias, scalar_t* dst,
                                     ConvGeometry g, TransformSpec wt, TransformSpec bt) {
  conv_mma_body<scalar_t, true>(src, weight, bias, dst, g, wt, bt);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

bool mma_kernels_available() {
#ifdef FUSEDTIE_CUDA_EMULATION
  return true;
#else
  const auto* properties = at::cuda::getCurrentDeviceProperties();
  if (properties->major < 8) return false;  // mma.sync bf16 and cp.async need sm_80
  // The code in this binary must be sm_80 or newer too: a build for older architectures only
  // (TORCH_CUDA_ARCH_LIST without 8.0+) compiles the kernels to a trap.
  static const bool compiled_for_sm80 = [] {
    cudaFuncAttributes attributes{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, fusedtie_conv2d_fprop_mma_kernel<c10::Half>));
    return attributes.ptxVersion >= 80 && attributes.binaryVersion >= 80;
  }();
  return compiled_for_sm80;
#endif
}

void launch_mma_conv(const at::Tensor& src, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     const at::Tensor& dst, const ConvGeometry& g, TransformSpec weight_transform,
                     TransformSpec bias_transform, bool input_grad) {
  const int64_t rows = g.batch * (input_grad ? g.in_h * g.in_w : g.out_h * g.out_w);
  const int64_t cols = input_grad ? g.in_per_group : g.out_per_group;
  const dim3 grid(static_cast<unsigned>(ceil_div(rows, kBlockM)), static_cast<unsigned>(ceil_div(cols, kBlockN)),
                  static_cast<unsigned>(g.groups));
  const auto stream = current_stream();
  auto launch = [&]<typename scalar_t>() {
    if (input_grad) {
      FUSEDTIE_LAUNCH(fusedtie_conv2d_dgrad_mma_kernel<scalar_t>, grid, kThreads, stream)(
          src.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
          bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr, dst.mutable_data_ptr<scalar_t>(), g,
          weight_transform, bias_transform);
    } else {
      FUSEDTIE_LAUNCH(fusedtie_conv2d_fprop_mma_kernel<scalar_t>, grid, kThreads, stream)(
          src.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
          bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr, dst.mutable_data_ptr<scalar_t>(), g,
          weight_transform, bias_transform);
    }
    FUSEDTIE_LAUNCH_CHECK();
  };
  // Float (TF32), Half and BFloat16: the types mma_supports admits.
  AT_DISPATCH_SWITCH(src.scalar_type(), "fusedtie_conv2d_mma",
                     AT_DISPATCH_CASE(at::kFloat, [&] { launch.template operator()<scalar_t>(); })
                         AT_DISPATCH_CASE(at::kHalf, [&] { launch.template operator()<scalar_t>(); })
                             AT_DISPATCH_CASE(at::kBFloat16, [&] { launch.template operator()<scalar_t>(); }));
}

}  // namespace cuda
}  // namespace fusedtie
