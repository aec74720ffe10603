// Whole-tensor transform passes of the CPU path (transform_tensors.h).
#include "transform_tensors.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdlib>
#include <memory>
#include <tuple>
#include <utility>

#include "../dense_layout.h"
#include "transform_passes.h"

namespace fusedtie {
namespace {

// Elements per task: large enough that a task outweighs the scheduling, small enough that a 3x3
// 64->64 weight (37k elements) still splits across two threads for the transcendental transforms.
constexpr int64_t kGrainSize = 16384;

// out = f(src) in one parallel vectorised pass; out is laid out like src, which is dense.
void transform_into(const at::Tensor& src, at::Tensor& out, const TransformSpec& spec) {
  if (src.numel() == 0) return;
  const auto& passes = cpu_transform_passes();
  const auto* in_bytes = static_cast<const char*>(src.const_data_ptr());
  auto* out_bytes = static_cast<char*>(out.mutable_data_ptr());
  const int64_t item = src.element_size();
  at::parallel_for(0, src.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
    passes.forward(spec.kind, src.scalar_type(), in_bytes + begin * item, out_bytes + begin * item, end - begin,
                   spec.alpha);
  });
}

at::Tensor dense(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? t : t.contiguous(t.suggest_memory_format());
}

// The derived weight f(W) lives only while at::convolution reads it, so its memory is reused: one
// grow-only buffer per calling thread, as large as the largest derived weight that thread has made.
// A fresh weight-sized allocation is not free: above glibc's mmap threshold it is new pages, whose
// faults can cost more than the convolution (docs/design.md, "f(W) lives in a reused scratch
// buffer"). The buffer is raw memory of our own, not a tensor, so it never takes part in autograd
// or inference-mode bookkeeping; the tensor handed to at::convolution borrows it for the one call.
class ScratchBuffer {
 public:
  void* reserve(size_t bytes) {
    if (bytes > capacity_) {
      constexpr size_t kAlignment = 64;  // a cache line, and AVX-512 alignment
      const size_t rounded = (bytes + kAlignment - 1) / kAlignment * kAlignment;
      memory_.reset(static_cast<char*>(std::aligned_alloc(kAlignment, rounded)));
      TORCH_CHECK(memory_ != nullptr, "fusedtie: could not allocate ", rounded,
                  " bytes of scratch memory for the derived weight");
      capacity_ = rounded;
    }
    return memory_.get();
  }

 private:
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  std::unique_ptr<char, Free> memory_;
  size_t capacity_ = 0;
};

}  // namespace

// f(source) as a new tensor with source's layout (kept for dense tensors, contiguous otherwise).
at::Tensor apply_transform(const at::Tensor& source, const TransformSpec& spec) {
  const at::Tensor src = dense(source);
  at::Tensor out = at::empty_like(src);
  transform_into(src, out, spec);
  return out;
}

// f(source) in this thread's scratch buffer: valid until the next call on this thread, so only for
// a tensor that the caller consumes before returning (never for an operator's output).
at::Tensor apply_transform_to_scratch(const at::Tensor& source, const TransformSpec& spec) {
  thread_local ScratchBuffer scratch;
  const at::Tensor src = dense(source);
  void* memory = scratch.reserve(static_cast<size_t>(src.numel()) * src.element_size());
  at::Tensor out = at::from_blob(memory, src.sizes(), src.strides(), src.options());
  transform_into(src, out, spec);
  return out;
}

// grad * f'(source), computed in grad's memory when it is laid out like source. grad must be a
// temporary of ours (both callers pass a freshly made gradient), since it is overwritten.
at::Tensor apply_chain_rule_in_place(at::Tensor grad, const at::Tensor& source, const TransformSpec& spec) {
  at::Tensor src;
  std::tie(grad, src) = in_one_dense_layout(std::move(grad), source);
  if (grad.numel() == 0) return grad;
  const auto& passes = cpu_transform_passes();
  auto* grad_bytes = static_cast<char*>(grad.mutable_data_ptr());
  const auto* src_bytes = static_cast<const char*>(src.const_data_ptr());
  const int64_t item = grad.element_size();
  at::parallel_for(0, grad.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
    passes.chain_rule(spec.kind, grad.scalar_type(), grad_bytes + begin * item, src_bytes + begin * item,
                      grad_bytes + begin * item, end - begin, spec.alpha);
  });
  return grad;
}

}  // namespace fusedtie
