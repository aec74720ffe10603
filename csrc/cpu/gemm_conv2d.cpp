// See gemm_conv2d.h; the column matrix and its geometry are in im2col.h.
#include "gemm_conv2d.h"

#include "im2col.h"

namespace fusedtie {

using namespace columns_detail;

at::Tensor gemm_conv2d_forward(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Geometry g(input, weight, stride, padding, dilation);
  const int64_t batch = input.size(0), out_channels = weight.size(0), L = g.positions();
  const at::Tensor weight_matrix = weight.view({out_channels, g.rows()});
  // One GEMM for the whole batch, or one per image (each a group of one).
  const int64_t group = batched(input, g) ? batch : 1;
  at::Tensor out = at::empty({batch, out_channels, L}, input.options());
  at::Tensor cols_buffer;
  for (int64_t n0 = 0; n0 < batch; n0 += group) {
    const at::Tensor cols = columns(input, n0, group, g, cols_buffer);
    at::Tensor result = group == 1 ? out[n0] : at::empty({out_channels, group * L}, input.options());
    if (bias.has_value()) {
      at::addmm_out(result, bias->view({out_channels, 1}), weight_matrix, cols);
    } else {
      at::mm_out(result, weight_matrix, cols);
    }
    if (group > 1) out.narrow(0, n0, group).copy_(images_first(result, group, L));
  }
  return out.view({batch, out_channels, g.out_h, g.out_w});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gemm_conv2d_backward(const at::Tensor& grad_output,
                                                                    const at::Tensor& input, const at::Tensor& weight,
                                                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                                                    at::IntArrayRef dilation,
                                                                    std::array<bool, 3> output_mask) {
  const Geometry g(input, weight, stride, padding, dilation);
  const int64_t batch = input.size(0), out_channels = weight.size(0), L = g.positions();
  const at::Tensor grad = grad_output.reshape({batch, out_channels, L});
  const int64_t group = batched(input, g) ? batch : 1;
  // The gradient of images [n0, n0 + group) as the GEMM sees it: [O, group*L].
  auto grad_columns = [&](int64_t n0) {
    return group == 1 ? grad[n0] : grad.permute({1, 0, 2}).reshape({out_channels, batch * L});
  };
  at::Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0]) {
    // d columns = W^T . grad, folded back onto the image (summing overlapping windows).
    const at::Tensor weight_t = weight.view({out_channels, g.rows()}).t();
    grad_input = at::empty_like(input);
    at::Tensor grad_cols;  // [C*kh*kw, group*L], reused by every group
    for (int64_t n0 = 0; n0 < batch; n0 += group) {
      if (g.pointwise && group == 1) {  // the image's gradient is the GEMM's result: write it there
        at::Tensor target = grad_input[n0].view({g.channels, L});
        at::mm_out(target, weight_t, grad_columns(n0));
        continue;
      }
      if (!grad_cols.defined()) grad_cols = at::empty({g.rows(), group * L}, grad.options());
      at::mm_out(grad_cols, weight_t, grad_columns(n0));
      if (g.pointwise) {
        grad_input.narrow(0, n0, group).view({group, g.channels, L}).copy_(images_first(grad_cols, group, L));
        continue;
      }
      AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fusedtie_col2im", [&] {
        for (int64_t i = 0; i < group; ++i) {
          col2im(grad_cols.const_data_ptr<scalar_t>() + i * L, group * L,
                 grad_input[n0 + i].mutable_data_ptr<scalar_t>(), g);
        }
      });
    }
  }
  if (output_mask[1]) {
    // dW = sum over images of grad . columns^T: written by the first GEMM, accumulated after.
    grad_weight = at::empty({out_channels, g.rows()}, grad.options());
    at::Tensor cols_buffer;
    for (int64_t n0 = 0; n0 < batch; n0 += group) {
      const at::Tensor cols_t = columns(input, n0, group, g, cols_buffer).t();
      if (n0 == 0) {
        at::mm_out(grad_weight, grad_columns(0), cols_t);
      } else {
        grad_weight.addmm_(grad_columns(n0), cols_t);
      }
    }
    grad_weight = grad_weight.view(weight.sizes());
  }
  if (output_mask[2]) grad_bias = grad.sum({0, 2});
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace fusedtie
