// The registry of user transforms (user_transforms.h).
#include "user_transforms.h"

#include <ATen/OpMathType.h>
#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <dlfcn.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <iterator>
#include <memory>
#include <mutex>
#include <sstream>
#include <unordered_map>

#include "../fusedtie/include/fusedtie_user_transform.h"
#include "conv_params.h"
#include "cpu/transform_passes.h"

namespace fusedtie {
namespace {

struct Entry {
  std::string name;
  std::string definition;
  const FusedtieUserTransformTable* table = nullptr;  // compiled transforms
  std::vector<double> params;
  std::vector<TransformSpec> stages;  // chains
};

// Lookups by kind (every pass) read an atomic slot without a lock; registration and lookups by
// name (once per operator call, for user names only) take the mutex.
class Registry {
 public:
  static Registry& get() {
    static Registry* registry = new Registry();  // never destroyed: kinds outlive static destruction
    return *registry;
  }

  const Entry& entry(TransformKind kind) const {
    const int64_t index = int64_t(static_cast<int32_t>(kind)) - kUserTransformBase;
    const Entry* e =
        (index >= 0 && index < kMaxUserTransforms) ? slots_[index].load(std::memory_order_acquire) : nullptr;
    TORCH_CHECK(e != nullptr, "fusedtie: no user transform has kind ", static_cast<int32_t>(kind));
    return *e;
  }

  std::optional<TransformKind> find(const std::string& name) const {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = by_name_.find(name);
    if (it == by_name_.end()) return std::nullopt;
    return it->second;
  }

  std::vector<std::string> names() const {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<std::pair<int32_t, std::string>> ordered;
    for (const auto& [name, kind] : by_name_) ordered.emplace_back(static_cast<int32_t>(kind), name);
    std::sort(ordered.begin(), ordered.end());
    std::vector<std::string> out;
    for (auto& [kind, name] : ordered) out.push_back(std::move(name));
    return out;
  }

  bool check(const std::string& name, const std::string& definition) const {
    std::lock_guard<std::mutex> lock(mutex_);
    return check_locked(name, definition);
  }

  void add(std::unique_ptr<Entry> e) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (check_locked(e->name, e->definition)) return;  // the same definition: nothing to do
    TORCH_CHECK(count_ < kMaxUserTransforms, "fusedtie: at most ", kMaxUserTransforms,
                " user transforms can be registered in one process");
    const auto kind = static_cast<TransformKind>(kUserTransformBase + count_);
    by_name_[e->name] = kind;
    slots_[count_++].store(e.release(), std::memory_order_release);
  }

  void remove(const std::string& name) {
    std::lock_guard<std::mutex> lock(mutex_);
    by_name_.erase(name);
  }

 private:
  bool check_locked(const std::string& name, const std::string& definition) const {
    TORCH_CHECK_VALUE(!name.empty(), "a transform name must not be empty");
    for (const auto& info : kTransforms) {
      TORCH_CHECK_VALUE(name != info.name, "'", name, "' is a built-in transform (f(x) = ", info.forward,
                        "); choose another name for ", definition);
    }
    const auto it = by_name_.find(name);
    if (it == by_name_.end()) return false;
    const Entry& existing = entry(it->second);
    TORCH_CHECK_VALUE(existing.definition == definition, "transform '", name, "' is already defined as ",
                      existing.definition, "; cannot redefine it as ", definition,
                      " (a name keeps one definition for the life of the process: choose another name)");
    return true;
  }

  mutable std::mutex mutex_;
  std::unordered_map<std::string, TransformKind> by_name_;
  std::array<std::atomic<const Entry*>, kMaxUserTransforms> slots_{};
  int32_t count_ = 0;
};

// Raises the error a user library returned (nullptr: none).
void check_result(const Entry& e, const char* error) {
  TORCH_CHECK(error == nullptr, "fusedtie: user transform '", e.name, "' failed: ", error);
}

const Entry& compiled_entry(TransformKind kind) {
  const Entry& e = Registry::get().entry(kind);
  TORCH_INTERNAL_ASSERT(e.table != nullptr, "fusedtie: user transform '", e.name, "' is a chain, not compiled");
  return e;
}

const Entry& cuda_entry(TransformKind kind) {
  const Entry& e = compiled_entry(kind);
  TORCH_CHECK_NOT_IMPLEMENTED(e.table->cuda_forward != nullptr && e.table->cuda_chain_rule != nullptr,
                              "user transform '", e.name,
                              "' was compiled without CUDA kernels (it was created "
                              "with cuda=False, or where fusedtie had no CUDA or CUDA was not available); to run "
                              "it on CUDA tensors, create it with cuda=True (under another name in this process: "
                              "a name keeps its first definition)");
  return e;
}

// A chain on the CPU: blocks of elements converted to the computation type (float for the 16-bit
// types, as one fused pass would compute them), each stage run by the built-in vectorised passes
// in place, and the result converted back. The chain rule carries x_k = f_k(...f_1(x)) and
// grad * f_1'(x_0) * ... * f_k'(x_{k-1}) along the stages.
constexpr int64_t kChainBlock = 512;

template <typename scalar_t>
void chain_forward(const std::vector<TransformSpec>& stages, const scalar_t* in, scalar_t* out, int64_t numel) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr auto op_dtype = c10::CppTypeToScalarType<opmath_t>::value;
  const TransformPasses& passes = cpu_transform_passes();
  opmath_t x[kChainBlock];
  for (int64_t begin = 0; begin < numel; begin += kChainBlock) {
    const int64_t n = std::min(kChainBlock, numel - begin);
    for (int64_t i = 0; i < n; ++i) x[i] = static_cast<opmath_t>(in[begin + i]);
    for (const TransformSpec& stage : stages) passes.forward(stage.kind, op_dtype, x, x, n, stage.alpha);
    for (int64_t i = 0; i < n; ++i) out[begin + i] = static_cast<scalar_t>(x[i]);
  }
}

template <typename scalar_t>
void chain_chain_rule(const std::vector<TransformSpec>& stages, const scalar_t* grad, const scalar_t* source,
                      scalar_t* out, int64_t numel) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr auto op_dtype = c10::CppTypeToScalarType<opmath_t>::value;
  const TransformPasses& passes = cpu_transform_passes();
  opmath_t x[kChainBlock], g[kChainBlock];
  for (int64_t begin = 0; begin < numel; begin += kChainBlock) {
    const int64_t n = std::min(kChainBlock, numel - begin);
    for (int64_t i = 0; i < n; ++i) {
      x[i] = static_cast<opmath_t>(source[begin + i]);
      g[i] = static_cast<opmath_t>(grad[begin + i]);
    }
    for (size_t s = 0; s < stages.size(); ++s) {
      passes.chain_rule(stages[s].kind, op_dtype, g, x, g, n, stages[s].alpha);
      if (s + 1 < stages.size()) passes.forward(stages[s].kind, op_dtype, x, x, n, stages[s].alpha);
    }
    for (int64_t i = 0; i < n; ++i) out[begin + i] = static_cast<scalar_t>(g[i]);
  }
}

// The instruction sets a user library may be compiled for, narrowest first (fusedtie_user_transform.h).
constexpr const char* kIsaOrder[] = {"DEFAULT", "AVX2", "AVX512"};

int isa_rank(const std::string& isa) {
  for (int i = 0; i < static_cast<int>(std::size(kIsaOrder)); ++i) {
    if (isa == kIsaOrder[i]) return i;
  }
  return -1;
}

// Refuses a library compiled for an instruction set this process's CPU capability lacks, before
// any of its functions is called (the first would be an illegal instruction). The capability is ATen's
// (ATEN_CPU_CAPABILITY lowers it), the one fusedtie/_user_build.py compiled for: a library it
// built in this process always passes; one from a cache shared with a wider machine cannot
// arrive here, since the instruction set is part of the cache key, but is caught if it does.
void check_library_isa(void* handle, const std::string& name, const std::string& library_path) {
  const auto* isa_symbol = static_cast<const char*>(dlsym(handle, FUSEDTIE_USER_TRANSFORM_ISA_SYMBOL));
  TORCH_CHECK(isa_symbol != nullptr, "fusedtie: ", library_path, " has no ", FUSEDTIE_USER_TRANSFORM_ISA_SYMBOL,
              ": not a fusedtie user transform library of interface version ", FUSEDTIE_USER_TRANSFORM_ABI_VERSION,
              "; delete it to rebuild it");
  const std::string isa(isa_symbol, strnlen(isa_symbol, 16));
  const std::string capability = at::get_cpu_capability();
  const int needed = isa_rank(isa);
  const int available = isa_rank(capability);
  TORCH_CHECK(needed == 0 || (needed > 0 && available >= needed), "fusedtie: the library of user transform '", name,
              "' (", library_path, ") was compiled for the ", isa,
              " instruction set, which this process's CPU "
              "capability (",
              capability,
              ", ATen's choice, lowered by ATEN_CPU_CAPABILITY) does not include; "
              "delete its folder to rebuild it for this machine");
}

}  // namespace

std::optional<TransformKind> find_user_transform(c10::string_view name) {
  return Registry::get().find(std::string(name));
}

std::vector<std::string> user_transform_names() { return Registry::get().names(); }

bool check_user_transform(const std::string& name, const std::string& definition) {
  return Registry::get().check(name, definition);
}

void register_compiled_transform(const std::string& name, const std::string& definition,
                                 const std::string& library_path, const std::vector<double>& params) {
  if (check_user_transform(name, definition)) return;
  // RTLD_LOCAL: the library's symbols stay its own (every user library defines the same names).
  void* handle = dlopen(library_path.c_str(), RTLD_NOW | RTLD_LOCAL);
  TORCH_CHECK(handle != nullptr, "fusedtie: cannot load the library of user transform '", name, "' (", library_path,
              "): ", dlerror());
  check_library_isa(handle, name, library_path);
  auto* table_fn = reinterpret_cast<FusedtieUserTransformTableFn>(dlsym(handle, FUSEDTIE_USER_TRANSFORM_TABLE_SYMBOL));
  TORCH_CHECK(table_fn != nullptr, "fusedtie: ", library_path, " exports no ", FUSEDTIE_USER_TRANSFORM_TABLE_SYMBOL,
              "(): not a fusedtie user transform library");
  const FusedtieUserTransformTable* table = table_fn();
  TORCH_CHECK(table != nullptr && table->abi_version == FUSEDTIE_USER_TRANSFORM_ABI_VERSION, "fusedtie: ", library_path,
              " was built for user-transform interface version ", table == nullptr ? -1 : table->abi_version,
              ", this library has version ", FUSEDTIE_USER_TRANSFORM_ABI_VERSION, "; delete it to rebuild it");
  TORCH_CHECK_VALUE(table->num_params == static_cast<int32_t>(params.size()), "user transform '", name, "' takes ",
                    table->num_params, " parameters, got ", params.size(), " values");
  TORCH_CHECK(table->cpu_forward != nullptr && table->cpu_chain_rule != nullptr, "fusedtie: ", library_path,
              " has no CPU functions");
  auto e = std::make_unique<Entry>();
  e->name = name;
  e->definition = definition;
  e->table = table;
  e->params = params;
  Registry::get().add(std::move(e));
}

void register_chain_transform(const std::string& name, const std::string& definition,
                              const std::vector<TransformSpec>& stages) {
  TORCH_CHECK_VALUE(stages.size() >= 2 && stages.size() <= static_cast<size_t>(kMaxChainStages),
                    "a chain composes 2 to ", kMaxChainStages, " transforms, got ", stages.size());
  for (const TransformSpec& stage : stages) {
    TORCH_CHECK_VALUE(!is_user_transform(stage.kind) && static_cast<int32_t>(stage.kind) >= 0 &&
                          static_cast<int32_t>(stage.kind) < kNumTransforms,
                      "a chain composes built-in transforms only, got kind ", static_cast<int32_t>(stage.kind));
  }
  auto e = std::make_unique<Entry>();
  e->name = name;
  e->definition = definition;
  e->stages = stages;
  Registry::get().add(std::move(e));
}

void unregister_user_transform(const std::string& name) { Registry::get().remove(name); }

const std::vector<TransformSpec>* user_chain_stages(TransformKind kind) {
  if (!is_user_transform(kind)) return nullptr;
  const Entry& e = Registry::get().entry(kind);
  return e.table == nullptr ? &e.stages : nullptr;
}

void user_forward_pass(TransformKind kind, c10::ScalarType dtype, const void* in, void* out, int64_t numel) {
  const Entry& e = Registry::get().entry(kind);
  if (e.table != nullptr) {
    check_result(e, e.table->cpu_forward(static_cast<int32_t>(dtype), in, out, numel, e.params.data()));
    return;
  }
  dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    chain_forward(e.stages, static_cast<const scalar_t*>(in), static_cast<scalar_t*>(out), numel);
  });
}

void user_chain_rule_pass(TransformKind kind, c10::ScalarType dtype, const void* grad, const void* source, void* out,
                          int64_t numel) {
  const Entry& e = Registry::get().entry(kind);
  if (e.table != nullptr) {
    check_result(e, e.table->cpu_chain_rule(static_cast<int32_t>(dtype), grad, source, out, numel, e.params.data()));
    return;
  }
  dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    chain_chain_rule(e.stages, static_cast<const scalar_t*>(grad), static_cast<const scalar_t*>(source),
                     static_cast<scalar_t*>(out), numel);
  });
}

void user_cuda_forward_pass(TransformKind kind, c10::ScalarType dtype, const void* in, void* out, int64_t numel,
                            void* stream) {
  const Entry& e = cuda_entry(kind);
  check_result(e, e.table->cuda_forward(static_cast<int32_t>(dtype), in, out, numel, e.params.data(), stream));
}

void user_cuda_chain_rule_pass(TransformKind kind, c10::ScalarType dtype, const void* grad, const void* source,
                               void* out, int64_t numel, void* stream) {
  const Entry& e = cuda_entry(kind);
  check_result(
      e, e.table->cuda_chain_rule(static_cast<int32_t>(dtype), grad, source, out, numel, e.params.data(), stream));
}

}  // namespace fusedtie
