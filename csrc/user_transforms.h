#pragma once
// The registry of user transforms: transforms defined at run time by name, each a TransformKind from
// kUserTransformBase up (transforms.h), so that the operator schema (str transform, float alpha)
// and every call site stay as they are, and torch.compile / export carry the name as a constant.
// Two sorts:
//   compiled: f and f' written as C++ expressions, compiled into a shared library of their own by
//             fusedtie.Transform.from_expression (fusedtie/_user_build.py); the entry holds that
//             library's table of functions (fusedtie/include/fusedtie_user_transform.h) and the
//             values of its named parameters.
//   chain:    a composition of built-in transforms, f_n(...f_1(x)) (fusedtie.Transform.chain); no
//             compiler is involved: the CPU passes run stage after stage on blocks of elements, and
//             the CUDA elementwise kernels compose the stages per element.
// Entries are never freed (a kind stays valid for the life of the process: a kind may be captured
// by a running operator while another thread registers), and a name is bound to one definition:
// registering it again with the same definition is a no-op, with another one a ValueError.
// User transforms ignore the operator's alpha (compiled ones carry their own parameters; chain
// stages their own alphas).
#include <c10/core/ScalarType.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "transforms.h"

namespace fusedtie {

inline constexpr int kMaxUserTransforms = 4096;
inline constexpr int kMaxChainStages = 8;

// The kind registered under `name`, if any (parse_transform's fall-back for non-built-in names).
std::optional<TransformKind> find_user_transform(c10::string_view name);

// The registered names, in registration order (for messages).
std::vector<std::string> user_transform_names();

// Raises the ValueError for a name that cannot be (re)defined as `definition`: a built-in's name,
// or one registered with another definition (both definitions quoted). Returns whether `name` is
// registered already with this very definition (then there is nothing to do).
bool check_user_transform(const std::string& name, const std::string& definition);

// Registers f and f' from the user transform library at library_path (dlopen'ed, never closed),
// with its parameter values. A library compiled for an instruction set this process's CPU
// capability lacks (its vector loops: fusedtie_user_transform.h) is refused before any of its
// functions is called.
void register_compiled_transform(const std::string& name, const std::string& definition,
                                 const std::string& library_path, const std::vector<double>& params);

// Registers the composition stages[n-1](...stages[0](x)) of 2 to kMaxChainStages built-ins.
void register_chain_transform(const std::string& name, const std::string& definition,
                              const std::vector<TransformSpec>& stages);

// Unbinds a name (the creation of a transform failed after registering it); its kind stays valid.
void unregister_user_transform(const std::string& name);

// The stages of a chain kind; nullptr for any other kind.
const std::vector<TransformSpec>* user_chain_stages(TransformKind kind);

// The CPU passes of a user kind, with transform_passes.h's semantics (out may alias in / grad).
void user_forward_pass(TransformKind kind, c10::ScalarType dtype, const void* in, void* out, int64_t numel);
void user_chain_rule_pass(TransformKind kind, c10::ScalarType dtype, const void* grad, const void* source, void* out,
                          int64_t numel);

// The CUDA kernels of a compiled kind, launched on `stream` (a cudaStream_t) with device pointers;
// NotImplementedError when its library was compiled without CUDA kernels. Chains do not come here
// (elementwise.cu composes built-ins itself).
void user_cuda_forward_pass(TransformKind kind, c10::ScalarType dtype, const void* in, void* out, int64_t numel,
                            void* stream);
void user_cuda_chain_rule_pass(TransformKind kind, c10::ScalarType dtype, const void* grad, const void* source,
                               void* out, int64_t numel, void* stream);

}  // namespace fusedtie
