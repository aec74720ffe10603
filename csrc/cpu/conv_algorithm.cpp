// The CPU algorithm policy: the process-wide setting, auto's rules, and the BLAS assessment that
// decides whether the GEMM path may run under auto at all. The kernels (tied_conv2d_kernel.cpp)
// ask choose_algorithm() and run what it says. Measurements behind each rule: docs/cpu-algorithms.md.
#include "conv_algorithm.h"

#include <ATen/Context.h>
#include <c10/util/safe_numerics.h>

#include <atomic>
#include <cctype>
#include <cstdlib>
#include <cstring>

#include "../conv_params.h"
#include "brgemm_conv2d.h"
#include "depthwise_conv2d.h"
#include "gemm_conv2d.h"
#include "linear_conv2d.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace fusedtie {
namespace {

std::atomic<CpuConvAlgorithm> g_conv_algorithm{CpuConvAlgorithm::kAuto};

std::string upper(std::string s) {
  for (char& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return s;
}

std::string env_or_empty(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr ? std::string() : std::string(value);
}

// The CPU's vendor string and brand string from cpuid ("" where cpuid does not exist).
std::pair<std::string, std::string> cpuid_vendor_and_model() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned int regs[4] = {0, 0, 0, 0};
  if (__get_cpuid(0, &regs[0], &regs[1], &regs[2], &regs[3]) == 0) return {"", ""};
  char vendor[13] = {};
  std::memcpy(vendor, &regs[1], 4);      // ebx
  std::memcpy(vendor + 4, &regs[3], 4);  // edx
  std::memcpy(vendor + 8, &regs[2], 4);  // ecx
  std::string model;
  unsigned int max_extended = __get_cpuid_max(0x80000000u, nullptr);
  if (max_extended >= 0x80000004u) {
    char brand[49] = {};
    for (unsigned int leaf = 0; leaf < 3; ++leaf) {
      __get_cpuid(0x80000002u + leaf, &regs[0], &regs[1], &regs[2], &regs[3]);
      std::memcpy(brand + 16 * leaf, regs, 16);
    }
    model = brand;
    const auto first = model.find_first_not_of(' ');
    const auto last = model.find_last_not_of(' ');
    model = first == std::string::npos ? "" : model.substr(first, last - first + 1);
  }
  return {vendor, model};
#else
  return {"", ""};
#endif
}

BlasAssessment assess_this_process() {
  const auto [vendor, model] = cpuid_vendor_and_model();
  BlasAssessment a = assess_gemm_blas(vendor, model, at::globalContext().hasMKL(),
                                      env_or_empty("MKL_ENABLE_INSTRUCTIONS"), env_or_empty("MKL_CBWR"));
  // The user's word over the rule, for a BLAS the rule does not know (and for tests of auto's
  // shape rule on any machine).
  const std::string forced = env_or_empty("FUSEDTIE_GEMM_UNDER_AUTO");
  if (forced == "0" || forced == "1") {
    a.gemm_trusted = forced == "1";
    a.reason = "FUSEDTIE_GEMM_UNDER_AUTO=" + forced + " (the rule alone says: " + a.reason + ")";
  } else {
    TORCH_CHECK_VALUE(forced.empty(), "FUSEDTIE_GEMM_UNDER_AUTO must be 0 or 1, got '", forced, "'");
  }
  return a;
}

}  // namespace

BlasAssessment assess_gemm_blas(const std::string& vendor, const std::string& model, bool has_mkl,
                                const std::string& mkl_enable_instructions, const std::string& mkl_cbwr) {
  BlasAssessment a;
  a.vendor = vendor;
  a.model = model;
  a.blas = has_mkl ? "MKL" : "other";
  // MKL runs its fastest code paths only on Intel CPUs; on AMD its sgemm measured at half of
  // oneDNN's convolution speed on the same GEMM. Other BLAS builds were never measured to win.
  if (!has_mkl) {
    a.reason = "the BLAS is not MKL; the GEMM path was measured to win only on MKL";
  } else if (vendor != "GenuineIntel") {
    a.reason = "MKL on a non-Intel CPU (" + (vendor.empty() ? std::string("unknown vendor") : vendor) +
               ") runs slower code paths than oneDNN";
  } else if (!mkl_enable_instructions.empty() && upper(mkl_enable_instructions).rfind("AVX512", 0) != 0) {
    a.reason = "MKL_ENABLE_INSTRUCTIONS=" + mkl_enable_instructions + " holds MKL below AVX-512";
  } else if (!mkl_cbwr.empty() && upper(mkl_cbwr).rfind("AVX512", 0) != 0 && upper(mkl_cbwr) != "AUTO") {
    a.reason = "MKL_CBWR=" + mkl_cbwr + " holds MKL to a reproducible code path below AVX-512";
  } else {
    a.gemm_trusted = true;
    a.reason = "MKL on an Intel CPU at its full instruction set";
  }
  return a;
}

const BlasAssessment& gemm_blas_assessment() {
  static const BlasAssessment assessment = assess_this_process();
  return assessment;
}

bool gemm_applies(const at::Tensor& input, const at::Tensor& weight, const TiedConv2dParams& p) {
  const auto dtype = input.scalar_type();
  return p.groups == 1 && (dtype == at::kFloat || dtype == at::kDouble) && input.numel() > 0 && weight.numel() > 0 &&
         is_nchw_call(input, weight);
}

// Whether the weight has at least `ratio` times more elements than batch x output positions (the
// GEMM's other side), for batches up to 8.
bool weight_outweighs(const at::Tensor& input, const at::Tensor& weight, const TiedConv2dParams& p, int64_t ratio) {
  const int64_t batch = input.size(0);
  if (batch > 8) return false;
  const auto out = p.output_size(input, weight);
  int64_t other_side = 0;
  return !c10::mul_overflows(ratio * batch, out[2] * out[3], &other_side) && weight.numel() >= other_side;
}

// Pointwise convolutions up to batch 8, and im2col ones whose weight outweighs the rest by `ratio`.
bool weight_heavy(const at::Tensor& input, const at::Tensor& weight, const TiedConv2dParams& p, int64_t ratio) {
  if (input.size(0) <= 8 && is_pointwise(weight.size(2), weight.size(3), p.stride, p.padding)) return true;
  return weight_outweighs(input, weight, p, ratio);
}

// Where the GEMM beat the library on the one CPU it won on (Ice Lake Xeon, MKL; the figures are in
// docs/performance.md): ratio 1000.
bool gemm_wins(const at::Tensor& input, const at::Tensor& weight, const TiedConv2dParams& p) {
  return weight_heavy(input, weight, p, 1000);
}

// Where the brgemm backward beat the library's (AMD Zen 4, float32, 2 threads; docs/cpu-algorithms.md):
// ratio 10000 (a 3x3 on 7x7 at batch 1), where the passes the tie saves outweigh building the
// column matrix; pointwise convolutions need none. Its forward won only where the weight outweighs
// the rest by that ratio, pointwise or not (conv5_x 3x3 and 1x1 at batch 1, not conv5_x 1x1 at
// batch 8 nor conv4_x): there, the pass over W is most of the work.
bool brgemm_wins(const at::Tensor& input, const at::Tensor& weight, const TiedConv2dParams& p, ConvPass pass) {
  return pass == ConvPass::kForward ? weight_outweighs(input, weight, p, 10000) : weight_heavy(input, weight, p, 10000);
}

// The fused depthwise kernel won at stride 1 on outputs of at least 10x10 (docs/cpu-algorithms.md);
// smaller outputs and stride 2 stay with the library.
bool depthwise_wins(const at::Tensor& input, const at::Tensor& weight, const TiedConv2dParams& p) {
  const auto out = p.output_size(input, weight);
  return p.stride[0] == 1 && p.stride[1] == 1 && out[2] * out[3] >= 100;
}

CpuConvAlgorithm choose_algorithm(const at::Tensor& input, const at::Tensor& weight, const TiedConv2dParams& p,
                                  ConvPass pass) {
  if (!geometry_fits_own_kernels(p.stride, p.padding, p.dilation)) return CpuConvAlgorithm::kLibrary;
  switch (g_conv_algorithm.load(std::memory_order_relaxed)) {
    case CpuConvAlgorithm::kLibrary: return CpuConvAlgorithm::kLibrary;
    case CpuConvAlgorithm::kGemm:
      return gemm_applies(input, weight, p) ? CpuConvAlgorithm::kGemm : CpuConvAlgorithm::kLibrary;
    case CpuConvAlgorithm::kDepthwise:
      return depthwise_applies(input, weight, p) ? CpuConvAlgorithm::kDepthwise : CpuConvAlgorithm::kLibrary;
    case CpuConvAlgorithm::kBrgemm:
      return brgemm_applies(input, weight, p) ? CpuConvAlgorithm::kBrgemm : CpuConvAlgorithm::kLibrary;
    case CpuConvAlgorithm::kLinear:
      return linear_applies(input, weight, p) ? CpuConvAlgorithm::kLinear : CpuConvAlgorithm::kLibrary;
    case CpuConvAlgorithm::kAuto: break;
  }
  // A matrix product: the fused skinny GEMMs up to 8 rows (W read once per pass, as plain nn.Linear
  // reads it), the library's BLAS call above (nn.Linear's own); either holds on any CPU, which
  // oneDNN's 1x1 convolution (a weight re-pack per call) does not (docs/cpu-algorithms.md).
  if (is_matrix_product(input, weight, p)) {
    return linear_applies(input, weight, p) ? CpuConvAlgorithm::kLinear : CpuConvAlgorithm::kLibrary;
  }
  if (depthwise_applies(input, weight, p) && depthwise_wins(input, weight, p)) return CpuConvAlgorithm::kDepthwise;
  // brgemm's backward saves the passes over W (f for the input gradient, f' and the library's
  // re-pack of dW); an input gradient adds col2im, which only pointwise convolutions do without.
  // Its forward applies f while packing W, the pass oneDNN's re-pack makes anyway, so it runs only
  // where there is an f to apply: for identity the library path is plain oneDNN.
  const bool brgemm_pass =
      (pass == ConvPass::kForward && !p.weight_transform.is_identity()) || pass == ConvPass::kWeightBackward ||
      (pass == ConvPass::kBackward && is_pointwise(weight.size(2), weight.size(3), p.stride, p.padding));
  if (brgemm_pass && brgemm_micro_kernel_available() && brgemm_applies(input, weight, p) &&
      brgemm_wins(input, weight, p, pass)) {
    return CpuConvAlgorithm::kBrgemm;
  }
  if (gemm_blas_assessment().gemm_trusted && gemm_applies(input, weight, p) && gemm_wins(input, weight, p)) {
    return CpuConvAlgorithm::kGemm;
  }
  return CpuConvAlgorithm::kLibrary;
}

CpuConvAlgorithm choose_algorithm(const at::Tensor& input, const at::Tensor& weight,
                                  const TiedConvTranspose2dParams& p) {
  const CpuConvAlgorithm setting = g_conv_algorithm.load(std::memory_order_relaxed);
  const bool may_run = setting == CpuConvAlgorithm::kAuto || setting == CpuConvAlgorithm::kLinear;
  return may_run && linear_applies(input, weight, p) ? CpuConvAlgorithm::kLinear : CpuConvAlgorithm::kLibrary;
}

const char* algorithm_name(CpuConvAlgorithm algorithm) {
  switch (algorithm) {
    case CpuConvAlgorithm::kLibrary: return "library";
    case CpuConvAlgorithm::kGemm: return "gemm";
    case CpuConvAlgorithm::kDepthwise: return "depthwise";
    case CpuConvAlgorithm::kBrgemm: return "brgemm";
    case CpuConvAlgorithm::kLinear: return "linear";
    case CpuConvAlgorithm::kAuto: break;
  }
  return "auto";
}

std::string set_cpu_conv_algorithm(const std::string& name) {
  CpuConvAlgorithm chosen;
  if (name == "auto") {
    chosen = CpuConvAlgorithm::kAuto;
  } else if (name == "library") {
    chosen = CpuConvAlgorithm::kLibrary;
  } else if (name == "gemm") {
    chosen = CpuConvAlgorithm::kGemm;
  } else if (name == "depthwise") {
    chosen = CpuConvAlgorithm::kDepthwise;
  } else if (name == "brgemm") {
    chosen = CpuConvAlgorithm::kBrgemm;
  } else if (name == "linear") {
    chosen = CpuConvAlgorithm::kLinear;
  } else {
    TORCH_CHECK_VALUE(false, "unknown CPU convolution algorithm '", name,
                      "'; expected one of: auto, library, gemm, depthwise, brgemm, linear");
  }
  const std::string previous = cpu_conv_algorithm();
  g_conv_algorithm.store(chosen);
  return previous;
}

std::string cpu_conv_algorithm() { return algorithm_name(g_conv_algorithm.load()); }

std::string cpu_conv_algorithm_for(const at::Tensor& input, const at::Tensor& weight, c10::string_view transform,
                                   double alpha, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, int64_t groups, ConvPass pass) {
  const auto p = TiedConv2dParams::from_schema(transform, alpha, "identity", 1.0, stride, padding, dilation, groups);
  p.check(input, weight, std::nullopt);
  return algorithm_name(choose_algorithm(input, weight, p, pass));
}

}  // namespace fusedtie
