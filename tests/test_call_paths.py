"""The two ways Python calls the operator (fusedtie/ops.py): plain eager calls use the _C binding,
anything that intercepts Python calls (__torch_function__ modes and subclasses, torch.compile) sees
torch.ops.fusedtie.tied_conv2d. Both must give the reference's result and errors."""

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import fusedtie
import fusedtie.ops as ops


@pytest.fixture
def op_calls(monkeypatch):
    calls = []
    original = ops._tied_conv2d_op

    def counting(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(ops, "_tied_conv2d_op", counting)
    return calls


def expected(x, w, b):
    return F.conv2d(x.double(), w.double() ** 2, b.double(), padding=1)


def make():
    return torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3, requires_grad=True), torch.randn(4)


def test_eager_call_uses_the_binding(op_calls):
    x, w, b = make()
    out = fusedtie.tied_conv2d(x, w, b, "square", padding=1)
    assert op_calls == []
    torch.testing.assert_close(out.double(), expected(x, w, b), rtol=1e-5, atol=1e-5)
    (gw,) = torch.autograd.grad(out.sum(), w)  # autograd is the dispatcher's, whichever path
    w64 = w.detach().double().requires_grad_(True)
    (ref_gw,) = torch.autograd.grad(F.conv2d(x.double(), w64**2, b.double(), padding=1).sum(), w64)
    torch.testing.assert_close(gw.double(), ref_gw, rtol=1e-5, atol=1e-5)


def test_torch_function_mode_sees_the_operator(op_calls):
    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    x, w, b = make()
    with Record():
        out = fusedtie.tied_conv2d(x, w, b, "square", padding=1)
    assert len(op_calls) == 1
    assert torch.ops.fusedtie.tied_conv2d.default in seen
    torch.testing.assert_close(out.double(), expected(x, w, b), rtol=1e-5, atol=1e-5)


def test_tensor_subclass_goes_through_torch_ops(op_calls):
    class Marked(torch.Tensor):
        pass

    x, w, b = make()
    fusedtie.tied_conv2d(x.as_subclass(Marked), w, b, "square", padding=1)
    assert len(op_calls) == 1


def test_errors_are_the_same_on_both_paths():
    x, w, b = make()
    with pytest.raises(ValueError, match=r"expected input\[1, 5, 6, 6\] to have 3 channels, but got 5"):
        fusedtie.tied_conv2d(torch.randn(1, 5, 6, 6), w, b, "square")
    with pytest.raises(ValueError, match=r"expected input\[1, 5, 6, 6\] to have 3 channels, but got 5"):
        torch.ops.fusedtie.tied_conv2d(torch.randn(1, 5, 6, 6), w, b, "square", 1.0, "identity", 1.0,
                                       [1, 1], [0, 0, 0, 0], [1, 1], 1)
