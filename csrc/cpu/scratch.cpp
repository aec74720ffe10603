#include "scratch.h"

#include <c10/core/CPUAllocator.h>

#include <array>

namespace fusedtie {

namespace {

struct KeptBuffer {
  c10::DataPtr data;
  int64_t elements = 0;
};

}  // namespace

float* thread_scratch(ScratchSlot slot, int64_t elements, at::Tensor& fallback) {
  TORCH_CHECK(elements >= 0, "fusedtie: negative scratch size ", elements);
  if (elements * static_cast<int64_t>(sizeof(float)) > kKeptScratchBytes) {
    fallback = at::empty({elements}, at::TensorOptions().dtype(at::kFloat));
    return fallback.mutable_data_ptr<float>();
  }
  thread_local std::array<KeptBuffer, static_cast<size_t>(ScratchSlot::kCount)> kept;
  KeptBuffer& buffer = kept[static_cast<size_t>(slot)];
  if (buffer.elements < elements) {
    buffer.data = c10::GetCPUAllocator()->allocate(static_cast<size_t>(elements) * sizeof(float));
    buffer.elements = elements;
  }
  return static_cast<float*>(buffer.data.get());
}

}  // namespace fusedtie
