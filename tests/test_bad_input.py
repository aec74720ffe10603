"""Bad input gets a clear error naming the problem; never a crash, a hang or a wrong answer."""

import pytest
import torch
import torch.nn as nn
from op_cases import needs_cuda

import fusedtie
from fusedtie import FusedTiedConv2d


def _tensors(device="cpu", cin=4, cout=6, k=3, hw=8, dtype=torch.float32):
    return (
        torch.randn(2, cin, hw, hw, dtype=dtype, device=device),
        torch.randn(cout, cin, k, k, dtype=dtype, device=device),
        torch.randn(cout, dtype=dtype, device=device),
    )


# (name, call, exception, message pattern); each runs on real CPU tensors, on meta tensors, and on
# CUDA tensors where a GPU is present (the same errors as the CPU's).
def _op_cases(device):
    x, w, b = _tensors(device)
    return [
        (
            "in-channel mismatch",
            lambda: fusedtie.tied_conv2d(x[:, :3], w, b),
            ValueError,
            "to have 4 channels, but got 3 channels",
        ),
        (
            "groups do not divide out_channels",
            lambda: fusedtie.tied_conv2d(x, w[:5, :1], None, groups=4),
            (ValueError, RuntimeError),
            "divisible by groups",
        ),
        ("5-D input", lambda: fusedtie.tied_conv2d(x[None], w, b), ValueError, "Expected 3D .unbatched. or 4D"),
        ("dtype mismatch", lambda: fusedtie.tied_conv2d(x.double(), w, b), TypeError, "same dtype"),
        ("bias dtype mismatch", lambda: fusedtie.tied_conv2d(x, w, b.double()), TypeError, "same dtype"),
        ("integer input", lambda: fusedtie.tied_conv2d(x.long(), w.long(), None), TypeError, "floating-point"),
        (
            "unknown transform",
            lambda: fusedtie.tied_conv2d(x, w, b, "cube"),
            ValueError,
            "unknown transform 'cube'; valid transforms: identity, square",
        ),
        (
            "unknown bias transform",
            lambda: fusedtie.tied_conv2d(x, w, b, "square", "sqrt"),
            ValueError,
            "unknown transform 'sqrt'",
        ),
        (
            "kernel larger than padded input",
            lambda: fusedtie.tied_conv2d(x[..., :2, :2], w, b),
            (ValueError, RuntimeError),
            "Kernel size can't be greater than actual input size",
        ),
        (
            "same padding with stride",
            lambda: fusedtie.tied_conv2d(x, w, b, padding="same", stride=2),
            ValueError,
            "padding='same' is not supported for strided convolutions",
        ),
        (
            "bad padding string",
            lambda: fusedtie.tied_conv2d(x, w, b, padding="full"),
            ValueError,
            "Invalid padding string 'full'",
        ),
        ("negative padding", lambda: fusedtie.tied_conv2d(x, w, b, padding=-1), ValueError, "negative padding"),
        ("zero stride", lambda: fusedtie.tied_conv2d(x, w, b, stride=0), (ValueError, RuntimeError), "stride"),
        ("zero groups", lambda: fusedtie.tied_conv2d(x, w, b, groups=0), (ValueError, RuntimeError), "groups"),
        ("bias of wrong size", lambda: fusedtie.tied_conv2d(x, w, b[:5]), (ValueError, RuntimeError), "bias"),
        ("3-D weight", lambda: fusedtie.tied_conv2d(x, w[0], b), ValueError, "4-D weight"),
        # F.conv2d raises an IndexError from inside its kernel here (found by the crash fuzzer)
        (
            "kernel with no taps",
            lambda: fusedtie.tied_conv2d(x, w[..., :0], b),
            ValueError,
            r"expected a kernel of at least 1 x 1, got weight of size \[6, 4, 3, 0\]",
        ),
        (
            "transposed kernel with no taps",
            lambda: fusedtie.tied_conv_transpose2d(x, w.transpose(0, 1)[:, :, :0], None),
            ValueError,
            r"expected a kernel of at least 1 x 1, got weight of size \[4, 6, 0, 3\]",
        ),
        (
            "stride triple",
            lambda: fusedtie.tied_conv2d(x, w, b, stride=(1, 1, 1)),
            TypeError,
            "stride must be an int or a pair",
        ),
        (
            "transform of wrong type",
            lambda: fusedtie.tied_conv2d(x, w, b, transform=torch.square),
            TypeError,
            "expected a transform name",
        ),
        (
            "scale without alpha",
            lambda: fusedtie.tied_conv2d(x, w, b, transform="scale"),
            ValueError,
            "needs its constant",
        ),
        (
            "alpha on a transform without one",
            lambda: fusedtie.Transform("square", alpha=2.0),
            ValueError,
            "takes no alpha",
        ),
    ]


@pytest.mark.parametrize("device", ["cpu", "meta", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("case", range(len(_op_cases("cpu"))), ids=[c[0] for c in _op_cases("cpu")])
def test_op_bad_input(case, device):
    name, call, exc, pattern = _op_cases(device)[case]
    with pytest.raises(exc, match=pattern):
        call()


@pytest.mark.parametrize("weight_device,input_device", [("meta", "cpu"), ("cpu", "meta")])
def test_meta_and_cpu_mix_raises(weight_device, input_device):
    x = torch.randn(1, 4, 8, 8, device=input_device)
    w = torch.randn(6, 4, 3, 3, device=weight_device)
    with pytest.raises(RuntimeError, match="same device|device"):
        fusedtie.tied_conv2d(x, w)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_the_direct_ops_check_names_masks_and_shapes(device):
    x, w, b = _tensors(device)
    geometry = ([1, 1], [1, 1, 1, 1], [1, 1], 1)
    with pytest.raises(ValueError, match="unknown transform 'cube'"):
        torch.ops.fusedtie.tied_conv2d(x, w, b, "cube", 1.0, "identity", 1.0, *geometry)
    grad = torch.randn(2, 6, 8, 8, device=device)
    with pytest.raises(ValueError, match="bias gradient, but bias is None"):
        torch.ops.fusedtie._tied_conv2d_backward(
            grad, x, w, None, "square", 1.0, "identity", 1.0, *geometry, [True, True, True]
        )
    with pytest.raises(ValueError, match="expected grad_output of size"):
        torch.ops.fusedtie._tied_conv2d_backward(
            grad[:, :5], x, w, b, "square", 1.0, "identity", 1.0, *geometry, [True, True, True]
        )
    with pytest.raises(ValueError, match="unknown transform 'cube'"):
        torch.ops.fusedtie.transform(w, "cube", 1.0)
    with pytest.raises(TypeError, match="floating-point"):
        torch.ops.fusedtie.transform(w.to(torch.int32), "square", 1.0)
    with pytest.raises(ValueError, match="expected grad of size"):
        torch.ops.fusedtie._transform_backward(w[:1], w, "square", 1.0)


def test_geometry_accepts_what_conv2d_accepts():
    import numpy as np

    x, w, b = _tensors()
    ref = torch.nn.functional.conv2d(x, w * w, b, stride=(2,), padding=(1,), dilation=np.int64(1))
    ours = fusedtie.tied_conv2d(x, w, b, stride=(2,), padding=(1,), dilation=np.int64(1))
    torch.testing.assert_close(ours, ref)


def test_the_direct_op_checks_too():
    x, w, b = _tensors()
    with pytest.raises(ValueError, match="4-D input"):
        torch.ops.fusedtie.tied_conv2d(x[0], w, b, "square", 1.0, "identity", 1.0, [1, 1], [0, 0, 0, 0], [1, 1], 1)
    with pytest.raises(ValueError, match="padding must have 4 elements"):
        torch.ops.fusedtie.tied_conv2d(x, w, b, "square", 1.0, "identity", 1.0, [1, 1], [0, 0, 0], [1, 1], 1)


def test_nan_and_inf_propagate_like_conv2d():
    x, w, b = _tensors()
    w[0, 0, 0, 0] = float("nan")
    x[0, 0, 0, 0] = float("inf")
    ours = fusedtie.tied_conv2d(x, w, b, "square", padding=1)
    ref = torch.nn.functional.conv2d(x, w * w, b, padding=1)
    assert torch.equal(torch.isnan(ours), torch.isnan(ref)) and torch.equal(torch.isinf(ours), torch.isinf(ref))


# --- the module ----------------------------------------------------------------------------------


def test_source_must_be_a_conv2d():
    for bad in (nn.Linear(3, 3), nn.Conv1d(3, 3, 3), nn.ConvTranspose2d(3, 3, 3), torch.zeros(3, 3, 3, 3), None):
        with pytest.raises(TypeError, match="nn.Conv2d"):
            FusedTiedConv2d(bad)


def test_no_chains_or_cycles():
    layer = FusedTiedConv2d(nn.Conv2d(3, 3, 3))
    with pytest.raises(TypeError, match="another FusedTiedConv2d"):
        FusedTiedConv2d(layer)
    with pytest.raises(AttributeError, match="fixed at construction"):
        layer.source = nn.Conv2d(3, 3, 3)
    for name, value in (("stride", (2, 2)), ("padding", 1), ("transform", "exp"), ("groups", 3)):
        with pytest.raises(AttributeError, match=f"{name} is fixed at construction"):
            setattr(layer, name, value)


def test_seed_pair_cannot_tie():
    conv_1 = nn.Conv2d(in_channels=16, out_channels=32, kernel_size=3, padding=1)
    with pytest.raises(ValueError, match=r"in_channels=32 \(the tie gives 16\).*out_channels=64 \(the tie gives 32\)"):
        FusedTiedConv2d(conv_1, "square", in_channels=32, out_channels=64)
    # and used on conv_1's 32-channel output it says which channel count it expected
    tied = FusedTiedConv2d(conv_1, "square")
    with pytest.raises(ValueError, match="to have 16 channels, but got 32"):
        tied(conv_1(torch.randn(1, 16, 8, 8)))


def test_module_construction_errors():
    conv = nn.Conv2d(4, 6, 3)
    with pytest.raises(ValueError, match="unknown transform 'cube'; valid transforms"):
        FusedTiedConv2d(conv, "cube")
    with pytest.raises(ValueError, match="out_channels must be divisible by groups"):
        FusedTiedConv2d(conv, groups=4)
    with pytest.raises(ValueError, match="groups must be a positive integer"):
        FusedTiedConv2d(conv, groups=0)
    with pytest.raises(ValueError, match="the source has no bias"):
        FusedTiedConv2d(nn.Conv2d(4, 6, 3, bias=False), bias="transform")
    with pytest.raises(ValueError, match="bias must be"):
        FusedTiedConv2d(conv, bias="twice")
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        FusedTiedConv2d(conv, padding_mode="mirror")
    with pytest.raises(ValueError, match="padding='same' is not supported for strided"):
        FusedTiedConv2d(conv, padding="same", stride=2)
    with pytest.raises(ValueError, match="kernel_size"):
        FusedTiedConv2d(conv, kernel_size=5)
    with pytest.raises(ValueError, match="not initialised yet"):
        FusedTiedConv2d(nn.LazyConv2d(6, 3))
    with pytest.raises(ValueError, match="stride must be positive"):
        FusedTiedConv2d(conv, stride=0)


def test_source_without_bias_and_same_mode_has_no_bias():
    conv = nn.Conv2d(4, 6, 3, bias=False).double()
    layer = FusedTiedConv2d(conv, "square")  # "same" mirrors the source: no bias
    assert layer.bias is None
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), torch.nn.functional.conv2d(x, conv.weight**2))


def test_reflect_padding_larger_than_input_raises():
    layer = FusedTiedConv2d(nn.Conv2d(2, 2, 5, padding=4, padding_mode="reflect"))
    with pytest.raises(RuntimeError, match="[Pp]adding size should be less than"):
        layer(torch.randn(1, 2, 3, 3))


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_wrong_rank_through_module(padding_mode):
    layer = FusedTiedConv2d(nn.Conv2d(2, 2, 3, padding=1, padding_mode=padding_mode))
    with pytest.raises(ValueError, match="Expected 3D .unbatched. or 4D"):
        layer(torch.randn(1, 1, 2, 5, 5))


@pytest.mark.parametrize("shape", [(12, 3), (1, 1, 2, 5, 5)], ids=["2-D", "5-D"])
def test_wrong_rank_through_decoder_with_output_size(shape):
    """nn.ConvTranspose2d's output_size computation raises an IndexError on a 2-D input (found by
    the crash fuzzer); the decoder names the rank first."""
    layer = fusedtie.FusedTiedConvTranspose2d(nn.Conv2d(2, 4, (5, 1), padding=(0, 1), groups=2))
    with pytest.raises(ValueError, match="Expected 3D .unbatched. or 4D .batched. input to FusedTiedConvTranspose2d"):
        layer(torch.randn(shape), output_size=[25, 22])


@pytest.mark.parametrize("padding_mode", ["replicate", "circular", "reflect"])
def test_padding_past_64_bits_is_a_clear_error(padding_mode):
    """F.pad wraps the padded size past 2**63 and segfaults (torch 2.13, mode="replicate"; found by
    the crash fuzzer): the layer checks the size first."""
    layer = FusedTiedConv2d(nn.Conv2d(4, 1, (2, 3), padding=(0, 2**63 - 1), padding_mode=padding_mode))
    with pytest.raises(RuntimeError, match=r"pads the input of size \[1, 4, 11, 7\] by .* past what 64 bits can count"):
        layer(torch.randn(1, 4, 11, 7))


def test_wrong_channel_input_through_module_names_counts():
    layer = FusedTiedConv2d(nn.Conv2d(16, 16, 3))
    with pytest.raises(ValueError, match="expected input\\[1, 5, 8, 8\\] to have 16 channels, but got 5"):
        layer(torch.randn(1, 5, 8, 8))
