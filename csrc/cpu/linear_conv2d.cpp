// The linear algorithm (linear_conv2d.h). Naming: the source W is (O, K) row-major; a skinny pass
// covers W's rows in parallel chunks, each thread reading its rows once.
#include "linear_conv2d.h"

#include <ATen/Parallel.h>

#include <algorithm>

#include "../matrix_product.h"
#include "transform_passes.h"

namespace fusedtie {
namespace {

using matrix_product::as_images;
using matrix_product::as_matrix;

// Float32/float64 up to kSkinnyMaxRows rows, built-in transforms (they have vector functors; user
// transforms only whole-tensor passes).
bool skinny_applies(const at::Tensor& input, const TransformSpec& f) {
  const auto dtype = input.scalar_type();
  return (dtype == at::kFloat || dtype == at::kDouble) && input.size(0) <= kSkinnyMaxRows && !is_user_transform(f.kind);
}

// W's rows per task: a task reads at least 64 KiB of W, so small weights stay on one thread.
int64_t row_grain(const at::Tensor& w) { return std::max<int64_t>(1, (int64_t{1} << 14) / w.size(1)); }

// y[m, o] = sum_k x[m, k] f(w[o, k]) (+ bias[o]): x (M, K), w (O, K), both contiguous.
at::Tensor skinny_dot(const at::Tensor& x, const at::Tensor& w, const TransformSpec& f, const at::Tensor* bias) {
  const int64_t M = x.size(0), K = x.size(1), O = w.size(0);
  at::Tensor y = at::empty({M, O}, x.options());
  const auto& passes = cpu_transform_passes();
  const void* bias_data = bias == nullptr ? nullptr : bias->const_data_ptr();
  at::parallel_for(0, O, row_grain(w), [&](int64_t begin, int64_t end) {
    passes.skinny_dot(f.kind, x.scalar_type(), x.const_data_ptr(), M, K, w.const_data_ptr(), K, bias_data,
                      y.mutable_data_ptr(), O, begin, end, f.alpha);
  });
  return y;
}

// With a (M, O) and b (M, K), all contiguous: spread = a f(W) (M, K) when `spread`, and
// grad_w = f'(W) * (a^T b) (O, K) when `grad_w`, in one pass over W. The spread sums over W's
// rows, so each task sums its chunk into its own buffer and the buffers are added at the end (in a
// fixed order: the result depends on the thread count, not on scheduling).
std::pair<at::Tensor, at::Tensor> skinny_rows(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b,
                                              const TransformSpec& f, bool spread, bool grad_w) {
  const int64_t M = a.size(0), O = w.size(0), K = w.size(1);
  const int64_t grain = row_grain(w);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (O + grain - 1) / grain));
  at::Tensor partial = spread ? at::zeros({chunks, M, K}, w.options()) : at::Tensor();
  at::Tensor grad = grad_w ? at::empty({O, K}, w.options()) : at::Tensor();
  const auto& passes = cpu_transform_passes();
  const int64_t item = w.element_size();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      void* spread_data = spread ? static_cast<char*>(partial.mutable_data_ptr()) + c * M * K * item : nullptr;
      passes.skinny_rows(f.kind, w.scalar_type(), w.const_data_ptr(), K, a.const_data_ptr(), O, M,
                         grad_w ? b.const_data_ptr() : nullptr, K, spread_data,
                         grad_w ? grad.mutable_data_ptr() : nullptr, c * O / chunks, (c + 1) * O / chunks, f.alpha);
    }
  });
  at::Tensor spread_out;
  if (spread) spread_out = chunks == 1 ? partial[0] : partial.sum(0);
  return {spread_out, grad};
}

}  // namespace

bool linear_applies(const at::Tensor& input, const at::Tensor& weight, const TiedConv2dParams& p) {
  return is_matrix_product(input, weight, p) && skinny_applies(input, p.weight_transform);
}

bool linear_applies(const at::Tensor& input, const at::Tensor& weight, const TiedConvTranspose2dParams& p) {
  return is_matrix_product(input, weight, p) && skinny_applies(input, p.weight_transform);
}

at::Tensor linear_conv2d_forward(const at::Tensor& input, const at::Tensor& source, const TransformSpec& f,
                                 const std::optional<at::Tensor>& bias) {
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  return as_images(skinny_dot(as_matrix(input), as_matrix(source), f, b.defined() ? &b : nullptr));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_conv2d_backward(const at::Tensor& grad_output,
                                                                      const at::Tensor& input, const at::Tensor& source,
                                                                      const TransformSpec& f,
                                                                      std::array<bool, 3> output_mask) {
  // dL/dx = dy f(W) and dL/dW = f'(W) * (dy^T x), in one pass over W.
  const at::Tensor dy = as_matrix(grad_output).contiguous();  // (M, O)
  at::Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0] || output_mask[1]) {
    auto [spread, grad] = skinny_rows(as_matrix(source), dy, as_matrix(input), f, output_mask[0], output_mask[1]);
    if (output_mask[0]) grad_input = as_images(spread);
    if (output_mask[1]) grad_weight = grad.view(source.sizes());
  }
  if (output_mask[2]) grad_bias = dy.sum(0);
  return {grad_input, grad_weight, grad_bias};
}

at::Tensor linear_conv_transpose2d_forward(const at::Tensor& input, const at::Tensor& source, const TransformSpec& f,
                                           const std::optional<at::Tensor>& bias) {
  const at::Tensor x = as_matrix(input);  // (M, O)
  at::Tensor y = skinny_rows(as_matrix(source), x, x, f, /*spread=*/true, /*grad_w=*/false).first;
  if (bias.has_value()) y.add_(*bias);
  return as_images(y);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_conv_transpose2d_backward(const at::Tensor& grad_output,
                                                                                const at::Tensor& input,
                                                                                const at::Tensor& source,
                                                                                const TransformSpec& f,
                                                                                std::array<bool, 3> output_mask) {
  // dL/dx = dy f(W)^T (a dot product per row of W) and dL/dW = f'(W) * (x^T dy).
  const at::Tensor dy = as_matrix(grad_output).contiguous();  // (M, K)
  at::Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0]) grad_input = as_images(skinny_dot(dy, as_matrix(source), f, nullptr));
  if (output_mask[1]) {
    grad_weight = skinny_rows(as_matrix(source), as_matrix(input), dy, f, false, true).second.view(source.sizes());
  }
  if (output_mask[2]) grad_bias = dy.sum(0);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace fusedtie
