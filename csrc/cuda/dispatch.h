#pragma once
// Per call and pass, the fused kernels or the library path, for every convolution operator on CUDA,
// written once: an operator's entry points (tied_conv2d_cuda.cu, tied_conv_transpose2d_cuda.cu) check
// the call, set the device guard, and hand run_forward / run_backward their call's facts and the two
// ways to run the pass; the setting's policy (cost rule, measurement, autotune cache) is
// algorithm_choice.h's.
//
// The facts are a small struct per operator (a "call"), with
//   static constexpr const char* kName     the operator, the autotune key's first word;
//   input, weight, bias                    the call's operands;
//   bool fused_supported()                 the fused kernels handle the call;
//   int64_t multiply_adds()                the multiply-adds of one pass (each pass does as many);
//   int64_t in_per_group(), out_per_group()  the weight's channels per group on its two sides;
//   bool forward_on_tensor_cores()         the fused forward runs on tensor cores;
//   void describe_geometry(std::ostream&)  the autotune key's last part: geometry and transforms.
// Every member function but fused_supported is called only when the setting needs it.
#include <ATen/core/Tensor.h>

#include <array>
#include <sstream>
#include <string>

#include "algorithm_choice.h"
#include "fused_conv2d.h"

namespace fusedtie {
namespace cuda {

enum class Pass { kForward, kBackward };

// auto's rule (fused_wins_by_cost) on the call's facts: tensor cores only in the forward; the
// backward is judged by its weight gradient, which runs on CUDA cores.
template <class Call>
bool fused_wins(Pass pass, const Call& call) {
  const bool tensor_cores = pass == Pass::kForward && call.forward_on_tensor_cores();
  return fused_wins_by_cost(call.multiply_adds(), call.in_per_group(), call.out_per_group(), tensor_cores);
}

// The call signature autotune caches its choice under: "<operator> fwd|" or "<operator> bwd|", the
// operands (describe_operands), '|', the operator's geometry and transforms.
template <class Call>
std::string autotune_key(Pass pass, const Call& call, std::array<bool, 3> output_mask, at::IntArrayRef grad_strides) {
  std::ostringstream key;
  key << Call::kName << ' ' << (pass == Pass::kForward ? "fwd" : "bwd") << '|';
  describe_operands(key, call.input, call.weight, call.bias.has_value(), grad_strides, output_mask, allow_tf32());
  key << '|';
  call.describe_geometry(key);
  return key.str();
}

// Runs one pass of the call: fused() or library(), which return the pass's result alike, as the
// setting chooses (use_fused); autotune's measurement runs both.
template <class Call, class Fused, class Library>
auto run_pass(Pass pass, const Call& call, std::array<bool, 3> output_mask, at::IntArrayRef grad_strides,
              const Fused& fused, const Library& library) {
  const bool run_fused = use_fused(
      call.fused_supported(), [&] { return fused_wins(pass, call); },
      [&] { return autotune_key(pass, call, output_mask, grad_strides); },
      [&] { return measure_fused_wins(fused, library); });
  return run_fused ? fused() : library();
}

// The forward: its key has every output_mask entry true and no gradient strides.
template <class Call, class Fused, class Library>
auto run_forward(const Call& call, const Fused& fused, const Library& library) {
  return run_pass(Pass::kForward, call, {true, true, true}, {}, fused, library);
}

// The backward: its key has the gradients asked for and grad_output's strides (they decide layout
// copies).
template <class Call, class Fused, class Library>
auto run_backward(const Call& call, const at::Tensor& grad_output, std::array<bool, 3> output_mask, const Fused& fused,
                  const Library& library) {
  return run_pass(Pass::kBackward, call, output_mask, grad_output.strides(), fused, library);
}

}  // namespace cuda
}  // namespace fusedtie
