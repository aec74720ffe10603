#pragma once
// Per-thread scratch kept between calls, as oneDNN keeps its own scratchpad. A fresh megabyte-sized
// allocation per call is served by mmap or by a heap top that glibc trims back, and then faults in
// every page again on each call (409 page faults, about 0.3 ms, a conv5_x 3x3 batch-1 forward on
// the AMD Zen 4 VM, depending on the process's allocation history; docs/cpu-algorithms.md).
#include <ATen/ATen.h>

#include <cstdint>

namespace fusedtie {

// What a scratch buffer is for: one buffer per slot and thread, so two live uses never share one.
enum class ScratchSlot { kColumns, kOutput, kTile, kCount };

// A buffer of at least `elements` floats, 64-byte aligned, valid until this thread next asks for the
// same slot. Up to kKeptScratchBytes per slot stay allocated between calls; a larger request is
// served by `fallback` (allocated here, freed with it), so a one-off huge call does not pin memory.
inline constexpr int64_t kKeptScratchBytes = int64_t{16} << 20;
float* thread_scratch(ScratchSlot slot, int64_t elements, at::Tensor& fallback);

}  // namespace fusedtie
