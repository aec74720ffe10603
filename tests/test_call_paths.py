"""The two ways Python calls each operator (fusedtie/ops.py): plain eager calls use the _C binding,
anything that intercepts Python calls (__torch_function__ modes and subclasses, torch.compile) sees
torch.ops.fusedtie.tied_conv2d / tied_conv_transpose2d. Both must give the reference's result and
errors."""

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import fusedtie
import fusedtie.ops as ops

# op name -> (the ops.py attribute holding its torch.ops overload, fusedtie's call, PyTorch's,
# source weight shape). The transposed op reads its weight as (in_channels, out_channels, kH, kW).
OPS = {
    "tied_conv2d": ("_tied_conv2d_op", fusedtie.tied_conv2d, F.conv2d, (4, 3, 3, 3)),
    "tied_conv_transpose2d": (
        "_tied_conv_transpose2d_op",
        fusedtie.tied_conv_transpose2d,
        F.conv_transpose2d,
        (3, 4, 3, 3),
    ),
}


@pytest.fixture(params=list(OPS))
def op(request, monkeypatch):
    """(name, fusedtie's function, PyTorch's, weight shape, the torch.ops calls made)."""
    attribute, ours, theirs, weight_shape = OPS[request.param]
    calls = []
    original = getattr(ops, attribute)

    def counting(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(ops, attribute, counting)
    return request.param, ours, theirs, weight_shape, calls


def make(weight_shape):
    """3 input channels, 4 output channels (so a bias of 4) for either operator's weight shape."""
    return torch.randn(1, 3, 6, 6), torch.randn(*weight_shape, requires_grad=True), torch.randn(4)


def check_against_reference(theirs, out, x, w, b):
    torch.testing.assert_close(
        out.double(), theirs(x.double(), w.double() ** 2, b.double(), padding=1), rtol=1e-5, atol=1e-5
    )
    (gw,) = torch.autograd.grad(out.sum(), w)  # autograd is the dispatcher's, whichever path
    w64 = w.detach().double().requires_grad_(True)
    (ref_gw,) = torch.autograd.grad(theirs(x.double(), w64**2, b.double(), padding=1).sum(), w64)
    torch.testing.assert_close(gw.double(), ref_gw, rtol=1e-5, atol=1e-5)


def test_eager_call_uses_the_binding(op):
    _, ours, theirs, weight_shape, calls = op
    x, w, b = make(weight_shape)
    out = ours(x, w, b, "square", padding=1)
    assert calls == []
    check_against_reference(theirs, out, x, w, b)


def test_torch_function_mode_sees_the_operator(op):
    name, ours, theirs, weight_shape, calls = op
    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    x, w, b = make(weight_shape)
    with Record():
        out = ours(x, w, b, "square", padding=1)
    assert len(calls) == 1
    assert getattr(torch.ops.fusedtie, name).default in seen
    check_against_reference(theirs, out, x, w, b)


def test_tensor_subclass_goes_through_torch_ops(op):
    _, ours, _, weight_shape, calls = op

    class Marked(torch.Tensor):
        pass

    x, w, b = make(weight_shape)
    ours(x.as_subclass(Marked), w, b, "square", padding=1)
    assert len(calls) == 1


def test_errors_are_the_same_on_both_paths():
    _, w, b = make((4, 3, 3, 3))
    with pytest.raises(ValueError, match=r"expected input\[1, 5, 6, 6\] to have 3 channels, but got 5"):
        fusedtie.tied_conv2d(torch.randn(1, 5, 6, 6), w, b, "square")
    with pytest.raises(ValueError, match=r"expected input\[1, 5, 6, 6\] to have 3 channels, but got 5"):
        torch.ops.fusedtie.tied_conv2d(
            torch.randn(1, 5, 6, 6), w, b, "square", 1.0, "identity", 1.0, [1, 1], [0, 0, 0, 0], [1, 1], 1
        )
    _, w, b = make((3, 4, 3, 3))
    message = r"expected input\[1, 5, 6, 6\] to have 3 channels, but got 5"
    with pytest.raises(ValueError, match=message):
        fusedtie.tied_conv_transpose2d(torch.randn(1, 5, 6, 6), w, b, "square")
    with pytest.raises(ValueError, match=message):
        torch.ops.fusedtie.tied_conv_transpose2d(
            torch.randn(1, 5, 6, 6), w, b, "square", 1.0, [1, 1], [0, 0], [0, 0], [1, 1], 1
        )
