// Autograd for the fusedtie operators, registered under the Autograd key for every backend.
//
// It lives in C++ rather than in Python (torch.library.register_autograd) because the Python
// wrapper costs about 140 us per forward call in grad mode on the project's CPU machine (measured:
// 166 us against 26 us for nn.Conv2d on a tiny input) — 5-15% of a batch-1 ResNet convolution on
// the CPU, and more than the whole kernel on a GPU. The formula is the same as it would be in
// Python: save input and the *source* weight and bias (save_for_backward semantics, so in-place
// changes between forward and backward raise), and call the one backward operator, which does
// the convolution gradients and the chain rule f'(W) * dL/df(W) itself.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "op_calls.h"

namespace fusedtie {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<at::Tensor>;
using GradTriple = std::tuple<OptionalTensor, OptionalTensor, OptionalTensor>;

// The non-tensor arguments of tied_conv2d and its backward, carried between them as one value.
struct ConvArgs {
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
    return {d["transform"].toStringRef(), d["alpha"].toDouble(), d["bias_transform"].toStringRef(),
            d["bias_alpha"].toDouble(),   d["stride"].toIntVector(), d["padding"].toIntVector(),
            d["dilation"].toIntVector(),  d["groups"].toInt()};
  }
};

at::Tensor tied_conv2d_op(const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias,
                          const ConvArgs& a) {
  return call_tied_conv2d(input, weight, bias, a.transform, a.alpha, a.bias_transform, a.bias_alpha,
                          a.stride, a.padding, a.dilation, a.groups);
}

GradTriple tied_conv2d_backward_op(const at::Tensor& grad_output, const at::Tensor& input,
                                   const at::Tensor& weight, const OptionalTensor& bias,
                                   const ConvArgs& a, std::array<bool, 3> output_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fusedtie::_tied_conv2d_backward", "")
                       .typed<GradTriple(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const OptionalTensor&, c10::string_view, double,
                                         c10::string_view, double, at::IntArrayRef, at::IntArrayRef,
                                         at::IntArrayRef, int64_t, std::array<bool, 3>)>();
  return op.call(grad_output, input, weight, bias, a.transform, a.alpha, a.bias_transform, a.bias_alpha,
                 a.stride, a.padding, a.dilation, a.groups, output_mask);
}

at::Tensor transform_op(const at::Tensor& source, c10::string_view name, double alpha) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fusedtie::transform", "")
                       .typed<at::Tensor(const at::Tensor&, c10::string_view, double)>();
  return op.call(source, name, alpha);
}

at::Tensor transform_backward_op(const at::Tensor& grad, const at::Tensor& source, c10::string_view name,
                                 double alpha) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fusedtie::_transform_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, double)>();
  return op.call(grad, source, name, alpha);
}

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

class TiedConv2dFunction : public torch::autograd::Function<TiedConv2dFunction> {
 public:
  static Variable forward(AutogradContext* ctx, const Variable& input, const Variable& weight,
                          const OptionalTensor& bias, const ConvArgs& args) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({input, weight, or_undefined(bias)});
    args.save(ctx);
    return tied_conv2d_op(input, weight, bias, args);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const OptionalTensor bias = saved[2].defined() ? OptionalTensor(saved[2]) : std::nullopt;
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   bias.has_value() && ctx->needs_input_grad(2)};
    // Through the dispatcher with autograd, so that a create_graph=True backward records the
    // backward operator's own (refusing) autograd node instead of silently detached gradients.
    auto [grad_input, grad_weight, grad_bias] =
        tied_conv2d_backward_op(grad_outputs[0], saved[0], saved[1], bias, ConvArgs::load(ctx), mask);
    return {or_undefined(grad_input), or_undefined(grad_weight), or_undefined(grad_bias), Variable()};
  }
};

// Marks the results of a backward operator as not differentiable again: a second backward through
// them raises instead of returning silent zeros.
[[noreturn]] void refuse_double_backward(const char* op) {
  TORCH_CHECK(false, "fusedtie: double backward through ", op,
              " is not supported (a gradient of a gradient, e.g. torch.autograd.grad(..., "
              "create_graph=True) followed by another backward). Use F.conv2d(x, f(w)) for "
              "second-order gradients.");
}

class TiedConv2dBackwardFunction : public torch::autograd::Function<TiedConv2dBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Variable& grad_output, const Variable& input,
                               const Variable& weight, const OptionalTensor& bias, const ConvArgs& args,
                               std::array<bool, 3> mask) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [gi, gw, gb] = tied_conv2d_backward_op(grad_output, input, weight, bias, args, mask);
    // A custom function's outputs must be defined: return the requested gradients only, in order.
    variable_list requested;
    for (const OptionalTensor& g : {gi, gw, gb}) {
      if (g.has_value()) requested.push_back(*g);
    }
    return requested;
  }
  static variable_list backward(AutogradContext*, variable_list) {
    refuse_double_backward("fusedtie::tied_conv2d");
  }
};

class TransformFunction : public torch::autograd::Function<TransformFunction> {
 public:
  static Variable forward(AutogradContext* ctx, const Variable& source, const std::string& name,
                          double alpha) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({source});
    ctx->saved_data["transform"] = name;
    ctx->saved_data["alpha"] = alpha;
    return transform_op(source, name, alpha);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    return {transform_backward_op(grad_outputs[0], saved[0], ctx->saved_data["transform"].toStringRef(),
                                  ctx->saved_data["alpha"].toDouble()),
            Variable(), Variable()};
  }
};

class TransformBackwardFunction : public torch::autograd::Function<TransformBackwardFunction> {
 public:
  static Variable forward(AutogradContext*, const Variable& grad, const Variable& source,
                          const std::string& name, double alpha) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return transform_backward_op(grad, source, name, alpha);
  }
  static variable_list backward(AutogradContext*, variable_list) {
    refuse_double_backward("fusedtie::transform");
  }
};

ConvArgs make_args(c10::string_view transform, double alpha, c10::string_view bias_transform,
                   double bias_alpha, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation, int64_t groups) {
  return {std::string(transform), alpha, std::string(bias_transform), bias_alpha, stride.vec(),
          padding.vec(), dilation.vec(), groups};
}

at::Tensor tied_conv2d_autograd(const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias,
                                c10::string_view transform, double alpha, c10::string_view bias_transform,
                                double bias_alpha, at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, int64_t groups) {
  const ConvArgs args =
      make_args(transform, alpha, bias_transform, bias_alpha, stride, padding, dilation, groups);
  if (!records_graph(input, weight, bias)) {  // inference: no node, no context, no saved tensors
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return tied_conv2d_op(input, weight, bias, args);
  }
  return TiedConv2dFunction::apply(input, weight, bias, args);
}

GradTriple tied_conv2d_backward_autograd(const at::Tensor& grad_output, const at::Tensor& input,
                                         const at::Tensor& weight, const OptionalTensor& bias,
                                         c10::string_view transform, double alpha,
                                         c10::string_view bias_transform, double bias_alpha,
                                         at::IntArrayRef stride, at::IntArrayRef padding,
                                         at::IntArrayRef dilation, int64_t groups,
                                         std::array<bool, 3> output_mask) {
  if (!records_graph(grad_output, input, weight, bias)) {
    // The usual case, a backward pass without create_graph: nothing to refuse later (the saved
    // node was measurable on the 0.3 ms depthwise convolutions of the benchmark).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return tied_conv2d_backward_op(
        grad_output, input, weight, bias,
        make_args(transform, alpha, bias_transform, bias_alpha, stride, padding, dilation, groups),
        output_mask);
  }
  auto grads = TiedConv2dBackwardFunction::apply(
      grad_output, input, weight, bias,
      make_args(transform, alpha, bias_transform, bias_alpha, stride, padding, dilation, groups),
      output_mask);
  size_t next = 0;
  auto take = [&](int i) { return output_mask[i] ? OptionalTensor(grads.at(next++)) : std::nullopt; };
  auto grad_input = take(0);
  auto grad_weight = take(1);
  auto grad_bias = take(2);
  return {grad_input, grad_weight, grad_bias};
}

at::Tensor transform_autograd(const at::Tensor& source, c10::string_view name, double alpha) {
  return TransformFunction::apply(source, std::string(name), alpha);
}

at::Tensor transform_backward_autograd(const at::Tensor& grad, const at::Tensor& source,
                                       c10::string_view name, double alpha) {
  if (!records_graph(grad, source)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return transform_backward_op(grad, source, name, alpha);
  }
  return TransformBackwardFunction::apply(grad, source, std::string(name), alpha);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtie, Autograd, m) {
  m.impl("tied_conv2d", &tied_conv2d_autograd);
  m.impl("_tied_conv2d_backward", &tied_conv2d_backward_autograd);
  m.impl("transform", &transform_autograd);
  m.impl("_transform_backward", &transform_backward_autograd);
}

}  // namespace fusedtie
