"""tied_conv1d and FusedTiedConv1d (the 2-d operator on an H = 1 view): forward and every gradient
over a grid and under each CPU algorithm, the module's semantics, bad input, torch.compile and
gradcheck, checkpoints and bake.

Every result is compared with F.conv1d on PyTorch's own f(W) in float64 (tests/reference.py's
reference_conv1d), never with fusedtie's own result.
"""

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference import reference_conv1d, reference_f, transform_arg

import fusedtie
from fusedtie import FusedTiedConv1d

TRANSFORMS = fusedtie.available_transforms()
F64 = dict(rtol=1e-9, atol=1e-9)


def _check_against_reference(x, w, b, transform, bias_transform="identity", dtype=torch.float64, **geometry):
    """tied_conv1d's output and its gradients with respect to x, W and b against the float64 oracle."""
    tol = F64 if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    x = x.to(dtype).requires_grad_(True)
    w = w.to(dtype).requires_grad_(True)
    b = None if b is None else b.to(dtype).requires_grad_(True)
    out = fusedtie.tied_conv1d(x, w, b, transform_arg(transform), transform_arg(bias_transform), **geometry)
    ref, ref_grads = reference_conv1d(x, w, b, transform, bias_transform, **geometry)
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, **tol)
    grad_out = torch.randn(ref.shape, dtype=torch.float64)
    inputs = [x, w] + ([b] if b is not None else [])
    grads = torch.autograd.grad(out, inputs, grad_out.to(dtype), allow_unused=True)
    for name, ours, theirs in zip(("input", "weight", "bias"), grads, ref_grads(grad_out)):
        ours = torch.zeros_like(theirs) if ours is None else ours.double()
        torch.testing.assert_close(ours, theirs, **tol, msg=lambda m, name=name: f"{name} gradient: {m}")


# --- the functional: forward and every gradient --------------------------------------------------


@pytest.mark.parametrize("bias_mode", ["same", "transform", None])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_every_transform_and_bias(transform, bias_mode):
    x = torch.randn(2, 4, 13, dtype=torch.float64)
    w = torch.randn(6, 4, 3, dtype=torch.float64) * 0.5
    b = None if bias_mode is None else torch.randn(6, dtype=torch.float64) * 0.5
    bias_transform = transform if bias_mode == "transform" else "identity"
    _check_against_reference(x, w, b, transform, bias_transform, padding=1)


def _geometry_grid():
    """stride x padding x dilation x groups x kernel, with the transform cycling; "same" only with
    stride 1 (F.conv1d's rule)."""
    params = []
    for stride in (1, 2, 3):
        for padding in (0, 2, "same", "valid", (1,)):
            if padding == "same" and stride != 1:
                continue
            for dilation in (1, 2):
                for groups in (1, 2):
                    for kernel in (1, 3, 4):
                        i = len(params)
                        transform = TRANSFORMS[i % len(TRANSFORMS)]
                        name = f"s{stride}-p{padding}-d{dilation}-g{groups}-k{kernel}-{transform}"
                        params.append(pytest.param(stride, padding, dilation, groups, kernel, transform, id=name))
    return params


@pytest.mark.parametrize("stride,padding,dilation,groups,kernel,transform", _geometry_grid())
def test_geometry_grid(stride, padding, dilation, groups, kernel, transform):
    x = torch.randn(2, 4, 15, dtype=torch.float64)
    w = torch.randn(6, 4 // groups, kernel, dtype=torch.float64) * 0.5
    b = torch.randn(6, dtype=torch.float64) * 0.5
    _check_against_reference(
        x, w, b, transform, "tanh", stride=stride, padding=padding, dilation=dilation, groups=groups
    )


@pytest.mark.parametrize("shape", [(0, 4, 9), (4, 9), (1, 4, 9)], ids=["batch0", "unbatched", "batch1"])
def test_batch_zero_and_unbatched(shape):
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(6, 2, 3, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    _check_against_reference(x, w, b, "square", "exp", padding="same", dilation=2, groups=2)


def test_non_contiguous_input_and_float32():
    x = torch.randn(2, 17, 4, dtype=torch.float64).transpose(1, 2)  # (N, C, L), L innermost no more
    w = torch.randn(6, 4, 5, dtype=torch.float64) * 0.5
    b = torch.randn(6, dtype=torch.float64)
    _check_against_reference(x, w, b, "softplus", stride=2, padding=2)
    _check_against_reference(x, w, b, "tanh", "tanh", dtype=torch.float32, padding="same")


def test_meta_tensors_give_conv1d_shapes():
    x = torch.empty(3, 8, 30, device="meta")
    w = torch.empty(16, 4, 5, device="meta")
    b = torch.empty(16, device="meta")
    for geometry in (dict(stride=2, padding="valid", groups=2), dict(padding="same", dilation=3, groups=2)):
        out = fusedtie.tied_conv1d(x, w, b, "tanh", **geometry)
        assert out.device.type == "meta" and out.shape == F.conv1d(x, w, b, **geometry).shape


# --- each CPU algorithm --------------------------------------------------------------------------

# (algorithm, input shape, weight shape, padding, stride, dilation, dtype); the forced algorithm applies
# to each (asserted through cpu_conv_algorithm_for on the H = 1 view), so each is really exercised.
_ALGORITHM_CASES = [
    ("auto", (2, 8, 40), (8, 8, 3), 1, 1, 1, torch.float64),
    ("auto", (1, 16, 30), (16, 1, 5), "same", 1, 1, torch.float64),
    ("library", (2, 8, 40), (12, 4, 3), "same", 1, 2, torch.float64),
    ("gemm", (2, 8, 40), (8, 8, 3), 1, 2, 1, torch.float64),
    ("gemm", (3, 6, 25), (5, 6, 4), "same", 1, 2, torch.float32),
    ("brgemm", (1, 8, 40), (8, 8, 3), 1, 1, 1, torch.float32),
    ("brgemm", (4, 8, 20), (16, 8, 1), 0, 2, 1, torch.float32),
    ("depthwise", (2, 8, 40), (8, 1, 3), 1, 1, 1, torch.float64),
    ("depthwise", (1, 8, 33), (16, 1, 4), "same", 1, 2, torch.float32),
]


@pytest.mark.parametrize("transform", ["square", "tanh"])
@pytest.mark.parametrize(
    "algorithm,x_shape,w_shape,padding,stride,dilation,dtype",
    _ALGORITHM_CASES,
    ids=[f"{c[0]}-{i}" for i, c in enumerate(_ALGORITHM_CASES)],
)
def test_each_cpu_algorithm(algorithm, x_shape, w_shape, padding, stride, dilation, dtype, transform):
    groups = x_shape[1] // w_shape[1]
    x = torch.randn(x_shape, dtype=torch.float64)
    w = torch.randn(w_shape, dtype=torch.float64) * 0.5
    b = torch.randn(w_shape[0], dtype=torch.float64)
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    with fusedtie.use_cpu_conv_algorithm(algorithm):
        if algorithm != "auto":
            pad = (0, padding) if isinstance(padding, int) else padding
            view = (x.to(dtype).unsqueeze(-2), w.to(dtype).unsqueeze(-2))
            for backward in (False, True):
                used = fusedtie.cpu_conv_algorithm_for(
                    *view, (1, stride), pad, (1, dilation), groups, transform=transform, backward=backward
                )
                assert used == algorithm, (used, backward)
        _check_against_reference(x, w, b, transform, "identity", dtype=dtype, **geometry)


# --- the module ----------------------------------------------------------------------------------


class TiedNet1d(nn.Module):
    """conv_2's weight is f(conv_1.weight): the seed's network in 1-d."""

    def __init__(self, transform="square", bias="same", padding_mode="zeros"):
        super().__init__()
        self.conv_1 = nn.Conv1d(6, 6, 3, padding=1, padding_mode=padding_mode)
        self.conv_2 = FusedTiedConv1d(self.conv_1, transform, bias)

    def forward(self, x):
        return self.conv_2(torch.relu(self.conv_1(x)))


def reference_net(net, x, transform="square", bias_transform="identity"):
    """TiedNet1d's forward in float64, with PyTorch's ops only (conv_1 is the oracle with f = identity)."""
    c = net.conv_1
    h, _ = reference_conv1d(x, c.weight, c.bias, "identity", padding=1, padding_mode=c.padding_mode)
    out, _ = reference_conv1d(
        torch.relu(h), c.weight, c.bias, transform, bias_transform, padding=1, padding_mode=c.padding_mode
    )
    return out


def test_parameters_and_state_dict_are_the_sources():
    net = TiedNet1d()
    params = list(net.parameters())
    assert len(params) == 2 and params[0] is net.conv_1.weight and params[1] is net.conv_1.bias
    assert list(net.conv_2.parameters(recurse=False)) == []
    assert list(net.state_dict()) == ["conv_1.weight", "conv_1.bias"]
    assert net.conv_2.source is net.conv_1
    alone = FusedTiedConv1d(nn.Conv1d(3, 4, 5), "exp")
    assert list(alone.state_dict()) == ["source.weight", "source.bias"]
    assert not isinstance(alone, nn.Conv1d)  # init loops reach the source only
    assert [m for m in net.modules() if isinstance(m, nn.Conv1d)] == [net.conv_1]


@pytest.mark.parametrize("bias_mode", ["same", "transform", None])
def test_module_forward_and_gradients_reach_the_source(bias_mode):
    conv = nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2).double()
    layer = FusedTiedConv1d(conv, "tanh", bias_mode)
    x = torch.randn(3, 4, 17, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    bias_transform = "tanh" if bias_mode == "transform" else "identity"
    bias = None if bias_mode is None else conv.bias
    ref, ref_grads = reference_conv1d(x, conv.weight, bias, "tanh", bias_transform, 2, 2, 2, 2)
    torch.testing.assert_close(out, ref, **F64)
    grad_out = torch.randn(ref.shape, dtype=torch.float64)
    out.backward(grad_out)
    gx, gw, gb = ref_grads(grad_out)
    torch.testing.assert_close(x.grad, gx, **F64)
    torch.testing.assert_close(conv.weight.grad, gw, **F64)
    if bias_mode is None:
        assert conv.bias.grad is None
    else:
        torch.testing.assert_close(conv.bias.grad, gb, **F64)


@pytest.mark.parametrize("padding", [1, "same", "valid"], ids=str)
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_padding_modes_same_valid_and_unbatched(padding_mode, padding):
    kernel = 4 if padding == "same" else 3  # an even "same" kernel puts the odd element on the right
    conv = nn.Conv1d(3, 5, kernel, padding=padding, dilation=1, padding_mode=padding_mode).double()
    layer = FusedTiedConv1d(conv, "square")
    assert layer.padding_mode == padding_mode and layer.padding == conv.padding
    x = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    ref, ref_grads = reference_conv1d(x, conv.weight, conv.bias, "square", padding=padding, padding_mode=padding_mode)
    out = layer(x)
    torch.testing.assert_close(out, ref, **F64)
    grad_out = torch.randn(ref.shape, dtype=torch.float64)
    out.backward(grad_out)
    gx, gw, gb = ref_grads(grad_out)
    for ours, theirs in ((x.grad, gx), (conv.weight.grad, gw), (conv.bias.grad, gb)):
        torch.testing.assert_close(ours, theirs, **F64)
    torch.testing.assert_close(layer(x[0]), ref[0], **F64)  # unbatched
    plain = layer.to_conv1d()
    assert type(plain) is nn.Conv1d and plain.padding_mode == padding_mode
    torch.testing.assert_close(plain(x), ref, **F64)


def test_geometry_overrides_and_same_with_dilation():
    conv = nn.Conv1d(4, 6, 3).double()
    layer = FusedTiedConv1d(conv, "abs", stride=2, padding=(3,), dilation=2, groups=2)
    assert layer.in_channels == 8 and layer.out_channels == 6 and layer.kernel_size == (3,)
    assert (layer.stride, layer.padding, layer.dilation, layer.groups) == ((2,), (3,), (2,), 2)
    x = torch.randn(2, 8, 21, dtype=torch.float64)
    ref, _ = reference_conv1d(x, conv.weight, conv.bias, "abs", stride=2, padding=3, dilation=2, groups=2)
    torch.testing.assert_close(layer(x), ref, **F64)
    same = FusedTiedConv1d(conv, "abs", padding="same", dilation=3, padding_mode="reflect")
    x = torch.randn(2, 4, 12, dtype=torch.float64)
    ref, _ = reference_conv1d(x, conv.weight, conv.bias, "abs", padding="same", dilation=3, padding_mode="reflect")
    torch.testing.assert_close(same(x), ref, **F64)


def test_to_dtype_deepcopy_and_cached_keep_the_tie():
    net = TiedNet1d("exp").double()
    assert net.conv_1.weight.dtype == torch.float64 and net.conv_2.source is net.conv_1
    x = torch.randn(2, 6, 10, dtype=torch.float64)
    torch.testing.assert_close(net(x), reference_net(net, x, "exp"), **F64)
    net.to(torch.float32)
    assert net(x.float()).dtype == torch.float32
    torch.testing.assert_close(net(x.float()).double(), reference_net(net, x, "exp"), rtol=1e-4, atol=1e-4)

    clone = copy.deepcopy(net).double()
    assert clone.conv_2.source is clone.conv_1 and clone.conv_1 is not net.conv_1
    with torch.no_grad():
        clone.conv_1.weight.mul_(0.5)
    torch.testing.assert_close(clone(x), reference_net(clone, x, "exp"), **F64)
    assert not torch.equal(net.conv_1.weight.double(), clone.conv_1.weight)

    with fusedtie.cached(), torch.no_grad():
        first = clone(x)
        clone.conv_1.weight.add_(0.25)  # an in-place change the cache must see
        second = clone(x)
    torch.testing.assert_close(second, reference_net(clone, x, "exp"), **F64)
    assert not torch.allclose(first, second)


def test_whole_model_save_load_and_state_dict_round_trip():
    net = TiedNet1d("softplus", "transform", padding_mode="circular").double()
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.conv_2) is FusedTiedConv1d and loaded.conv_2.source is loaded.conv_1
    x = torch.randn(2, 6, 9, dtype=torch.float64)
    expected = reference_net(net, x, "softplus", "softplus")
    torch.testing.assert_close(loaded(x), expected, **F64)
    with torch.no_grad():  # still tied after loading: a change of the source shows in the tied layer
        loaded.conv_1.weight.neg_()
    torch.testing.assert_close(loaded(x), reference_net(loaded, x, "softplus", "softplus"), **F64)

    fresh = TiedNet1d("softplus", "transform", padding_mode="circular").double()
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))  # strict: only the source's keys
    torch.testing.assert_close(fresh(x), expected, **F64)
    alone = FusedTiedConv1d(nn.Conv1d(6, 6, 3).double(), "neg")
    other = FusedTiedConv1d(nn.Conv1d(6, 6, 3).double(), "neg")
    other.load_state_dict(alone.state_dict())
    torch.testing.assert_close(other.source.weight, alone.source.weight)


def test_bake_gives_conv1d_equal_to_the_reference():
    net = TiedNet1d("sigmoid", "transform", padding_mode="replicate").double()
    baked = fusedtie.bake(net)
    assert type(baked.conv_2) is nn.Conv1d and baked.conv_1 is not net.conv_1
    assert baked.conv_2.padding_mode == "replicate"
    torch.testing.assert_close(baked.conv_2.weight, torch.sigmoid(net.conv_1.weight), **F64)
    x = torch.randn(2, 6, 10, dtype=torch.float64)
    torch.testing.assert_close(baked(x), reference_net(net, x, "sigmoid", "sigmoid"), **F64)
    assert type(fusedtie.bake(FusedTiedConv1d(nn.Conv1d(2, 3, 3), "abs"))) is nn.Conv1d
    assert list(baked.state_dict()) == ["conv_1.weight", "conv_1.bias", "conv_2.weight", "conv_2.bias"]


def test_repr_and_fixed_attributes():
    layer = FusedTiedConv1d(
        nn.Conv1d(4, 4, 3, padding=1), fusedtie.Transform("scale", alpha=0.5), bias="transform", stride=2
    )
    text = repr(layer)
    for piece in ("transform=scale(alpha=0.5)", "bias='transform'", "stride=(2,)", "padding=(1,)"):
        assert piece in text, text
    assert "dilation" not in text and "groups" not in text  # their defaults are not shown
    for name, value in (("stride", (2,)), ("padding", 1), ("transform", "exp"), ("source", nn.Conv1d(4, 4, 3))):
        with pytest.raises(AttributeError, match=f"{name} is fixed at construction"):
            setattr(layer, name, value)
    with pytest.raises(AttributeError, match="derived"):
        layer.weight = nn.Parameter(torch.zeros(4, 4, 3))
    with pytest.raises(RuntimeError, match="FusedTiedConv1d owns no parameters"):
        layer.reset_parameters()


# --- bad input -----------------------------------------------------------------------------------


def _op_cases(device):
    x = torch.randn(2, 4, 8, device=device)
    w = torch.randn(6, 4, 3, device=device)
    b = torch.randn(6, device=device)
    op = fusedtie.tied_conv1d
    return [
        (
            "4-D input",
            lambda: op(x[None], w, b),
            ValueError,
            r"Expected 2D \(unbatched\) or 3D \(batched\) input to "
            r"tied_conv1d, but got input of size: \[1, 2, 4, 8\]",
        ),
        ("1-D input", lambda: op(x[0, 0], w, b), ValueError, r"Expected 2D .* size: \[8\]"),
        ("4-D weight", lambda: op(x, w[..., None], b), ValueError, r"expected a 3-D weight .*size \[6, 4, 3, 1\]"),
        (
            "in-channel mismatch",
            lambda: op(x[:, :3], w, b),
            ValueError,
            r"Given groups=1, weight of size \[6, 4, 3\], expected input\[2, 3, 8\] to have 4 channels, but got 3 "
            r"channels instead",
        ),
        (
            "unbatched in-channel mismatch",
            lambda: op(x[0, :3], w, b),
            ValueError,
            r"expected input\[3, 8\] to have 4 channels, but got 3",
        ),
        (
            "groups do not divide",
            lambda: op(x, w[:5, :1], None, groups=4),
            ValueError,
            r"\(5\) must be divisible by groups \(4\)",
        ),
        ("zero groups", lambda: op(x, w, b, groups=0), ValueError, "groups must be a positive integer, got 0"),
        (
            "stride pair",
            lambda: op(x, w, b, stride=(1, 1)),
            TypeError,
            r"stride must be an int or a sequence of one int, got \(1, 1\)",
        ),
        (
            "padding pair",
            lambda: op(x, w, b, padding=[1, 1]),
            TypeError,
            "padding must be an int or a sequence of one int",
        ),
        ("dilation float", lambda: op(x, w, b, dilation=1.0), TypeError, "dilation must be an int"),
        ("zero stride", lambda: op(x, w, b, stride=0), ValueError, r"stride must be positive, got \[0\]"),
        (
            "negative padding",
            lambda: op(x, w, b, padding=-1),
            ValueError,
            r"negative padding is not supported, got \[-1\]",
        ),
        (
            "same with stride",
            lambda: op(x, w, b, padding="same", stride=2),
            ValueError,
            "padding='same' is not supported",
        ),
        ("bad padding string", lambda: op(x, w, b, padding="full"), ValueError, "Invalid padding string 'full'"),
        (
            "kernel with no taps",
            lambda: op(x, w[..., :0], b),
            ValueError,
            r"at least 1, got weight of size \[6, 4, 0\]",
        ),
        ("kernel larger than input", lambda: op(x[..., :2], w, b), ValueError, "Kernel size can't be greater"),
        ("dtype mismatch", lambda: op(x.double(), w, b), TypeError, "same dtype"),
        ("bias of wrong size", lambda: op(x, w, b[:5]), ValueError, r"expected bias of size \[6\]"),
        ("unknown transform", lambda: op(x, w, b, "cube"), ValueError, "unknown transform 'cube'"),
    ]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("case", range(len(_op_cases("cpu"))), ids=[c[0] for c in _op_cases("cpu")])
def test_op_bad_input(case, device):
    name, call, exc, pattern = _op_cases(device)[case]
    with pytest.raises(exc, match=pattern):
        call()


def test_source_must_be_a_conv1d():
    for bad in (nn.Conv2d(3, 3, 3), nn.Linear(3, 3), nn.ConvTranspose1d(3, 3, 3), torch.zeros(3, 3, 3), None):
        with pytest.raises(TypeError, match="FusedTiedConv1d ties to an nn.Conv1d source"):
            FusedTiedConv1d(bad)
    with pytest.raises(TypeError, match="not a transposed one"):
        FusedTiedConv1d(nn.ConvTranspose1d(3, 3, 3))
    layer = FusedTiedConv1d(nn.Conv1d(3, 3, 3))
    with pytest.raises(TypeError, match="must be an nn.Conv1d that owns its parameters, got another FusedTiedConv1d"):
        FusedTiedConv1d(layer)
    with pytest.raises(TypeError, match="ties to an nn.Conv2d source, got Conv1d"):
        fusedtie.FusedTiedConv2d(nn.Conv1d(3, 3, 3))


def test_module_construction_errors():
    conv = nn.Conv1d(4, 6, 3)
    with pytest.raises(ValueError, match=r"in_channels=5 \(the tie gives 4\).*kernel_size=5 \(the tie gives \(3,\)\)"):
        FusedTiedConv1d(conv, in_channels=5, kernel_size=5)
    with pytest.raises(ValueError, match="out_channels must be divisible by groups"):
        FusedTiedConv1d(conv, groups=4)
    with pytest.raises(ValueError, match="padding='same' is not supported for strided"):
        FusedTiedConv1d(conv, padding="same", stride=2)
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        FusedTiedConv1d(conv, padding_mode="mirror")
    with pytest.raises(ValueError, match="the source has no bias"):
        FusedTiedConv1d(nn.Conv1d(4, 6, 3, bias=False), bias="transform")
    with pytest.raises(ValueError, match=r"stride must be positive, got \[0\]"):
        FusedTiedConv1d(conv, stride=0)
    with pytest.raises(TypeError, match="stride must be an int or a sequence of one int"):
        FusedTiedConv1d(conv, stride=(1, 1))
    with pytest.raises(ValueError, match="not initialised yet"):
        FusedTiedConv1d(nn.LazyConv1d(6, 3))
    FusedTiedConv1d(conv, in_channels=4, out_channels=6, kernel_size=(3,))  # what the tie gives is fine


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_wrong_rank_and_channels_through_the_module(padding_mode):
    layer = FusedTiedConv1d(nn.Conv1d(16, 16, 3, padding=1, padding_mode=padding_mode))
    with pytest.raises(
        ValueError, match=r"Expected 2D \(unbatched\) or 3D \(batched\) input to (FusedTiedConv1d|tied_conv1d)"
    ):
        layer(torch.randn(1, 16, 5, 5))
    with pytest.raises(ValueError, match=r"expected input\[1, 5, (8|10)\] to have 16 channels, but got 5 channels"):
        layer(torch.randn(1, 5, 8))


# --- torch.compile, gradcheck ----------------------------------------------------------------------


@pytest.mark.parametrize("transform", ["square", "tanh"])
def test_torch_compile_fullgraph_matches_eager_and_reference(transform):
    torch._dynamo.reset()
    net = TiedNet1d(transform, "transform")
    x = torch.randn(2, 6, 12, requires_grad=True)
    eager_out = net(x)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), [x, *net.parameters()])
    compiled = torch.compile(net, fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *net.parameters()])
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    x64 = x.detach().double().requires_grad_(True)
    w64 = net.conv_1.weight.detach().double().requires_grad_(True)
    b64 = net.conv_1.bias.detach().double().requires_grad_(True)
    h = torch.relu(F.conv1d(x64, w64, b64, padding=1))
    ref = F.conv1d(h, reference_f(transform, w64), reference_f(transform, b64), padding=1)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x64, w64, b64])
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("transform", ["square", "softplus", "scale"])
def test_gradcheck_float64(transform):
    x = torch.randn(2, 4, 9, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(6, 2, 3, dtype=torch.float64) * 0.5).requires_grad_(True)
    b = (torch.randn(6, dtype=torch.float64) * 0.5).requires_grad_(True)
    t = transform_arg(transform)

    def strided(x, w, b):
        return fusedtie.tied_conv1d(x, w, b, t, t, stride=2, padding=1, dilation=2, groups=2)

    def same(x, w, b):
        return fusedtie.tied_conv1d(x[0], w, b, t, "identity", padding="same", groups=2)  # unbatched

    assert torch.autograd.gradcheck(strided, (x, w, b))
    assert torch.autograd.gradcheck(same, (x, w, b))
