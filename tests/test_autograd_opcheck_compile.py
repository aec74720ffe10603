"""gradcheck, opcheck, double backward, version counter, meta tensors and torch.compile."""

import pytest
import torch
import torch.nn as nn
from reference import reference_f, transform_arg

import fusedtie

TRANSFORMS = fusedtie.available_transforms()


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_gradcheck_float64(transform):
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(6, 2, 3, 2, dtype=torch.float64) * 0.5).requires_grad_(True)
    b = (torch.randn(6, dtype=torch.float64) * 0.5).requires_grad_(True)
    t = transform_arg(transform)

    def fn(x, w, b):
        return fusedtie.tied_conv2d(x, w, b, t, t, stride=(2, 1), padding="valid", dilation=(1, 2), groups=2)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    same = lambda x, w, b: fusedtie.tied_conv2d(x, w, b, t, t, padding="same", groups=2)  # noqa: E731
    assert torch.autograd.gradcheck(same, (x, w, b))


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_apply_transform_matches_reference_and_gradcheck(transform):
    w = torch.randn(5, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    out = fusedtie.apply_transform(w, transform_arg(transform))
    torch.testing.assert_close(out, reference_f(transform, w.detach()), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda w: fusedtie.apply_transform(w, transform_arg(transform)), (w,))


def _samples():
    def make(
        shape_x,
        shape_w,
        bias,
        transform,
        bias_transform,
        stride,
        padding,
        dilation,
        groups,
        channels_last=False,
        requires_grad=True,
    ):
        x = torch.randn(shape_x, requires_grad=requires_grad)
        w = torch.randn(shape_w, requires_grad=requires_grad)
        if channels_last:
            x = x.detach().to(memory_format=torch.channels_last).requires_grad_(requires_grad)
        b = torch.randn(shape_w[0], requires_grad=requires_grad) if bias else None
        return (
            x,
            w,
            b,
            transform,
            1.0 if transform != "scale" else 0.5,
            bias_transform,
            1.0,
            stride,
            padding,
            dilation,
            groups,
        )

    return [
        make((2, 4, 8, 8), (6, 4, 3, 3), True, "square", "identity", [1, 1], [1, 1, 1, 1], [1, 1], 1),
        make((1, 4, 9, 7), (4, 2, 2, 3), False, "tanh", "identity", [2, 1], [0, 1, 1, 1], [1, 2], 2),
        make((2, 4, 6, 6), (6, 4, 1, 1), True, "scale", "scale", [1, 1], [0, 0, 0, 0], [1, 1], 1, channels_last=True),
        make((0, 4, 6, 6), (6, 4, 3, 3), True, "softplus", "exp", [1, 1], [1, 1, 1, 1], [1, 1], 1),
        make((2, 4, 6, 6), (6, 4, 3, 3), True, "abs", "sigmoid", [1, 1], [1, 1, 1, 1], [1, 1], 1, requires_grad=False),
    ]


@pytest.mark.parametrize("sample", range(5))
def test_opcheck_tied_conv2d(sample):
    args = _samples()[sample]
    torch.library.opcheck(torch.ops.fusedtie.tied_conv2d.default, args)


def test_opcheck_backward_and_transform_ops():
    x, w, b = torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3, 3), torch.randn(6)
    grad = torch.randn(2, 6, 8, 8)
    for mask in ([True, True, True], [False, True, False], [True, False, True]):
        torch.library.opcheck(
            torch.ops.fusedtie._tied_conv2d_backward.default,
            (grad, x, w, b, "tanh", 1.0, "square", 1.0, [1, 1], [1, 1, 1, 1], [1, 1], 1, mask),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
        )
    wr = torch.randn(6, 4, 3, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.fusedtie.transform.default, (wr, "exp", 1.0))
    torch.library.opcheck(
        torch.ops.fusedtie._transform_backward.default,
        (torch.randn(6, 4, 3, 3), w, "exp", 1.0),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_meta_tensors_give_shapes():
    x = torch.empty(3, 8, 30, 20, device="meta")
    w = torch.empty(16, 4, 5, 4, device="meta")
    b = torch.empty(16, device="meta")
    out = fusedtie.tied_conv2d(x, w, b, "tanh", stride=2, padding="valid", groups=2)
    ref = torch.nn.functional.conv2d(x, w, b, stride=2, groups=2)
    assert out.device.type == "meta" and out.shape == ref.shape
    same = fusedtie.tied_conv2d(x, w, b, "tanh", padding="same", groups=2)
    assert same.shape == (3, 16, 30, 20)


def test_double_backward_raises_clearly():
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    out = fusedtie.tied_conv2d(x, w, transform="square")
    (gw,) = torch.autograd.grad(out.sum(), w, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gw.sum().backward()


def test_in_place_change_of_source_between_forward_and_backward_raises():
    x = torch.randn(1, 2, 5, 5)
    w = torch.randn(3, 2, 3, 3, requires_grad=True)
    out = fusedtie.tied_conv2d(x, w, transform="square")
    with torch.no_grad():
        w.add_(1.0)  # an optimizer step between forward and backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_frozen_source_gets_no_gradient():
    conv = nn.Conv2d(3, 3, 3)
    conv.requires_grad_(False)
    tied = fusedtie.FusedTiedConv2d(conv, "exp")
    x = torch.randn(1, 3, 6, 6, requires_grad=True)
    tied(x).sum().backward()
    assert conv.weight.grad is None and x.grad is not None


class _SeedNet(nn.Module):
    def __init__(self, transform="square", bias="same"):
        super().__init__()
        self.conv_1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_2 = fusedtie.FusedTiedConv2d(self.conv_1, transform, bias)

    def forward(self, x):
        return self.conv_2(torch.relu(self.conv_1(x)))


@pytest.mark.parametrize("transform", ["square", "tanh"])
def test_torch_compile_fullgraph_matches_eager(transform):
    torch._dynamo.reset()
    net = _SeedNet(transform, "transform")
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    eager_out = net(x)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), [x, *net.parameters()])
    compiled = torch.compile(net, fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *net.parameters()])
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    # and the compiled results against the float64 oracle of the two-layer net
    x64 = x.detach().double().requires_grad_(True)
    w64 = net.conv_1.weight.detach().double().requires_grad_(True)
    b64 = net.conv_1.bias.detach().double().requires_grad_(True)
    h = torch.relu(torch.nn.functional.conv2d(x64, w64, b64, padding=1))
    ref = torch.nn.functional.conv2d(h, reference_f(transform, w64), reference_f(transform, b64), padding=1)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x64, w64, b64])
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-3, atol=1e-3)


def test_opcheck_layout_edge_cases():
    # _transform_backward with a gradient laid out differently from its source
    src = torch.randn(6, 4, 3, 3).to(memory_format=torch.channels_last)
    torch.library.opcheck(
        torch.ops.fusedtie._transform_backward.default,
        (torch.randn(6, 4, 3, 3), src, "tanh", 1.0),
        test_utils=("test_schema", "test_faketensor"),
    )
    torch.library.opcheck(
        torch.ops.fusedtie._transform_backward.default,
        (torch.randn(6, 4, 3, 3), src, "identity", 1.0),
        test_utils=("test_schema", "test_faketensor"),
    )
    # the backward of an empty batch with asymmetric padding
    x, w = torch.randn(0, 4, 6, 6), torch.randn(6, 4, 2, 2)
    torch.library.opcheck(
        torch.ops.fusedtie._tied_conv2d_backward.default,
        (
            torch.randn(0, 6, 6, 6),
            x,
            w,
            None,
            "square",
            1.0,
            "identity",
            1.0,
            [1, 1],
            [0, 1, 0, 1],
            [1, 1],
            1,
            [True, True, False],
        ),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_abs_gradient_at_nan_and_zero_matches_pytorch():
    w = torch.tensor([float("nan"), 0.0, -1.5, 2.0], dtype=torch.float64, requires_grad=True)
    (ours,) = torch.autograd.grad(fusedtie.apply_transform(w, "abs"), w, torch.ones(4, dtype=torch.float64))
    (ref,) = torch.autograd.grad(w.abs(), w, torch.ones(4, dtype=torch.float64))
    assert torch.equal(ours, ref)  # [0, 0, -1, 1]
