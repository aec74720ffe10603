// Autograd for the fusedtie operators, registered under the Autograd key for every backend: one
// pair of autograd functions for every convolution operator (tied_conv2d, tied_conv3d,
// tied_conv_transpose2d).
//
// It lives in C++ rather than in Python (torch.library.register_autograd) because the Python
// wrapper's per-call cost is a visible share of a small convolution (figures in docs/design.md,
// "Autograd is registered in C++"). The formula is the same as it would be in
// Python: save input and the *source* weight and bias (save_for_backward semantics, so in-place
// changes between forward and backward raise), and call the one backward operator, which does
// the convolution gradients and the chain rule f'(W) * dL/df(W) itself.
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "fusedtie.h"

namespace fusedtie {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

// The non-tensor arguments of one convolution operator and its backward, carried between them as
// one value, with the two operator calls they complete. Each provides save/load (the autograd
// context), forward(input, weight, bias), backward(grad_output, input, weight, bias, output_mask),
// kOpName and kUnfusedRecipe (named in the double-backward error); the autograd functions below
// are written once for every operator.
// tied_conv2d's (kRank 2) and tied_conv3d's (kRank 3): the same arguments, one rank apart.
template <int kRank>
struct ConvArgs {
  static_assert(kRank == 2 || kRank == 3);
  static constexpr const char* kOpName = kRank == 2 ? "fusedtie::tied_conv2d" : "fusedtie::tied_conv3d";
  static constexpr const char* kUnfusedRecipe = kRank == 2 ? "F.conv2d(x, f(w))" : "F.conv3d(x, f(w))";
  static constexpr auto& kForward = kRank == 2 ? ops::tied_conv2d : ops::tied_conv3d;
  static constexpr auto& kBackward = kRank == 2 ? ops::_tied_conv2d_backward : ops::_tied_conv3d_backward;
  std::string transform;
  double alpha;
  std::string bias_transform;
  double bias_alpha;
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;

  void save(AutogradContext* ctx) const {
    ctx->saved_data["transform"] = transform;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["bias_transform"] = bias_transform;
    ctx->saved_data["bias_alpha"] = bias_alpha;
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
  }
  static ConvArgs load(AutogradContext* ctx) {
    auto& d = ctx->saved_data;
    return {d["transform"].toStringRef(), d["alpha"].toDouble(),     d["bias_transform"].toStringRef(),
            d["bias_alpha"].toDouble(),   d["stride"].toIntVector(), d["padding"].toIntVector(),
            d["dilation"].toIntVector(),  d["groups"].toInt()};
  }
  at::Tensor forward(const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias) const {
    return kForward(input, weight, bias, transform, alpha, bias_transform, bias_alpha, stride, padding, dilation,
                    groups);
  }
  OptionalGradients backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                             const OptionalTensor& bias, std::array<bool, 3> output_mask) const {
    return kBackward(grad_output, input, weight, bias, transform, alpha, bias_transform, bias_alpha, stride, padding,
                     dilation, groups, output_mask);
  }
};

// tied_conv_transpose2d's: the bias is the decoder's own, so no bias transform.
struct ConvTranspose2dArgs {
  static constexpr const char* kOpName = "fusedtie::tied_conv_transpose2d";
  static constexpr const char* kUnfusedRecipe = "F.conv_transpose2d(x, f(w))";
  std::string transform;
  double alpha;
  std::vector<int64_t> stride, padding, output_padding, dilation;
  int64_t groups;

  void save(AutogradContext* ctx) const {
    ctx->saved_data["transform"] = transform;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["output_padding"] = output_padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
  }
  static ConvTranspose2dArgs load(AutogradContext* ctx) {
    auto& d = ctx->saved_data;
    return {d["transform"].toStringRef(),
            d["alpha"].toDouble(),
            d["stride"].toIntVector(),
            d["padding"].toIntVector(),
            d["output_padding"].toIntVector(),
            d["dilation"].toIntVector(),
            d["groups"].toInt()};
  }
  at::Tensor forward(const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias) const {
    return ops::tied_conv_transpose2d(input, weight, bias, transform, alpha, stride, padding, output_padding, dilation,
                                      groups);
  }
  OptionalGradients backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                             const OptionalTensor& bias, std::array<bool, 3> output_mask) const {
    return ops::_tied_conv_transpose2d_backward(grad_output, input, weight, bias, transform, alpha, stride, padding,
                                                output_padding, dilation, groups, output_mask);
  }
};

Variable or_undefined(const OptionalTensor& t) { return t.has_value() ? *t : Variable(); }

bool requires_grad(const at::Tensor& t) { return t.requires_grad(); }
bool requires_grad(const OptionalTensor& t) { return t.has_value() && t->requires_grad(); }

// Whether a call with these tensor arguments records an autograd node. When it does not (inference,
// or a backward pass without create_graph), the kernels below skip Function::apply altogether: it
// allocates a node and a context and wraps the outputs even when nothing is recorded.
template <typename... Tensors>
bool records_graph(const Tensors&... tensors) {
  return torch::autograd::GradMode::is_enabled() && (requires_grad(tensors) || ...);
}

template <typename Args>
class TiedConvFunction : public torch::autograd::Function<TiedConvFunction<Args>> {
 public:
  static Variable forward(AutogradContext* ctx, const Variable& input, const Variable& weight,
                          const OptionalTensor& bias, const Args& args) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({input, weight, or_undefined(bias)});
    args.save(ctx);
    return args.forward(input, weight, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const OptionalTensor bias = saved[2].defined() ? OptionalTensor(saved[2]) : std::nullopt;
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   bias.has_value() && ctx->needs_input_grad(2)};
    // Through the dispatcher with autograd, so that a create_graph=True backward records the
    // backward operator's own (refusing) autograd node instead of silently detached gradients.
    auto [grad_input, grad_weight, grad_bias] =
        Args::load(ctx).backward(grad_outputs[0], saved[0], saved[1], bias, mask);
    return {or_undefined(grad_input), or_undefined(grad_weight), or_undefined(grad_bias), Variable()};
  }
};

// Marks the results of a backward operator as not differentiable again: a second backward through
// them raises instead of returning silent zeros.
[[noreturn]] void refuse_double_backward(const char* op, const char* unfused_recipe = "F.conv2d(x, f(w))") {
  TORCH_CHECK(false, "fusedtie: double backward through ", op,
              " is not supported (a gradient of a gradient, e.g. torch.autograd.grad(..., "
              "create_graph=True) followed by another backward). Use ",
              unfused_recipe,
              " for "
              "second-order gradients.");
}

template <typename Args>
class TiedConvBackwardFunction : public torch::autograd::Function<TiedConvBackwardFunction<Args>> {
 public:
  static variable_list forward(AutogradContext* ctx, const Variable& grad_output, const Variable& input,
                               const Variable& weight, const OptionalTensor& bias, const Args& args,
                               std::array<bool, 3> mask) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [gi, gw, gb] = args.backward(grad_output, input, weight, bias, mask);
    // A custom function's outputs must be defined: return the requested gradients only, in order.
    variable_list requested;
    for (const OptionalTensor& g : {gi, gw, gb}) {
      if (g.has_value()) requested.push_back(*g);
    }
    return requested;
  }
  static variable_list backward(AutogradContext*, variable_list) {
    refuse_double_backward(Args::kOpName, Args::kUnfusedRecipe);
  }
};

// The Autograd kernel of a convolution operator, given its arguments.
template <typename Args>
at::Tensor tied_conv_autograd(const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias,
                              const Args& args) {
  if (!records_graph(input, weight, bias)) {  // inference: no node, no context, no saved tensors
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return args.forward(input, weight, bias);
  }
  return TiedConvFunction<Args>::apply(input, weight, bias, args);
}

// The Autograd kernel of its backward operator.
template <typename Args>
OptionalGradients tied_conv_backward_autograd(const at::Tensor& grad_output, const at::Tensor& input,
                                              const at::Tensor& weight, const OptionalTensor& bias, const Args& args,
                                              std::array<bool, 3> output_mask) {
  if (!records_graph(grad_output, input, weight, bias)) {
    // The usual case, a backward pass without create_graph: nothing to refuse later (the saved
    // node was measurable on the 0.3 ms depthwise convolutions of the benchmark).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return args.backward(grad_output, input, weight, bias, output_mask);
  }
  auto grads = TiedConvBackwardFunction<Args>::apply(grad_output, input, weight, bias, args, output_mask);
  size_t next = 0;
  auto take = [&](int i) { return output_mask[i] ? OptionalTensor(grads.at(next++)) : std::nullopt; };
  auto grad_input = take(0);
  auto grad_weight = take(1);
  auto grad_bias = take(2);
  return {grad_input, grad_weight, grad_bias};
}

class TransformFunction : public torch::autograd::Function<TransformFunction> {
 public:
  static Variable forward(AutogradContext* ctx, const Variable& source, const std::string& name, double alpha) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({source});
    ctx->saved_data["transform"] = name;
    ctx->saved_data["alpha"] = alpha;
    return ops::transform(source, name, alpha);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    return {ops::_transform_backward(grad_outputs[0], saved[0], ctx->saved_data["transform"].toStringRef(),
                                     ctx->saved_data["alpha"].toDouble()),
            Variable(), Variable()};
  }
};

class TransformBackwardFunction : public torch::autograd::Function<TransformBackwardFunction> {
 public:
  static Variable forward(AutogradContext*, const Variable& grad, const Variable& source, const std::string& name,
                          double alpha) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ops::_transform_backward(grad, source, name, alpha);
  }
  static variable_list backward(AutogradContext*, variable_list) { refuse_double_backward("fusedtie::transform"); }
};

template <int kRank>
ConvArgs<kRank> conv_args(c10::string_view transform, double alpha, c10::string_view bias_transform, double bias_alpha,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return {std::string(transform), alpha, std::string(bias_transform), bias_alpha, stride.vec(), padding.vec(),
          dilation.vec(),         groups};
}

ConvTranspose2dArgs conv_transpose2d_args(c10::string_view transform, double alpha, at::IntArrayRef stride,
                                          at::IntArrayRef padding, at::IntArrayRef output_padding,
                                          at::IntArrayRef dilation, int64_t groups) {
  return {std::string(transform), alpha, stride.vec(), padding.vec(), output_padding.vec(), dilation.vec(), groups};
}

// tied_conv2d's (kRank 2) and tied_conv3d's (kRank 3) Autograd kernels.
template <int kRank>
at::Tensor tied_conv_nd_autograd(const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias,
                                 c10::string_view transform, double alpha, c10::string_view bias_transform,
                                 double bias_alpha, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t groups) {
  return tied_conv_autograd(
      input, weight, bias,
      conv_args<kRank>(transform, alpha, bias_transform, bias_alpha, stride, padding, dilation, groups));
}

template <int kRank>
OptionalGradients tied_conv_nd_backward_autograd(const at::Tensor& grad_output, const at::Tensor& input,
                                                 const at::Tensor& weight, const OptionalTensor& bias,
                                                 c10::string_view transform, double alpha,
                                                 c10::string_view bias_transform, double bias_alpha,
                                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                                 at::IntArrayRef dilation, int64_t groups,
                                                 std::array<bool, 3> output_mask) {
  return tied_conv_backward_autograd(
      grad_output, input, weight, bias,
      conv_args<kRank>(transform, alpha, bias_transform, bias_alpha, stride, padding, dilation, groups), output_mask);
}

at::Tensor tied_conv_transpose2d_autograd(const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias,
                                          c10::string_view transform, double alpha, at::IntArrayRef stride,
                                          at::IntArrayRef padding, at::IntArrayRef output_padding,
                                          at::IntArrayRef dilation, int64_t groups) {
  return tied_conv_autograd(input, weight, bias,
                            conv_transpose2d_args(transform, alpha, stride, padding, output_padding, dilation, groups));
}

OptionalGradients tied_conv_transpose2d_backward_autograd(const at::Tensor& grad_output, const at::Tensor& input,
                                                          const at::Tensor& weight, const OptionalTensor& bias,
                                                          c10::string_view transform, double alpha,
                                                          at::IntArrayRef stride, at::IntArrayRef padding,
                                                          at::IntArrayRef output_padding, at::IntArrayRef dilation,
                                                          int64_t groups, std::array<bool, 3> output_mask) {
  return tied_conv_backward_autograd(
      grad_output, input, weight, bias,
      conv_transpose2d_args(transform, alpha, stride, padding, output_padding, dilation, groups), output_mask);
}

at::Tensor transform_autograd(const at::Tensor& source, c10::string_view name, double alpha) {
  return TransformFunction::apply(source, std::string(name), alpha);
}

at::Tensor transform_backward_autograd(const at::Tensor& grad, const at::Tensor& source, c10::string_view name,
                                       double alpha) {
  if (!records_graph(grad, source)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ops::_transform_backward(grad, source, name, alpha);
  }
  return TransformBackwardFunction::apply(grad, source, std::string(name), alpha);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtie, Autograd, m) {
  register_kernel<ops::tied_conv2d>(m, "tied_conv2d", &tied_conv_nd_autograd<2>);
  register_kernel<ops::_tied_conv2d_backward>(m, "_tied_conv2d_backward", &tied_conv_nd_backward_autograd<2>);
  register_kernel<ops::tied_conv3d>(m, "tied_conv3d", &tied_conv_nd_autograd<3>);
  register_kernel<ops::_tied_conv3d_backward>(m, "_tied_conv3d_backward", &tied_conv_nd_backward_autograd<3>);
  register_kernel<ops::tied_conv_transpose2d>(m, "tied_conv_transpose2d", &tied_conv_transpose2d_autograd);
  register_kernel<ops::_tied_conv_transpose2d_backward>(m, "_tied_conv_transpose2d_backward",
                                                        &tied_conv_transpose2d_backward_autograd);
  register_kernel<ops::transform>(m, "transform", &transform_autograd);
  register_kernel<ops::_transform_backward>(m, "_transform_backward", &transform_backward_autograd);
}

}  // namespace fusedtie
