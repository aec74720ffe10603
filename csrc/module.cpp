// The Python module fusedtie._C. Importing it runs the static operator registrations of the other
// translation units; it also tells Python what was built and which transforms exist (read from
// transforms.h, so Python never keeps its own copy of that list). The only file with Python headers.
#include <torch/extension.h>

#include "cpu/conv_algorithm.h"
#include "cpu/transform_passes.h"
#include "transforms.h"

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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedtie operator library (registers torch.ops.fusedtie.*)";
  m.def("transforms", &transform_table, "The transform table: name, f, f', whether it takes alpha");
  m.def("cpu_transform_capability", [] { return std::string(fusedtie::cpu_transform_passes().capability); },
        "The instruction set of the CPU transform passes in use (DEFAULT, AVX2, AVX512)");
  m.def("set_cpu_conv_algorithm", &fusedtie::set_cpu_conv_algorithm, pybind11::arg("name"),
        "Set the CPU convolution algorithm (auto, library, gemm); returns the previous one");
  m.def("cpu_conv_algorithm", &fusedtie::cpu_conv_algorithm, "The CPU convolution algorithm setting");
#ifdef FUSEDTIE_WITH_CUDA
  m.attr("cuda_compiled") = true;
#else
  m.attr("cuda_compiled") = false;
#endif
}
