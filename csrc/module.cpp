// The Python module fusedtie._C. Importing it runs the static operator registrations of the other
// translation units; it also tells Python what was built and which transforms exist (read from
// transforms.h, so Python never keeps its own copy of that list). The only file with Python headers.
#include <torch/extension.h>

#include "conv_params.h"
#include "cpu/brgemm_conv2d.h"
#include "cpu/conv_algorithm.h"
#include "cpu/transform_passes.h"
#include "cuda_settings.h"
#include "fusedtie.h"
#include "transforms.h"
#include "user_transforms.h"

namespace {

pybind11::list transform_table() {
  pybind11::list rows;
  for (const auto& info : fusedtie::kTransforms) {
    pybind11::dict row;
    row["name"] = info.name;
    row["forward"] = info.forward;
    row["derivative"] = info.derivative;
    row["uses_alpha"] = info.uses_alpha;
    rows.append(row);
  }
  return rows;
}

// fusedtie::tied_conv2d called straight through the dispatcher, with the GIL released for the
// duration of the operator, as PyTorch's generated bindings do for its own ops. The layer uses it in
// plain eager calls; torch.ops.fusedtie.tied_conv2d stays the path for tracing, compiling and any
// __torch_function__ override (the Python side decides). The binding costs what F.conv2d does; the
// torch.ops call measurably more (docs/design.md, "Eager calls skip torch.ops").
at::Tensor tied_conv2d_eager(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             c10::string_view transform, double alpha, c10::string_view bias_transform,
                             double bias_alpha, std::vector<int64_t> stride, std::vector<int64_t> padding,
                             std::vector<int64_t> dilation, int64_t groups) {
  pybind11::gil_scoped_release no_gil;
  return fusedtie::ops::tied_conv2d(input, weight, bias, transform, alpha, bias_transform, bias_alpha, stride, padding,
                                    dilation, groups);
}

// fusedtie::tied_conv_transpose2d the same way (the decoder layer's eager calls).
at::Tensor tied_conv_transpose2d_eager(const at::Tensor& input, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, c10::string_view transform, double alpha,
                                       std::vector<int64_t> stride, std::vector<int64_t> padding,
                                       std::vector<int64_t> output_padding, std::vector<int64_t> dilation,
                                       int64_t groups) {
  pybind11::gil_scoped_release no_gil;
  return fusedtie::ops::tied_conv_transpose2d(input, weight, bias, transform, alpha, stride, padding, output_padding,
                                              dilation, groups);
}

// fusedtie::tied_conv3d the same way (FusedTiedConv3d's eager calls).
at::Tensor tied_conv3d_eager(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             c10::string_view transform, double alpha, c10::string_view bias_transform,
                             double bias_alpha, std::vector<int64_t> stride, std::vector<int64_t> padding,
                             std::vector<int64_t> dilation, int64_t groups) {
  pybind11::gil_scoped_release no_gil;
  return fusedtie::ops::tied_conv3d(input, weight, bias, transform, alpha, bias_transform, bias_alpha, stride, padding,
                                    dilation, groups);
}

pybind11::dict blas_assessment_dict(const fusedtie::BlasAssessment& a) {
  pybind11::dict d;
  d["vendor"] = a.vendor;
  d["model"] = a.model;
  d["blas"] = a.blas;
  d["gemm_under_auto"] = a.gemm_trusted;
  d["reason"] = a.reason;
  return d;
}

// A chain's stages arrive as (name, alpha) pairs of built-ins.
void register_chain(const std::string& name, const std::string& definition,
                    const std::vector<std::pair<std::string, double>>& stages) {
  std::vector<fusedtie::TransformSpec> parsed;
  for (const auto& [stage, alpha] : stages) parsed.push_back({fusedtie::parse_transform(stage), alpha});
  fusedtie::register_chain_transform(name, definition, parsed);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedtie operator library (registers torch.ops.fusedtie.*)";
  m.def("transforms", &transform_table, "The transform table: name, f, f', whether it takes alpha");
  m.def(
      "cpu_transform_capability", [] { return std::string(fusedtie::cpu_transform_passes().capability); },
      "The instruction set of the CPU transform passes in use (DEFAULT, AVX2, AVX512)");
  m.def("tied_conv2d_eager", &tied_conv2d_eager,
        "fusedtie::tied_conv2d through the dispatcher with the GIL released (eager calls only)");
  m.def("tied_conv_transpose2d_eager", &tied_conv_transpose2d_eager,
        "fusedtie::tied_conv_transpose2d through the dispatcher with the GIL released (eager calls only)");
  m.def("tied_conv3d_eager", &tied_conv3d_eager,
        "fusedtie::tied_conv3d through the dispatcher with the GIL released (eager calls only)");
  m.def("set_cpu_conv_algorithm", &fusedtie::set_cpu_conv_algorithm, pybind11::arg("name"),
        "Set the CPU convolution algorithm (auto, library, gemm, depthwise); returns the previous one");
  m.def("cpu_conv_algorithm", &fusedtie::cpu_conv_algorithm, "The CPU convolution algorithm setting");
  m.def(
      "cpu_conv_algorithm_for",
      [](const at::Tensor& input, const at::Tensor& weight, const std::string& transform, double alpha,
         std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
         bool backward, bool input_gradient) {
        const auto pass = !backward        ? fusedtie::ConvPass::kForward
                          : input_gradient ? fusedtie::ConvPass::kBackward
                                           : fusedtie::ConvPass::kWeightBackward;
        return fusedtie::cpu_conv_algorithm_for(input, weight, transform, alpha, stride, padding, dilation, groups,
                                                pass);
      },
      pybind11::arg("input"), pybind11::arg("weight"), pybind11::arg("transform"), pybind11::arg("alpha"),
      pybind11::arg("stride"), pybind11::arg("padding"), pybind11::arg("dilation"), pybind11::arg("groups"),
      pybind11::arg("backward"), pybind11::arg("input_gradient"),
      "The CPU algorithm tied_conv2d runs for this call's forward (or backward) under the current setting");
  m.def(
      "assess_gemm_blas",
      [](const std::string& vendor, const std::string& model, bool has_mkl, const std::string& enable_instructions,
         const std::string& cbwr) {
        return blas_assessment_dict(fusedtie::assess_gemm_blas(vendor, model, has_mkl, enable_instructions, cbwr));
      },
      "auto's rule for the GEMM path, given a CPU vendor, model, BLAS and MKL's environment (for tests)");
  m.def(
      "gemm_blas_assessment", [] { return blas_assessment_dict(fusedtie::gemm_blas_assessment()); },
      "auto's rule for the GEMM path as this process applies it");
  m.def("brgemm_micro_kernel_available", &fusedtie::brgemm_micro_kernel_available,
        "Whether oneDNN's brgemm micro-kernel runs the brgemm path here (else a BLAS call per tile)");
  m.def("set_cuda_conv_algorithm", &fusedtie::set_cuda_conv_algorithm, pybind11::arg("name"),
        "Set the CUDA convolution algorithm (auto, autotune, fused, library); returns the previous one");
  m.def("cuda_conv_algorithm", &fusedtie::cuda_conv_algorithm, "The CUDA convolution algorithm setting");
  m.def("clear_cuda_autotune_cache", &fusedtie::clear_autotune_cache,
        "Forget every choice the CUDA autotune mode has made");
  m.def("cuda_autotune_cache_size", &fusedtie::autotune_cache_size,
        "How many (convolution, pass) choices the CUDA autotune mode has cached");
  // User transforms (csrc/user_transforms.h); fusedtie/_catalog.py is the only caller.
  m.def("_check_user_transform", &fusedtie::check_user_transform, pybind11::arg("name"), pybind11::arg("definition"),
        "ValueError if name cannot be defined as definition; whether it already is");
  m.def("_register_compiled_transform", &fusedtie::register_compiled_transform, pybind11::arg("name"),
        pybind11::arg("definition"), pybind11::arg("library_path"), pybind11::arg("params"),
        "Register the user transform compiled into library_path, with its parameter values");
  m.def("_register_chain_transform", &register_chain, pybind11::arg("name"), pybind11::arg("definition"),
        pybind11::arg("stages"), "Register a chain of built-in transforms, given as (name, alpha) pairs");
  m.def("_unregister_user_transform", &fusedtie::unregister_user_transform, pybind11::arg("name"),
        "Unbind a user transform's name (its creation failed after registering it)");
#ifdef FUSEDTIE_WITH_CUDA
  m.attr("cuda_compiled") = true;
#else
  m.attr("cuda_compiled") = false;
#endif
}
