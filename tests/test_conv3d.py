"""tied_conv3d and FusedTiedConv3d: forward and every gradient over a grid (layouts, dtypes, batch 0,
unbatched input, the library's large-stride rewrite), the module's semantics, bad input, opcheck,
torch.compile, gradcheck, autocast and checkpoints.

Every result is compared with F.conv3d on PyTorch's own f(W) in float64 (tests/reference.py's
reference_conv3d), never with fusedtie's own result.
"""

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference import reference_conv3d, reference_f, transform_arg

import fusedtie
from fusedtie import FusedTiedConv3d

TRANSFORMS = fusedtie.available_transforms()
F64 = dict(rtol=1e-9, atol=1e-9)


def _check_against_reference(
    x, w, b, transform, bias_transform="identity", dtype=torch.float64, memory_format=None, **geometry
):
    """tied_conv3d's output and its gradients with respect to x, W and b against the float64 oracle."""
    tol = F64 if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    x = x.to(dtype)
    w = w.to(dtype)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
        w = w.contiguous(memory_format=memory_format)
    x.requires_grad_(True)
    w.requires_grad_(True)
    b = None if b is None else b.to(dtype).requires_grad_(True)
    out = fusedtie.tied_conv3d(x, w, b, transform_arg(transform), transform_arg(bias_transform), **geometry)
    ref, ref_grads = reference_conv3d(x, w, b, transform, bias_transform, **geometry)
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, **tol)
    grad_out = torch.randn(ref.shape, dtype=torch.float64)
    inputs = [x, w] + ([b] if b is not None else [])
    grads = torch.autograd.grad(out, inputs, grad_out.to(dtype), allow_unused=True)
    for name, ours, theirs in zip(("input", "weight", "bias"), grads, ref_grads(grad_out)):
        ours = torch.zeros_like(theirs) if ours is None else ours.double()
        torch.testing.assert_close(ours, theirs, **tol, msg=lambda m, name=name: f"{name} gradient: {m}")
    return out, grads


# --- the functional: forward and every gradient --------------------------------------------------


@pytest.mark.parametrize("bias_mode", ["same", "transform", None])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_every_transform_and_bias(transform, bias_mode):
    x = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 2, 3, dtype=torch.float64) * 0.5
    b = None if bias_mode is None else torch.randn(4, dtype=torch.float64) * 0.5
    bias_transform = transform if bias_mode == "transform" else "identity"
    _check_against_reference(x, w, b, transform, bias_transform, padding=1)


def _geometry_grid():
    """stride x padding x dilation x groups x kernel, with the transform cycling; "same" only with
    stride 1 (F.conv3d's rule); the even kernel makes "same" asymmetric."""
    params = []
    for stride in (1, 2, (1, 2, 3)):
        for padding in (0, 1, "same", "valid", (2, 0, 1)):
            if padding == "same" and stride != 1:
                continue
            for dilation in (1, (2, 1, 2)):
                for groups in (1, 2):
                    for kernel in ((1, 1, 1), (3, 3, 3), (2, 3, 4)):
                        i = len(params)
                        transform = TRANSFORMS[i % len(TRANSFORMS)]
                        name = f"s{stride}-p{padding}-d{dilation}-g{groups}-k{kernel}-{transform}".replace(" ", "")
                        params.append(pytest.param(stride, padding, dilation, groups, kernel, transform, id=name))
    return params


@pytest.mark.parametrize("stride,padding,dilation,groups,kernel,transform", _geometry_grid())
def test_geometry_grid(stride, padding, dilation, groups, kernel, transform):
    x = torch.randn(2, 4, 7, 8, 9, dtype=torch.float64)
    w = torch.randn(6, 4 // groups, *kernel, dtype=torch.float64) * 0.5
    b = torch.randn(6, dtype=torch.float64) * 0.5
    _check_against_reference(
        x, w, b, transform, "tanh", stride=stride, padding=padding, dilation=dilation, groups=groups
    )


@pytest.mark.parametrize(
    "shape", [(0, 4, 5, 5, 5), (4, 5, 5, 5), (1, 4, 5, 5, 5)], ids=["batch0", "unbatched", "batch1"]
)
def test_batch_zero_and_unbatched(shape):
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(6, 2, 2, 3, 2, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    _check_against_reference(x, w, b, "square", "exp", padding="same", dilation=2, groups=2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("padding", [1, "same"])
def test_channels_last_3d_keeps_the_layout(padding, dtype):
    x = torch.randn(2, 8, 5, 6, 7, dtype=torch.float64)
    w = torch.randn(8, 4, 3, 2, 3, dtype=torch.float64) * 0.5
    b = torch.randn(8, dtype=torch.float64)
    cl = torch.channels_last_3d
    out, (gx, gw, _) = _check_against_reference(
        x, w, b, "tanh", "identity", dtype=dtype, memory_format=cl, padding=padding, groups=2
    )
    # The output is laid out as the library's own F.conv3d lays it out (channels_last_3d in float32;
    # oneDNN's float64 path gives a contiguous output); the gradients take their tensors' layout.
    own = F.conv3d(x.to(dtype).contiguous(memory_format=cl), w.to(dtype).contiguous(memory_format=cl), groups=2)
    assert out.is_contiguous(memory_format=cl) == own.is_contiguous(memory_format=cl)
    assert out.is_contiguous(memory_format=cl) or dtype == torch.float64
    assert gx.is_contiguous(memory_format=cl) and gw.is_contiguous(memory_format=cl)


def test_non_contiguous_input_and_float32():
    x = torch.randn(2, 6, 7, 5, 4, dtype=torch.float64).permute(0, 4, 3, 2, 1)  # (N, C, D, H, W), strided
    assert not x.is_contiguous()
    w = torch.randn(6, 4, 3, 3, 3, dtype=torch.float64).transpose(2, 4) * 0.5
    b = torch.randn(6, dtype=torch.float64)
    _check_against_reference(x, w, b, "softplus", stride=2, padding=2)
    _check_against_reference(x, w, b, "tanh", "tanh", dtype=torch.float32, padding="same")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_pytorchs_own_error(dtype):
    # The accuracy rule: fusedtie's error against float64 at most 2x that of PyTorch's own
    # same-dtype F.conv3d(x, f(W)) (plus a little slack for outputs where PyTorch happens to be exact).
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 6, 6, dtype=torch.float64)
    w = torch.randn(8, 8, 3, 3, 3, dtype=torch.float64) * 0.2
    b = torch.randn(8, dtype=torch.float64)
    ours = fusedtie.tied_conv3d(x.to(dtype), w.to(dtype), b.to(dtype), "tanh", padding=1)
    ref, _ = reference_conv3d(x.to(dtype), w.to(dtype), b.to(dtype), "tanh", padding=1)
    theirs = F.conv3d(x.to(dtype), torch.tanh(w.to(dtype)), b.to(dtype), padding=1)
    assert ours.dtype == dtype
    err_ours = (ours.double() - ref).abs().max().item()
    err_theirs = (theirs.double() - ref).abs().max().item()
    assert err_ours <= 2 * err_theirs + 1e-3, (err_ours, err_theirs)


@pytest.mark.parametrize(
    "stride,kernel,size",
    [((1, 1, 1100), (1, 2, 3), (3, 4, 2300)), ((1030, 2, 1), (2, 1, 1), (2100, 3, 3))],
    ids=["along-W", "along-D"],
)
def test_large_strides_take_the_window_rewrite(stride, kernel, size):
    # Strides of 1024 or more beyond the kernel's extent: the library gathers the windows
    # (library_conv.h) rather than give oneDNN a stride it mishandles.
    x = torch.randn(1, 2, *size, dtype=torch.float64)
    w = torch.randn(3, 2, *kernel, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)
    _check_against_reference(x, w, b, "square", stride=stride, padding=(1, 0, 2))
    _check_against_reference(x, w, b, "abs", dtype=torch.float32, stride=stride, padding=(1, 0, 2))


def test_meta_tensors_give_conv3d_shapes():
    x = torch.empty(3, 8, 9, 10, 11, device="meta")
    w = torch.empty(16, 4, 3, 4, 5, device="meta")
    b = torch.empty(16, device="meta")
    for geometry in (
        dict(stride=2, padding="valid", groups=2),
        dict(padding="same", dilation=(1, 2, 3), groups=2),
        dict(stride=(1, 2, 3), padding=(0, 1, 2), groups=2),
    ):
        out = fusedtie.tied_conv3d(x, w, b, "tanh", **geometry)
        assert out.device.type == "meta" and out.shape == F.conv3d(x, w, b, **geometry).shape


def test_the_eager_binding_and_torch_ops_agree():
    x = torch.randn(2, 4, 5, 6, 7, dtype=torch.float64)
    w = torch.randn(6, 4, 2, 3, 2, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    args = ("exp", 1.0, "identity", 1.0, [1, 1, 1], [0, 1, 1, 1, 0, 1], [1, 1, 1], 1)
    eager = fusedtie._LIB.tied_conv3d_eager(x, w, b, *args)
    dispatched = torch.ops.fusedtie.tied_conv3d(x, w, b, *args)
    ref, _ = reference_conv3d(x, w, b, "exp", padding="same")
    torch.testing.assert_close(eager, ref, **F64)
    torch.testing.assert_close(dispatched, ref, **F64)


# --- the module ----------------------------------------------------------------------------------


class TiedNet3d(nn.Module):
    """conv_2's weight is f(conv_1.weight): the seed's network in 3-d."""

    def __init__(self, transform="square", bias="same", padding_mode="zeros"):
        super().__init__()
        self.conv_1 = nn.Conv3d(4, 4, 3, padding=1, padding_mode=padding_mode)
        self.conv_2 = FusedTiedConv3d(self.conv_1, transform, bias)

    def forward(self, x):
        return self.conv_2(torch.relu(self.conv_1(x)))


def reference_net(net, x, transform="square", bias_transform="identity"):
    """TiedNet3d's forward in float64, with PyTorch's ops only (conv_1 is the oracle with f = identity)."""
    c = net.conv_1
    h, _ = reference_conv3d(x, c.weight, c.bias, "identity", padding=1, padding_mode=c.padding_mode)
    out, _ = reference_conv3d(
        torch.relu(h), c.weight, c.bias, transform, bias_transform, padding=1, padding_mode=c.padding_mode
    )
    return out


def test_parameters_and_state_dict_are_the_sources():
    net = TiedNet3d()
    params = list(net.parameters())
    assert len(params) == 2 and params[0] is net.conv_1.weight and params[1] is net.conv_1.bias
    assert list(net.conv_2.parameters(recurse=False)) == []
    assert list(net.state_dict()) == ["conv_1.weight", "conv_1.bias"]
    assert net.conv_2.source is net.conv_1
    alone = FusedTiedConv3d(nn.Conv3d(3, 4, 2), "exp")
    assert list(alone.state_dict()) == ["source.weight", "source.bias"]
    assert not isinstance(alone, nn.Conv3d)  # init loops reach the source only
    assert [m for m in net.modules() if isinstance(m, nn.Conv3d)] == [net.conv_1]
    assert fusedtie.nn.FusedTiedConv3d is FusedTiedConv3d and "FusedTiedConv3d" in fusedtie.nn.__all__


@pytest.mark.parametrize("bias_mode", ["same", "transform", None])
def test_module_forward_and_gradients_reach_the_source(bias_mode):
    conv = nn.Conv3d(4, 6, (2, 3, 3), stride=(1, 2, 2), padding=(1, 2, 0), dilation=(1, 2, 1), groups=2).double()
    layer = FusedTiedConv3d(conv, "tanh", bias_mode)
    x = torch.randn(2, 4, 5, 9, 8, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    bias_transform = "tanh" if bias_mode == "transform" else "identity"
    bias = None if bias_mode is None else conv.bias
    geometry = dict(stride=(1, 2, 2), padding=(1, 2, 0), dilation=(1, 2, 1), groups=2)
    ref, ref_grads = reference_conv3d(x, conv.weight, bias, "tanh", bias_transform, **geometry)
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


@pytest.mark.parametrize("padding", [1, (0, 1, 2), "same", "valid"], ids=str)
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_padding_modes_same_valid_and_unbatched(padding_mode, padding):
    kernel = (2, 3, 4) if padding == "same" else 3  # an even "same" kernel puts the odd element last
    conv = nn.Conv3d(3, 5, kernel, padding=padding, padding_mode=padding_mode).double()
    layer = FusedTiedConv3d(conv, "square")
    assert layer.padding_mode == padding_mode and layer.padding == conv.padding
    x = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    ref, ref_grads = reference_conv3d(x, conv.weight, conv.bias, "square", padding=padding, padding_mode=padding_mode)
    out = layer(x)
    torch.testing.assert_close(out, ref, **F64)
    grad_out = torch.randn(ref.shape, dtype=torch.float64)
    out.backward(grad_out)
    gx, gw, gb = ref_grads(grad_out)
    for ours, theirs in ((x.grad, gx), (conv.weight.grad, gw), (conv.bias.grad, gb)):
        torch.testing.assert_close(ours, theirs, **F64)
    torch.testing.assert_close(layer(x[0]), ref[0], **F64)  # unbatched
    plain = layer.to_conv3d()
    assert type(plain) is nn.Conv3d and plain.padding_mode == padding_mode
    torch.testing.assert_close(plain(x), ref, **F64)
    torch.testing.assert_close(plain(x), conv.double()._conv_forward(x, conv.weight.square(), conv.bias), **F64)


def test_geometry_overrides_and_same_with_dilation():
    conv = nn.Conv3d(4, 6, 3).double()
    layer = FusedTiedConv3d(conv, "abs", stride=(2, 1, 2), padding=(3,), dilation=2, groups=2)
    assert layer.in_channels == 8 and layer.out_channels == 6 and layer.kernel_size == (3, 3, 3)
    assert (layer.stride, layer.padding, layer.dilation, layer.groups) == ((2, 1, 2), (3, 3, 3), (2, 2, 2), 2)
    x = torch.randn(2, 8, 6, 7, 8, dtype=torch.float64)
    ref, _ = reference_conv3d(x, conv.weight, conv.bias, "abs", stride=(2, 1, 2), padding=3, dilation=2, groups=2)
    torch.testing.assert_close(layer(x), ref, **F64)
    same = FusedTiedConv3d(conv, "abs", padding="same", dilation=(1, 2, 3), padding_mode="reflect")
    x = torch.randn(2, 4, 5, 6, 7, dtype=torch.float64)
    ref, _ = reference_conv3d(
        x, conv.weight, conv.bias, "abs", padding="same", dilation=(1, 2, 3), padding_mode="reflect"
    )
    torch.testing.assert_close(same(x), ref, **F64)


def test_default_transform_is_identity_and_derived_tensors():
    conv = nn.Conv3d(2, 3, 2).double()
    layer = FusedTiedConv3d(conv)
    assert layer.transform.name == "identity"
    x = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), **F64)
    squared = FusedTiedConv3d(conv, "square", bias="transform")
    torch.testing.assert_close(squared.weight, conv.weight.square(), **F64)
    torch.testing.assert_close(squared.bias, conv.bias.square(), **F64)
    assert FusedTiedConv3d(conv, bias=None).bias is None


def test_to_dtype_deepcopy_and_cached_keep_the_tie():
    net = TiedNet3d("exp").double()
    assert net.conv_1.weight.dtype == torch.float64 and net.conv_2.source is net.conv_1
    x = torch.randn(2, 4, 4, 5, 3, dtype=torch.float64)
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
    net = TiedNet3d("softplus", "transform", padding_mode="circular").double()
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.conv_2) is FusedTiedConv3d and loaded.conv_2.source is loaded.conv_1
    x = torch.randn(2, 4, 3, 4, 5, dtype=torch.float64)
    expected = reference_net(net, x, "softplus", "softplus")
    torch.testing.assert_close(loaded(x), expected, **F64)
    with torch.no_grad():  # still tied after loading: a change of the source shows in the tied layer
        loaded.conv_1.weight.neg_()
    torch.testing.assert_close(loaded(x), reference_net(loaded, x, "softplus", "softplus"), **F64)

    fresh = TiedNet3d("softplus", "transform", padding_mode="circular").double()
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))  # strict: only the source's keys
    torch.testing.assert_close(fresh(x), expected, **F64)
    alone = FusedTiedConv3d(nn.Conv3d(4, 4, 3).double(), "neg")
    other = FusedTiedConv3d(nn.Conv3d(4, 4, 3).double(), "neg")
    other.load_state_dict(alone.state_dict())
    torch.testing.assert_close(other.source.weight, alone.source.weight)


@pytest.mark.parametrize("layout", ["source first", "alone"])
def test_meta_construction_then_to_empty_and_load_keeps_the_tie(layout):
    def make():
        conv = nn.Conv3d(3, 3, 3, padding=1)
        tied = FusedTiedConv3d(conv, "tanh", bias="transform")
        return nn.ModuleDict({"conv_1": conv, "conv_2": tied}) if layout == "source first" else tied

    trained = make()
    with torch.device("meta"):
        net = make()
    assert list(net.state_dict()) == list(trained.state_dict())
    net.to_empty(device="cpu")
    net.load_state_dict(trained.state_dict())  # strict
    layer = net["conv_2"] if layout == "source first" else net
    source = layer.source
    assert [id(p) for p in net.parameters()] == [id(source.weight), id(source.bias)]
    x = torch.randn(2, 3, 4, 4, 4)
    ref, _ = reference_conv3d(x, source.weight, source.bias, "tanh", "tanh", padding=1)
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_safetensors_round_trip(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    net, fresh = TiedNet3d("square"), TiedNet3d("square")
    path = tmp_path / "net.safetensors"
    safetensors_torch.save_model(net, path)
    missing, unexpected = safetensors_torch.load_model(fresh, path)  # strict
    assert not missing and not unexpected and fresh.conv_2.source is fresh.conv_1
    x = torch.randn(1, 4, 3, 4, 5)
    torch.testing.assert_close(fresh(x).double(), reference_net(net, x, "square"), rtol=1e-5, atol=1e-5)


def test_bake_gives_conv3d_equal_to_the_reference():
    net = TiedNet3d("sigmoid", "transform", padding_mode="replicate").double()
    baked = fusedtie.bake(net)
    assert type(baked.conv_2) is nn.Conv3d and baked.conv_1 is not net.conv_1
    assert baked.conv_2.padding_mode == "replicate"
    torch.testing.assert_close(baked.conv_2.weight, torch.sigmoid(net.conv_1.weight), **F64)
    x = torch.randn(2, 4, 3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(baked(x), reference_net(net, x, "sigmoid", "sigmoid"), **F64)
    assert type(fusedtie.bake(FusedTiedConv3d(nn.Conv3d(2, 3, 3), "abs"))) is nn.Conv3d
    assert list(baked.state_dict()) == ["conv_1.weight", "conv_1.bias", "conv_2.weight", "conv_2.bias"]


def test_repr_and_fixed_attributes():
    layer = FusedTiedConv3d(
        nn.Conv3d(4, 4, 3, padding=1), fusedtie.Transform("scale", alpha=0.5), bias="transform", stride=2
    )
    text = repr(layer)
    for piece in ("transform=scale(alpha=0.5)", "bias='transform'", "stride=(2, 2, 2)", "padding=(1, 1, 1)"):
        assert piece in text, text
    assert "dilation" not in text and "groups" not in text  # their defaults are not shown
    for name, value in (("stride", (2, 2, 2)), ("padding", 1), ("transform", "exp"), ("source", nn.Conv3d(4, 4, 3))):
        with pytest.raises(AttributeError, match=f"{name} is fixed at construction"):
            setattr(layer, name, value)
    with pytest.raises(AttributeError, match="derived"):
        layer.weight = nn.Parameter(torch.zeros(4, 4, 3, 3, 3))
    with pytest.raises(RuntimeError, match="FusedTiedConv3d owns no parameters"):
        layer.reset_parameters()


# --- bad input -----------------------------------------------------------------------------------


def _op_cases(device):
    x = torch.randn(2, 4, 5, 6, 7, device=device)
    w = torch.randn(6, 4, 3, 3, 3, device=device)
    b = torch.randn(6, device=device)
    op = fusedtie.tied_conv3d
    raw = torch.ops.fusedtie.tied_conv3d
    rest = ("identity", 1.0, "identity", 1.0)
    return [
        (
            "6-D input",
            lambda: op(x[None], w, b),
            ValueError,
            r"Expected 4D \(unbatched\) or 5D \(batched\) input to tied_conv3d, but got input of size: "
            r"\[1, 2, 4, 5, 6, 7\]",
        ),
        ("3-D input", lambda: op(x[0, 0], w, b), ValueError, r"Expected 4D .* size: \[5, 6, 7\]"),
        ("4-D weight", lambda: op(x, w[..., 0], b), ValueError, r"expected a 5-D weight .*size \[6, 4, 3, 3\]"),
        (
            "in-channel mismatch",
            lambda: op(x[:, :3], w, b),
            ValueError,
            r"Given groups=1, weight of size \[6, 4, 3, 3, 3\], expected input\[2, 3, 5, 6, 7\] to have 4 "
            r"channels, but got 3 channels instead",
        ),
        (
            "unbatched in-channel mismatch",
            lambda: op(x[0, :3], w, b),
            ValueError,
            r"to have 4 channels, but got 3 channels instead",
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
            r"stride must be an int or a sequence of one or three ints, got \(1, 1\)",
        ),
        (
            "padding pair",
            lambda: op(x, w, b, padding=[1, 1]),
            TypeError,
            "padding must be an int or a sequence of one or three ints",
        ),
        ("dilation float", lambda: op(x, w, b, dilation=1.0), TypeError, "dilation must be an int"),
        ("zero stride", lambda: op(x, w, b, stride=(1, 0, 1)), ValueError, r"stride must be positive, got \[1, 0, 1\]"),
        (
            "negative padding",
            lambda: op(x, w, b, padding=(0, -1, 0)),
            ValueError,
            r"negative padding is not supported, got \[0, -1, 0\]",
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
            r"at least 1 x 1 x 1, got weight of size \[6, 4, 3, 3, 0\]",
        ),
        (
            "kernel larger than input",
            lambda: op(x[..., :2], w, b),
            ValueError,
            r"Calculated padded input size per channel: \(5 x 6 x 2\). Kernel size: \(3 x 3 x 3\). "
            "Kernel size can't be greater than actual input size",
        ),
        ("dtype mismatch", lambda: op(x.double(), w, b), TypeError, "same dtype"),
        ("integer dtype", lambda: op(x.int(), w.int(), None), TypeError, "supports floating-point tensors"),
        ("bias of wrong size", lambda: op(x, w, b[:5]), ValueError, r"expected bias of size \[6\]"),
        ("unknown transform", lambda: op(x, w, b, "cube"), ValueError, "unknown transform 'cube'"),
        (
            "direct op: 4 paddings",
            lambda: raw(x, w, b, *rest, [1, 1, 1], [0, 0, 0, 0], [1, 1, 1], 1),
            ValueError,
            r"padding must have 6 elements \(front, back, top, bottom, left, right\)",
        ),
        (
            "direct op: 4-D input",
            lambda: raw(x[0], w, b, *rest, [1, 1, 1], [0] * 6, [1, 1, 1], 1),
            ValueError,
            r"fusedtie::tied_conv3d expects a 5-D input \(N, C, D, H, W\)",
        ),
    ]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("case", range(len(_op_cases("cpu"))), ids=[c[0] for c in _op_cases("cpu")])
def test_op_bad_input(case, device):
    name, call, exc, pattern = _op_cases(device)[case]
    with pytest.raises(exc, match=pattern):
        call()


def test_backward_op_bad_grad_output():
    x, w = torch.randn(1, 2, 4, 4, 4), torch.randn(3, 2, 3, 3, 3)
    args = ("square", 1.0, "identity", 1.0, [1, 1, 1], [0] * 6, [1, 1, 1], 1)
    op = torch.ops.fusedtie._tied_conv3d_backward
    with pytest.raises(ValueError, match=r"expected grad_output of size \[1, 3, 2, 2, 2\]"):
        op(torch.randn(1, 3, 2, 2, 3), x, w, None, *args, [True, True, False])
    with pytest.raises(ValueError, match="output_mask asks for a bias gradient, but bias is None"):
        op(torch.randn(1, 3, 2, 2, 2), x, w, None, *args, [True, True, True])


def test_source_must_be_a_conv3d():
    for bad in (nn.Conv2d(3, 3, 3), nn.Linear(3, 3), nn.Conv1d(3, 3, 3), torch.zeros(3, 3, 3, 3, 3), None):
        with pytest.raises(TypeError, match="FusedTiedConv3d ties to an nn.Conv3d source"):
            FusedTiedConv3d(bad)
    with pytest.raises(TypeError, match="not a transposed one"):
        FusedTiedConv3d(nn.ConvTranspose3d(3, 3, 3))
    layer = FusedTiedConv3d(nn.Conv3d(3, 3, 3))
    with pytest.raises(TypeError, match="must be an nn.Conv3d that owns its parameters, got another FusedTiedConv3d"):
        FusedTiedConv3d(layer)
    with pytest.raises(TypeError, match="ties to an nn.Conv2d source, got Conv3d"):
        fusedtie.FusedTiedConv2d(nn.Conv3d(3, 3, 3))


def test_module_construction_errors():
    conv = nn.Conv3d(4, 6, 3)
    with pytest.raises(
        ValueError, match=r"in_channels=5 \(the tie gives 4\).*kernel_size=5 \(the tie gives \(3, 3, 3\)\)"
    ):
        FusedTiedConv3d(conv, in_channels=5, kernel_size=5)
    with pytest.raises(ValueError, match="out_channels must be divisible by groups"):
        FusedTiedConv3d(conv, groups=4)
    with pytest.raises(ValueError, match="padding='same' is not supported for strided"):
        FusedTiedConv3d(conv, padding="same", stride=(1, 2, 1))
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        FusedTiedConv3d(conv, padding_mode="mirror")
    with pytest.raises(ValueError, match="the source has no bias"):
        FusedTiedConv3d(nn.Conv3d(4, 6, 3, bias=False), bias="transform")
    with pytest.raises(ValueError, match=r"stride must be positive, got \[0, 0, 0\]"):
        FusedTiedConv3d(conv, stride=0)
    with pytest.raises(ValueError, match=r"negative padding is not supported, got \[1, -1, 1\]"):
        FusedTiedConv3d(conv, padding=(1, -1, 1))
    with pytest.raises(TypeError, match="stride must be an int or a sequence of one or three ints"):
        FusedTiedConv3d(conv, stride=(1, 1))
    with pytest.raises(ValueError, match="not initialised yet"):
        FusedTiedConv3d(nn.LazyConv3d(6, 3))
    FusedTiedConv3d(conv, in_channels=4, out_channels=6, kernel_size=(3, 3, 3))  # what the tie gives is fine


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_wrong_rank_channels_and_size_through_the_module(padding_mode):
    layer = FusedTiedConv3d(nn.Conv3d(8, 8, 3, padding=1, padding_mode=padding_mode))
    with pytest.raises(
        ValueError, match=r"Expected 4D \(unbatched\) or 5D \(batched\) input to (FusedTiedConv3d|tied_conv3d)"
    ):
        layer(torch.randn(8, 5, 5))
    with pytest.raises(ValueError, match=r"expected input\[1, 5, (4|6), (4|6), (4|6)\] to have 8 channels, but got 5"):
        layer(torch.randn(1, 5, 4, 4, 4))
    small = FusedTiedConv3d(nn.Conv3d(2, 2, 5, padding_mode=padding_mode))
    with pytest.raises(ValueError, match="Kernel size can't be greater than actual input size"):
        small(torch.randn(1, 2, 4, 8, 8))


# --- opcheck, torch.compile, gradcheck, autocast -------------------------------------------------


def _opcheck_samples():
    def make(x_shape, w_shape, bias, transform, bias_transform, stride, padding, dilation, groups, **kw):
        x = torch.randn(x_shape)
        w = torch.randn(w_shape)
        if kw.get("channels_last"):
            x = x.to(memory_format=torch.channels_last_3d)
            w = w.to(memory_format=torch.channels_last_3d)
        requires_grad = kw.get("requires_grad", True)
        x.requires_grad_(requires_grad)
        w.requires_grad_(requires_grad)
        b = torch.randn(w_shape[0], requires_grad=requires_grad) if bias else None
        alpha = 0.5 if transform == "scale" else 1.0
        return (x, w, b, transform, alpha, bias_transform, 1.0, stride, padding, dilation, groups)

    return [
        make((2, 4, 5, 5, 5), (6, 4, 3, 3, 3), True, "square", "identity", [1, 1, 1], [1] * 6, [1, 1, 1], 1),
        make((1, 4, 5, 6, 7), (4, 2, 2, 3, 2), False, "tanh", "identity", [2, 1, 1], [0, 1, 1, 1, 0, 1], [1, 2, 1], 2),
        make(
            (2, 4, 4, 4, 4),
            (6, 4, 1, 1, 1),
            True,
            "scale",
            "scale",
            [1, 1, 1],
            [0] * 6,
            [1, 1, 1],
            1,
            channels_last=True,
        ),
        make((0, 4, 4, 4, 4), (6, 4, 3, 3, 3), True, "softplus", "exp", [1, 1, 1], [1] * 6, [1, 1, 1], 1),
        make(
            (2, 4, 4, 4, 4),
            (6, 4, 3, 3, 3),
            True,
            "abs",
            "sigmoid",
            [1, 1, 1],
            [1] * 6,
            [1, 1, 1],
            1,
            requires_grad=False,
        ),
    ]


@pytest.mark.parametrize("sample", range(5))
def test_opcheck_tied_conv3d(sample):
    torch.library.opcheck(torch.ops.fusedtie.tied_conv3d.default, _opcheck_samples()[sample])


def test_opcheck_backward_op():
    x, w, b = torch.randn(2, 4, 4, 5, 4), torch.randn(6, 4, 2, 3, 2), torch.randn(6)
    grad = torch.randn(2, 6, 4, 5, 4)
    for mask in ([True, True, True], [False, True, False], [True, False, True]):
        torch.library.opcheck(
            torch.ops.fusedtie._tied_conv3d_backward.default,
            (grad, x, w, b, "tanh", 1.0, "square", 1.0, [1, 1, 1], [0, 1, 1, 1, 0, 1], [1, 1, 1], 1, mask),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
        )


@pytest.mark.parametrize("transform", ["square", "tanh"])
def test_torch_compile_fullgraph_matches_eager_and_reference(transform):
    torch._dynamo.reset()
    net = TiedNet3d(transform, "transform")
    x = torch.randn(2, 4, 4, 5, 6, requires_grad=True)
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
    h = torch.relu(F.conv3d(x64, w64, b64, padding=1))
    ref = F.conv3d(h, reference_f(transform, w64), reference_f(transform, b64), padding=1)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x64, w64, b64])
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("transform", ["square", "softplus", "scale"])
def test_gradcheck_float64(transform):
    x = torch.randn(2, 4, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(6, 2, 2, 2, 3, dtype=torch.float64) * 0.5).requires_grad_(True)
    b = (torch.randn(6, dtype=torch.float64) * 0.5).requires_grad_(True)
    t = transform_arg(transform)

    def strided(x, w, b):
        return fusedtie.tied_conv3d(x, w, b, t, t, stride=(2, 1, 2), padding=1, dilation=(1, 2, 1), groups=2)

    def same(x, w, b):
        return fusedtie.tied_conv3d(x[0], w, b, t, "identity", padding="same", groups=2)  # unbatched, asymmetric

    assert torch.autograd.gradcheck(strided, (x, w, b))
    assert torch.autograd.gradcheck(same, (x, w, b))


def test_double_backward_raises_and_in_place_change_is_caught():
    x = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    out = fusedtie.tied_conv3d(x, w, transform="square")
    (gw,) = torch.autograd.grad(out.sum(), w, create_graph=True)
    with pytest.raises(RuntimeError, match=r"double backward through fusedtie::tied_conv3d.*F\.conv3d\(x, f\(w\)\)"):
        gw.sum().backward()
    out = fusedtie.tied_conv3d(x, w, transform="square")
    with torch.no_grad():
        w.add_(1.0)  # an optimizer step between forward and backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("transform", ["abs", "tanh"])
def test_autocast_rounds_f_of_the_float32_source(transform):
    # Under autocast the derived weight is round(f(W_fp32)), as the unfused recipe F.conv3d(x, f(W))
    # under autocast computes it (csrc/autocast.cpp); the output is bfloat16.
    torch.manual_seed(0)
    layer = FusedTiedConv3d(nn.Conv3d(4, 4, 3, padding=1), transform)
    x = torch.randn(1, 4, 4, 5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        recipe = F.conv3d(x, reference_f(transform, layer.source.weight), layer.source.bias, padding=1)
    assert out.dtype == torch.bfloat16 and recipe.dtype == torch.bfloat16
    ref, _ = reference_conv3d(x, layer.source.weight, layer.source.bias, transform, padding=1)
    err_ours = (out.double() - ref).abs().max().item()
    err_recipe = (recipe.double() - ref).abs().max().item()
    assert err_ours <= 2 * err_recipe + 1e-3, (err_ours, err_recipe)
    out.float().sum().backward()
    assert layer.source.weight.grad.dtype == torch.float32
