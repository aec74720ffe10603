// C++ test of the fusedtie operators as a libtorch user sees them: looked up by name through the
// dispatcher (so it tests the registrations, not our functions) and compared, in float64, against
// at::conv2d(x, f(w), g(b)) with f and g written in ATen ops and gradients taken by autograd. No test
// framework: one line per check, then "N passed, M failed"; the exit status is 1 if any check failed.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdio>
#include <functional>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace {

using TiedConv2dFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                c10::string_view, double, c10::string_view, double, at::IntArrayRef, at::IntArrayRef,
                                at::IntArrayRef, int64_t);
using OptionalGrads = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>;
using BackwardFn = OptionalGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const std::optional<at::Tensor>&, c10::string_view, double, c10::string_view, double,
                                 at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, std::array<bool, 3>);

c10::TypedOperatorHandle<TiedConv2dFn> tied_conv2d_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("fusedtie::tied_conv2d", "").typed<TiedConv2dFn>();
}
c10::TypedOperatorHandle<BackwardFn> backward_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("fusedtie::_tied_conv2d_backward", "").typed<BackwardFn>();
}

// f written in ATen ops: the reference never touches transforms.h.
at::Tensor reference_f(const std::string& name, const at::Tensor& w, double alpha) {
  if (name == "identity") return w;
  if (name == "square") return w * w;
  if (name == "abs") return at::abs(w);
  if (name == "neg") return -w;
  if (name == "scale") return w * alpha;
  if (name == "exp") return at::exp(w);
  if (name == "sigmoid") return at::sigmoid(w);
  if (name == "tanh") return at::tanh(w);
  if (name == "softplus") return at::softplus(w, /*beta=*/1, /*threshold=*/20);
  if (name == "relu") return at::relu(w);
  TORCH_CHECK(false, "test has no reference for transform ", name);
}

struct Case {
  std::string name;
  std::string transform;
  double alpha = 1.0;
  bool with_bias = false;
  std::string bias_transform = "identity";
  double bias_alpha = 1.0;
  std::vector<int64_t> input_size{2, 4, 9, 8};   // N, C, H, W
  std::vector<int64_t> weight_size{6, 4, 3, 3};  // out, in/groups, kH, kW
  std::vector<int64_t> stride{1, 1};
  std::vector<int64_t> padding{1, 1, 1, 1};  // top, bottom, left, right
  std::vector<int64_t> dilation{1, 1};
  int64_t groups = 1;
  bool channels_last = false;
};

struct Inputs {
  at::Tensor x, w;
  std::optional<at::Tensor> b;
};

Inputs make_inputs(const Case& c) {
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  Inputs in{at::randn(c.input_size, opts), at::randn(c.weight_size, opts), std::nullopt};
  if (c.channels_last) {
    in.x = in.x.contiguous(at::MemoryFormat::ChannelsLast);
    in.w = in.w.contiguous(at::MemoryFormat::ChannelsLast);
  }
  if (c.with_bias) in.b = at::randn({c.weight_size[0]}, opts);
  return in;
}

// The reference forward. Asymmetric padding is applied by constant_pad_nd, whose order is
// (left, right, top, bottom); symmetric padding goes to conv2d itself.
at::Tensor reference_forward(const Case& c, const at::Tensor& x, const at::Tensor& w,
                             const std::optional<at::Tensor>& b) {
  const auto& p = c.padding;
  std::optional<at::Tensor> derived_bias;
  if (b) derived_bias = reference_f(c.bias_transform, *b, c.bias_alpha);
  const at::Tensor derived_weight = reference_f(c.transform, w, c.alpha);
  // Named arrays, not braced lists: {0, 0} would also match conv2d's string padding overload.
  if (p[0] == p[1] && p[2] == p[3]) {
    const std::array<int64_t, 2> symmetric{p[0], p[2]};
    return at::conv2d(x, derived_weight, derived_bias, c.stride, symmetric, c.dilation, c.groups);
  }
  const std::array<int64_t, 2> none{0, 0};
  return at::conv2d(at::constant_pad_nd(x, {p[2], p[3], p[0], p[1]}, 0), derived_weight, derived_bias, c.stride, none,
                    c.dilation, c.groups);
}

at::Tensor call_forward(const Case& c, const Inputs& in) {
  return tied_conv2d_op().call(in.x, in.w, in.b, c.transform, c.alpha, c.bias_transform, c.bias_alpha, c.stride,
                               c.padding, c.dilation, c.groups);
}

// Empty when `actual` matches `expected` in float64, else what differs.
std::string compare(const char* what, const at::Tensor& actual, const at::Tensor& expected) {
  std::ostringstream out;
  if (actual.scalar_type() != at::kDouble) {
    out << what << " has dtype " << actual.scalar_type() << ", expected Double";
  } else if (actual.sizes() != expected.sizes()) {
    out << what << " has size " << actual.sizes() << ", expected " << expected.sizes();
  } else if (!at::allclose(actual, expected, /*rtol=*/1e-10, /*atol=*/1e-12)) {
    out << what << " differs, max abs error " << (actual - expected).abs().max().item<double>();
  }
  return out.str();
}

int passed = 0;
int failed = 0;

// Runs one check: `body` returns an empty string on success or what went wrong; any exception fails.
void check(const std::string& name, const std::function<std::string()>& body) {
  std::string problem;
  try {
    problem = body();
  } catch (const c10::Error& e) {
    problem = std::string("unexpected c10::Error: ") + e.what_without_backtrace();
  } catch (const std::exception& e) {
    problem = std::string("unexpected exception: ") + e.what();
  }
  if (problem.empty()) {
    ++passed;
    std::printf("PASS %s\n", name.c_str());
  } else {
    ++failed;
    std::printf("FAIL %s: %s\n", name.c_str(), problem.c_str());
  }
  std::fflush(stdout);
}

// A check that `body` throws a c10::Error whose message contains `expected_text`.
void check_throws(const std::string& name, const std::string& expected_text, const std::function<void()>& body) {
  check(name, [&]() -> std::string {
    try {
      body();
    } catch (const c10::Error& e) {
      const std::string message = e.what_without_backtrace();
      if (message.find(expected_text) == std::string::npos) {
        return "c10::Error without '" + expected_text + "': " + message;
      }
      return "";
    }
    return "no exception thrown";
  });
}

void check_forward(const Case& c) {
  check("forward " + c.name, [&]() -> std::string {
    const Inputs in = make_inputs(c);
    return compare("output", call_forward(c, in), reference_forward(c, in.x, in.w, in.b));
  });
}

// All three gradients of the backward op against autograd through the reference.
void check_backward_against_autograd(const Case& c) {
  check("backward vs autograd " + c.name, [&]() -> std::string {
    const Inputs in = make_inputs(c);
    const at::Tensor grad_output = at::randn_like(call_forward(c, in));

    const at::Tensor x = in.x.detach().clone().requires_grad_(true);
    const at::Tensor w = in.w.detach().clone().requires_grad_(true);
    const at::Tensor b = in.b->detach().clone().requires_grad_(true);
    reference_forward(c, x, w, b).backward(grad_output);

    const auto [gx, gw, gb] =
        backward_op().call(grad_output, in.x, in.w, in.b, c.transform, c.alpha, c.bias_transform, c.bias_alpha,
                           c.stride, c.padding, c.dilation, c.groups, {true, true, true});
    if (!gx || !gw || !gb) return "a requested gradient is None";
    for (const auto& problem : {compare("grad_input", *gx, x.grad()), compare("grad_weight", *gw, w.grad()),
                                compare("grad_bias", *gb, b.grad())}) {
      if (!problem.empty()) return problem;
    }
    return "";
  });
}

// The weight gradient alone: f'(W) * dL/df(W), with dL/df(W) from at::convolution_backward of the
// plain convolution; the gradients not asked for must come back as None.
void check_weight_chain_rule(const Case& c, const std::function<at::Tensor(const at::Tensor&)>& f_prime) {
  check("backward chain rule " + c.name, [&]() -> std::string {
    const Inputs in = make_inputs(c);
    TORCH_CHECK(c.padding[0] == c.padding[1] && c.padding[2] == c.padding[3], "case needs symmetric padding");
    const at::Tensor grad_output = at::randn_like(call_forward(c, in));
    const auto conv_grads =
        at::convolution_backward(grad_output, in.x, reference_f(c.transform, in.w, c.alpha), std::nullopt, c.stride,
                                 {c.padding[0], c.padding[2]}, c.dilation, /*transposed=*/false,
                                 /*output_padding=*/{0, 0}, c.groups, {false, true, false});
    const at::Tensor expected = f_prime(in.w) * std::get<1>(conv_grads);

    const auto [gx, gw, gb] =
        backward_op().call(grad_output, in.x, in.w, in.b, c.transform, c.alpha, c.bias_transform, c.bias_alpha,
                           c.stride, c.padding, c.dilation, c.groups, {false, true, false});
    if (gx || gb) return "a gradient that was not requested is not None";
    if (!gw) return "grad_weight is None";
    return compare("grad_weight", *gw, expected);
  });
}

}  // namespace

int main() {
  at::manual_seed(0);

  check("operators registered", []() -> std::string {
    tied_conv2d_op();
    backward_op();
    return "";
  });

  // Every transform on one geometry, then the geometry variants.
  for (const char* name : {"identity", "square", "abs", "neg", "exp", "sigmoid", "tanh", "softplus", "relu"}) {
    Case c;
    c.name = name;
    c.transform = name;
    check_forward(c);
  }
  const Case strided_grouped{.name = "stride (2,1) dilation (1,2) groups 2, square, bias softplus",
                             .transform = "square",
                             .with_bias = true,
                             .bias_transform = "softplus",
                             .input_size = {2, 6, 11, 12},
                             .weight_size = {4, 3, 3, 2},
                             .stride = {2, 1},
                             .padding = {2, 2, 1, 1},
                             .dilation = {1, 2},
                             .groups = 2};
  const std::vector<Case> variants{
      {.name = "scale alpha=0.5", .transform = "scale", .alpha = 0.5},
      {.name = "tanh, bias exp", .transform = "tanh", .with_bias = true, .bias_transform = "exp"},
      {.name = "scale alpha=0.5, bias scale bias_alpha=-2",
       .transform = "scale",
       .alpha = 0.5,
       .with_bias = true,
       .bias_transform = "scale",
       .bias_alpha = -2.0},
      strided_grouped,
      {.name = "asymmetric padding (0,1,2,0), exp, bias tanh",
       .transform = "exp",
       .with_bias = true,
       .bias_transform = "tanh",
       .weight_size = {5, 4, 2, 3},
       .padding = {0, 1, 2, 0}},
      {.name = "channels_last, sigmoid", .transform = "sigmoid", .channels_last = true},
  };
  for (const Case& c : variants) check_forward(c);

  // Backward: every gradient against autograd on a case with everything at once (asymmetric padding,
  // stride, dilation, groups, both transforms), and the chain rule for the weight on its own.
  Case everything = strided_grouped;
  everything.name = "tanh, bias exp, asymmetric padding (1,0,0,2), stride, dilation, groups";
  everything.transform = "tanh";
  everything.bias_transform = "exp";
  everything.padding = {1, 0, 0, 2};
  check_backward_against_autograd(everything);
  {
    Case c;
    c.name = "square, grad_weight only";
    c.transform = "square";
    check_weight_chain_rule(c, [](const at::Tensor& w) { return 2 * w; });
  }

  // Errors.
  {
    Case c;
    c.transform = "cube";
    const Inputs in = make_inputs(c);
    check_throws("unknown transform throws", "unknown transform 'cube'", [&] { call_forward(c, in); });
    c.transform = "square";
    c.with_bias = true;
    c.bias_transform = "cube";
    const Inputs biased = make_inputs(c);
    check_throws("unknown bias_transform throws", "unknown transform 'cube'", [&] { call_forward(c, biased); });
  }
  {
    Case c;
    c.transform = "square";
    c.input_size = {1, 3, 6, 6};
    c.weight_size = {4, 2, 3, 3};
    const Inputs in = make_inputs(c);
    check_throws("in-channel mismatch throws", "channels", [&] { call_forward(c, in); });
  }

  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
