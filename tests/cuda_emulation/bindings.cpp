// Python bindings of the emulated fused CUDA path (tests/test_cuda_emulation.py builds them with
// torch.utils.cpp_extension.load). Each entry point takes the operator's own schema arguments,
// validates them with the operator's own checks, and calls the fused host code of
// csrc/cuda/fused_conv2d.cu exactly as the CUDA dispatchers do when they choose "fused", on CPU
// tensors: the tensor-core kernels where the host code picks them (float16/bfloat16, and float32
// when torch.backends.cudnn.allow_tf32 is set, with aligned channel counts), the CUDA-core ones
// elsewhere. Test only.
#define FUSEDTIE_CUDA_EMULATION
#include <torch/extension.h>

#include "../../csrc/conv_params.h"
#include "../../csrc/conv_transpose_params.h"
#include "../../csrc/cuda/cuda_emulation.h"
#include "../../csrc/cuda/fused_conv2d.h"

namespace fusedtie {

// The operator library's registry of user transforms is not linked in: built-ins only.
std::optional<TransformKind> find_user_transform(c10::string_view) { return std::nullopt; }
std::vector<std::string> user_transform_names() { return {}; }

}  // namespace fusedtie

namespace {

using fusedtie::TiedConv2dParams;
using fusedtie::TiedConvTranspose2dParams;

TiedConv2dParams conv_params(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const std::string& transform, double alpha, const std::string& bias_transform,
                             double bias_alpha, std::vector<int64_t> stride, std::vector<int64_t> padding,
                             std::vector<int64_t> dilation, int64_t groups) {
  auto p =
      TiedConv2dParams::from_schema(transform, alpha, bias_transform, bias_alpha, stride, padding, dilation, groups);
  p.check(input, weight, bias);
  TORCH_CHECK(fusedtie::cuda::fused_supports(input, weight, p), "the fused kernels do not support this call");
  return p;
}

TiedConvTranspose2dParams transpose_params(const at::Tensor& input, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias, const std::string& transform,
                                           double alpha, std::vector<int64_t> stride, std::vector<int64_t> padding,
                                           std::vector<int64_t> output_padding, std::vector<int64_t> dilation,
                                           int64_t groups) {
  auto p = TiedConvTranspose2dParams::from_schema(transform, alpha, stride, padding, output_padding, dilation, groups);
  p.check(input, weight, bias);
  return p;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedtie's fused CUDA-core kernels and their host code, run by a CPU emulation of CUDA (tests only)";
  m.def(
      "set_multiprocessors", [](int64_t count) { fusedtie::cuda::emulation::emulated_multiprocessors = count; },
      "The multiprocessor count the host code sees (it sizes the weight gradient's split)");
  m.def(
      "mma_supports",
      [](const at::Tensor& input, const at::Tensor& weight, std::vector<int64_t> stride, int64_t groups,
         bool input_grad) {
        TiedConv2dParams p;
        p.stride = {stride[0], stride[1]};
        p.groups = groups;
        return fusedtie::cuda::mma_supports(input, weight, p, input_grad);
      },
      "Whether the host code runs this pass on the tensor-core kernels");
  m.def("conv_forward",
        [](const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
           const std::string& transform, double alpha, const std::string& bias_transform, double bias_alpha,
           std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups) {
          const auto p = conv_params(input, weight, bias, transform, alpha, bias_transform, bias_alpha, stride, padding,
                                     dilation, groups);
          return fusedtie::cuda::fused_forward(input, weight, bias, p);
        });
  // (dL/dx, dL/dW_src, dL/d g(b)): the bias chain rule is the dispatcher's elementwise kernel, not
  // the fused kernels', so the bias gradient here is the one before it.
  m.def("conv_backward", [](const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const std::string& transform, double alpha,
                            const std::string& bias_transform, double bias_alpha, std::vector<int64_t> stride,
                            std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups) {
    const auto p = conv_params(input, weight, bias, transform, alpha, bias_transform, bias_alpha, stride, padding,
                               dilation, groups);
    const at::Tensor grad_input = fusedtie::cuda::fused_input_grad(grad_output, input, weight, p);
    auto [grad_weight, grad_bias] =
        fusedtie::cuda::fused_weight_and_bias_grad(grad_output, input, weight, p, true, bias.has_value());
    return std::make_tuple(grad_input, grad_weight, grad_bias);
  });
  m.def("transpose_supported", [](const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const std::string& transform, double alpha,
                                  std::vector<int64_t> stride, std::vector<int64_t> padding,
                                  std::vector<int64_t> output_padding, std::vector<int64_t> dilation, int64_t groups) {
    const auto p =
        transpose_params(input, weight, bias, transform, alpha, stride, padding, output_padding, dilation, groups);
    return fusedtie::cuda::fused_transpose_supports(input, weight, p);
  });
  m.def("transpose_forward", [](const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const std::string& transform, double alpha,
                                std::vector<int64_t> stride, std::vector<int64_t> padding,
                                std::vector<int64_t> output_padding, std::vector<int64_t> dilation, int64_t groups) {
    const auto p =
        transpose_params(input, weight, bias, transform, alpha, stride, padding, output_padding, dilation, groups);
    TORCH_CHECK(fusedtie::cuda::fused_transpose_supports(input, weight, p),
                "the fused kernels do not support this call");
    return fusedtie::cuda::fused_transpose_forward(input, weight, bias, p);
  });
  // (dL/dx, dL/dW_src); the bias gradient is dy summed per channel by the dispatcher.
  m.def("transpose_backward",
        [](const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
           const std::string& transform, double alpha, std::vector<int64_t> stride, std::vector<int64_t> padding,
           std::vector<int64_t> output_padding, std::vector<int64_t> dilation, int64_t groups) {
          const auto p = transpose_params(input, weight, std::nullopt, transform, alpha, stride, padding,
                                          output_padding, dilation, groups);
          TORCH_CHECK(fusedtie::cuda::fused_transpose_supports(input, weight, p),
                      "the fused kernels do not support this call");
          return std::make_tuple(fusedtie::cuda::fused_transpose_input_grad(grad_output, input, weight, p),
                                 fusedtie::cuda::fused_transpose_weight_grad(grad_output, input, weight, p));
        });
}
