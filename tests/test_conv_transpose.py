"""tied_conv_transpose2d and FusedTiedConvTranspose2d: the decoder of a tied autoencoder.

Every value is compared with an independent float64 oracle: F.conv_transpose2d(x, f(W), b) with f
written in torch ops (tests/reference.py) and gradients from autograd, never with fusedtie's own
code. The new names are imported from their modules (fusedtie/__init__.py exports them later).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from op_cases import (
    DEVICES,
    TRANSFORMS,
    TRANSPOSE_GEOMETRIES,
    TRANSPOSE_GRID_TRANSFORMS,
    TRANSPOSE_PRODUCT_GEOMETRIES,
    needs_cuda,
)
from parity import PRECISIONS, cycled_runs, device_runs, run_transpose_parity
from reference import reference_conv_transpose2d, reference_f, transform_arg

import fusedtie
from fusedtie.nn import FusedTiedConv2d, FusedTiedConvTranspose2d
from fusedtie.ops import tied_conv_transpose2d

GRID_TRANSFORMS = TRANSPOSE_GRID_TRANSFORMS
GEOMETRIES = TRANSPOSE_PRODUCT_GEOMETRIES


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("transform", GRID_TRANSFORMS)
@pytest.mark.parametrize("geometry", range(len(GEOMETRIES)))
def test_parity_grid_float64_outputs_and_gradients(geometry, transform, bias):
    shape_x, shape_w, stride, padding, output_padding, groups, dilation = GEOMETRIES[geometry]
    x = torch.randn(shape_x, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(shape_w, dtype=torch.float64) * 0.5).requires_grad_(True)
    b = torch.randn(shape_w[1] * groups, dtype=torch.float64, requires_grad=True) if bias else None
    out = tied_conv_transpose2d(x, w, b, transform_arg(transform), stride, padding, output_padding, groups, dilation)
    ref, ref_grads = reference_conv_transpose2d(x, w, b, transform, stride, padding, output_padding, groups, dilation)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(ref)
    inputs = [x, w] + ([b] if bias else [])
    grads = torch.autograd.grad(out, inputs, grad_out)
    for name, g, r in zip(("input", "weight", "bias"), grads, ref_grads(grad_out)):
        assert g.shape == r.shape, name
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("transform", GRID_TRANSFORMS)
def test_float32_matches_the_float64_oracle(transform):
    x = torch.randn(2, 8, 7, 6, requires_grad=True)
    w = (torch.randn(8, 4, 3, 3) * 0.5).requires_grad_(True)
    b = torch.randn(4, requires_grad=True)
    out = tied_conv_transpose2d(x, w, b, transform_arg(transform), stride=2, padding=1, output_padding=1)
    ref, ref_grads = reference_conv_transpose2d(x, w, b, transform, 2, 1, 1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    grad_out = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, (x, w, b), grad_out), ref_grads(grad_out)):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4)


# --- the transposed parity grid, on each device -----------------------------------------------------
# tied_conv_transpose2d runs the same kernels as tied_conv2d with their roles swapped, so it gets the
# same parity rule (tests/parity.py): the CPU in float64, CUDA under each algorithm in each precision.


def _transpose_grid():
    """geometry x device (x precision x algorithm on CUDA), with the transform and the bias
    cycling; the CPU's case is the CUDA fused float64 case's."""
    params = []
    for gi, geometry, device, algorithm, precision, pi, ai in cycled_runs(TRANSPOSE_GEOMETRIES):
        transform = TRANSFORMS[(gi + 2 * pi + 4 * ai) % len(TRANSFORMS)]
        bias = (gi + pi + ai) % 2 == 0
        name = f"{geometry[0]}-{precision}" + (f"-{algorithm}" if algorithm else "")
        params.append(
            pytest.param(
                device,
                algorithm,
                precision,
                transform,
                bias,
                geometry,
                marks=needs_cuda if device == "cuda" else (),
                id=f"{device}-{name}-{transform}-bias_{bias}",
            )
        )
    return params


@pytest.mark.parametrize("device,algorithm,precision,transform,bias,geometry", _transpose_grid())
def test_transpose_geometry_grid(device, algorithm, precision, transform, bias, geometry):
    run_transpose_parity(device, algorithm, precision, transform, bias, geometry)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("device,algorithm,precision", device_runs(["fused"], PRECISIONS))
def test_transpose_every_transform(device, algorithm, precision, transform):
    run_transpose_parity(device, algorithm, precision, transform, True, TRANSPOSE_GEOMETRIES[1])


@pytest.mark.parametrize("transform", fusedtie.available_transforms())
def test_gradcheck_float64(transform):
    x = torch.randn(2, 4, 4, 3, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(4, 3, 3, 2, dtype=torch.float64) * 0.5).requires_grad_(True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    t = transform_arg(transform)

    def fn(x, w, b):
        return tied_conv_transpose2d(
            x, w, b, t, stride=(2, 1), padding=(1, 0), output_padding=(1, 0), groups=2, dilation=(1, 2)
        )

    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_double_backward_raises_clearly_as_tied_conv2d():
    # tied_conv2d refuses second-order gradients; the transposed op matches it (no gradgradcheck).
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    out = tied_conv_transpose2d(x, w, transform="square")
    (gw,) = torch.autograd.grad(out.sum(), w, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through fusedtie::tied_conv_transpose2d"):
        gw.sum().backward()


def test_in_place_change_of_source_between_forward_and_backward_raises():
    x = torch.randn(1, 3, 4, 4)
    w = torch.randn(3, 2, 3, 3, requires_grad=True)
    out = tied_conv_transpose2d(x, w, transform="square")
    with torch.no_grad():
        w.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def _op_samples():
    def make(shape_x, shape_w, bias, transform, stride, padding, output_padding, dilation, groups, channels_last=False):
        x = torch.randn(shape_x, requires_grad=True)
        if channels_last:
            x = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
        w = torch.randn(shape_w, requires_grad=True)
        b = torch.randn(shape_w[1] * groups, requires_grad=True) if bias else None
        return (
            x,
            w,
            b,
            transform,
            0.5 if transform == "scale" else 1.0,
            stride,
            padding,
            output_padding,
            dilation,
            groups,
        )

    return [
        make((2, 4, 5, 5), (4, 3, 3, 3), True, "square", [2, 2], [1, 1], [1, 1], [1, 1], 1),
        make((1, 4, 5, 4), (4, 2, 2, 3), False, "tanh", [2, 1], [0, 1], [1, 0], [1, 2], 2),
        make((2, 4, 6, 6), (4, 3, 1, 1), True, "scale", [1, 1], [0, 0], [0, 0], [1, 1], 1, channels_last=True),
        make((0, 4, 5, 5), (4, 3, 3, 3), True, "exp", [2, 2], [1, 1], [0, 0], [1, 1], 1),
    ]


@pytest.mark.parametrize("sample", range(4))
def test_opcheck_tied_conv_transpose2d(sample):
    torch.library.opcheck(torch.ops.fusedtie.tied_conv_transpose2d.default, _op_samples()[sample])


def test_opcheck_tied_conv_transpose2d_backward():
    x, w, b = torch.randn(2, 4, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(3)
    grad = torch.randn(2, 3, 10, 10)
    for mask in ([True, True, True], [False, True, False], [True, False, True]):
        torch.library.opcheck(
            torch.ops.fusedtie._tied_conv_transpose2d_backward.default,
            (grad, x, w, b, "tanh", 1.0, [2, 2], [1, 1], [1, 1], [1, 1], 1, mask),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
        )


def test_meta_tensors_give_shapes():
    x = torch.empty(3, 8, 7, 5, device="meta")
    w = torch.empty(8, 4, 3, 4, device="meta")
    b = torch.empty(8, device="meta")
    out = tied_conv_transpose2d(x, w, b, "tanh", stride=2, padding=1, output_padding=(1, 0), groups=2)
    ref = F.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=(1, 0), groups=2)
    assert out.device.type == "meta" and out.shape == ref.shape


# --- the autoencoder ------------------------------------------------------------------------------


class TiedAutoencoder(nn.Module):
    def __init__(self, transform="identity", stride=2, padding=1, kernel_size=3, output_padding=1):
        super().__init__()
        self.encoder = nn.Conv2d(3, 8, kernel_size, stride=stride, padding=padding)
        self.decoder = FusedTiedConvTranspose2d(self.encoder, transform, output_padding=output_padding)

    def forward(self, x):
        return self.decoder(torch.relu(self.encoder(x)))


def _autoencoder_oracle(net, transform, x, grad_out):
    """float64 decoder(relu(encoder(x))) with F ops, and its gradients w.r.t. x, W, encoder b, decoder b."""
    enc, dec = net.encoder, net.decoder
    x64, w64, eb64, db64 = (t.detach().double().requires_grad_(True) for t in (x, enc.weight, enc.bias, dec.bias))
    h = torch.relu(F.conv2d(x64, w64, eb64, enc.stride, enc.padding))
    out = F.conv_transpose2d(h, reference_f(transform, w64), db64, dec.stride, dec.padding, dec.output_padding)
    return out.detach(), torch.autograd.grad(out, (x64, w64, eb64, db64), grad_out.double())


@pytest.mark.parametrize("transform", ["identity", "square"])
def test_autoencoder_matches_oracle_and_gradients_reach_the_source(transform):
    net = TiedAutoencoder(transform)
    x = torch.randn(2, 3, 10, 10, requires_grad=True)
    out = net(x)
    assert out.shape == x.shape
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, net.encoder.weight, net.encoder.bias, net.decoder.bias), grad_out)
    ref, ref_grads = _autoencoder_oracle(net, transform, x, grad_out)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("transform", ["identity", "tanh"])
def test_torch_compile_fullgraph_autoencoder_matches_eager(transform):
    torch._dynamo.reset()
    net = TiedAutoencoder(transform)
    x = torch.randn(2, 3, 10, 10, requires_grad=True)
    params = list(net.parameters())
    eager = net(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), [x, *params])
    compiled = torch.compile(net, fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *params])
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    grad_out = (2 * out).detach()  # d(out^2)/d(out): the compiled gradients against the oracle too
    _, ref_grads = _autoencoder_oracle(net, transform, x, grad_out)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "kernel_size, stride, padding, output_padding, size",
    [
        (3, 1, 1, 0, (9, 7)),
        (3, 2, 1, 1, (10, 8)),  # even sizes: output_padding=1 restores them
        (4, 2, 1, 0, (12, 6)),
        (5, 2, 2, 1, (8, 8)),
        (2, 2, 0, 0, (6, 10)),
        (1, 1, 0, 0, (5, 3)),
    ],
)
def test_decoder_of_encoder_has_the_input_shape(kernel_size, stride, padding, output_padding, size):
    net = TiedAutoencoder("identity", stride, padding, kernel_size, output_padding)
    x = torch.randn(2, 3, *size)
    assert net(x).shape == x.shape
    assert net(x[0]).shape == x[0].shape  # unbatched


@pytest.mark.parametrize("size", [(9, 9), (10, 9), (11, 12)])
def test_output_size_selects_the_output_padding_as_conv_transpose2d(size):
    encoder = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    decoder = FusedTiedConvTranspose2d(encoder, "square")
    plain = nn.ConvTranspose2d(8, 3, 3, stride=2, padding=1)
    with torch.no_grad():
        plain.weight.copy_(encoder.weight.square())
        plain.bias.copy_(decoder.bias)
    x = torch.randn(2, 3, *size)
    h = encoder(x)
    for output_size in (list(size), [2, 3, *size], torch.Size(size)):
        out = decoder(h, output_size=output_size)
        assert out.shape == x.shape
        torch.testing.assert_close(out, plain(h, output_size=output_size), rtol=1e-5, atol=1e-5)
    out = decoder(h[0], output_size=size)  # unbatched
    assert out.shape == x[0].shape
    with pytest.raises(ValueError, match="requested an output size of"):
        decoder(h, output_size=[size[0] + 5, size[1]])


def test_source_geometry_is_the_default_and_overrides_apply():
    encoder = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)
    decoder = FusedTiedConvTranspose2d(encoder)
    assert (decoder.in_channels, decoder.out_channels, decoder.kernel_size) == (6, 4, (3, 2))
    assert (decoder.stride, decoder.padding, decoder.dilation, decoder.groups) == ((2, 1), (1, 0), (1, 2), 2)
    assert decoder.output_padding == (0, 0) and decoder.bias.shape == (4,)
    other = FusedTiedConvTranspose2d(encoder, stride=1, padding=2, dilation=1, groups=1, bias=False)
    assert (other.stride, other.padding, other.dilation, other.groups, other.out_channels) == (
        (1, 1),
        (2, 2),
        (1, 1),
        1,
        2,
    )
    assert other.bias is None
    same = FusedTiedConvTranspose2d(nn.Conv2d(3, 5, 5, padding="same"))
    assert same.padding == (2, 2)
    x = torch.randn(1, 3, 7, 6)
    assert same(same.source(x)).shape == x.shape
    with pytest.raises(ValueError, match="asymmetrically"):
        FusedTiedConvTranspose2d(nn.Conv2d(3, 5, 4, padding="same"))


def test_bias_is_initialised_as_conv_transpose2d():
    encoder = nn.Conv2d(3, 16, 3)
    decoder = FusedTiedConvTranspose2d(encoder)
    bound = 1 / (3 * 3 * 3) ** 0.5  # fan_in = weight.size(1) * kH * kW, as nn.ConvTranspose2d
    assert decoder.bias.abs().max() <= bound and decoder.bias.std() > bound / 4
    old = decoder.bias.detach().clone()
    source_weight = encoder.weight.detach().clone()
    decoder.reset_parameters()  # the layer's own bias only
    assert not torch.equal(decoder.bias, old) and torch.equal(encoder.weight, source_weight)


# --- the tie --------------------------------------------------------------------------------------


def test_parameters_and_state_dict_are_the_encoders_plus_the_decoder_bias():
    net = TiedAutoencoder()
    names = [name for name, _ in net.named_parameters()]
    assert names == ["encoder.weight", "encoder.bias", "decoder.bias"]
    assert sum(p.numel() for p in net.parameters()) == 8 * 3 * 9 + 8 + 3
    assert list(net.state_dict()) == ["encoder.weight", "encoder.bias", "decoder.bias"]
    alone = FusedTiedConvTranspose2d(nn.Conv2d(3, 8, 3))
    assert list(alone.state_dict()) == ["bias", "source.weight", "source.bias"]
    no_bias = FusedTiedConvTranspose2d(nn.Conv2d(3, 8, 3), bias=False)
    assert list(no_bias.state_dict()) == ["source.weight", "source.bias"]


def test_state_dict_round_trip_keeps_the_tie_and_reports_missing_keys():
    net, fresh = TiedAutoencoder("square"), TiedAutoencoder("square")
    fresh.load_state_dict(net.state_dict())
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(fresh(x), net(x))
    assert fresh.decoder.source is fresh.encoder
    state = net.state_dict()
    del state["decoder.bias"]
    result = fresh.load_state_dict(state, strict=False)
    assert result.missing_keys == ["decoder.bias"]


def test_weight_is_the_derived_tensor_and_cannot_be_assigned():
    net = TiedAutoencoder("square")
    torch.testing.assert_close(net.decoder.weight, net.encoder.weight.detach().square())
    net.decoder.weight.sum().backward()
    torch.testing.assert_close(net.encoder.weight.grad, 2 * net.encoder.weight.detach())
    with pytest.raises(AttributeError, match="derived from its source"):
        net.decoder.weight = nn.Parameter(torch.randn(8, 3, 3, 3))
    with pytest.raises(AttributeError, match="fixed at construction"):
        net.decoder.stride = (1, 1)


def _check_tied(net, transform="identity"):
    assert net.decoder.source is net.encoder
    net.zero_grad()
    net(torch.randn(1, 3, 8, 8)).sum().backward()
    assert net.encoder.weight.grad is not None and net.encoder.weight.grad.abs().sum() > 0
    with torch.no_grad():
        net.encoder.weight.mul_(2)
    torch.testing.assert_close(net.decoder.weight, reference_f(transform, net.encoder.weight.detach()))


def test_deepcopy_keeps_the_tie_on_the_copy():
    net = TiedAutoencoder()
    copied = copy.deepcopy(net)
    assert copied.decoder.source is copied.encoder and copied.encoder is not net.encoder
    _check_tied(copied)
    alone = copy.deepcopy(net.decoder)
    assert alone.source is not net.encoder


def test_torch_save_load_of_the_network_keeps_the_tie():
    net = TiedAutoencoder("tanh")
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(loaded(x), net(x))
    _check_tied(loaded, "tanh")


def test_to_moves_the_source():
    net = TiedAutoencoder().double()
    assert net.encoder.weight.dtype == torch.float64 and net.decoder.bias.dtype == torch.float64
    assert net(torch.randn(1, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64
    alone = FusedTiedConvTranspose2d(nn.Conv2d(3, 8, 3)).to(torch.float64)
    assert alone.source.weight.dtype == torch.float64


def test_cached_scope_derives_once_and_matches():
    net = TiedAutoencoder("exp").eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = net(x)
        with fusedtie.cached():
            first = net(x)
            second = net(x)
            with torch.no_grad():
                net.encoder.weight.mul_(0.5)  # an in-place change inside the scope is seen
            changed = net(x)
        reference = net(x)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    torch.testing.assert_close(changed, reference)


def test_bake_gives_a_conv_transpose2d_with_equal_outputs():
    net = TiedAutoencoder("square")
    baked = fusedtie.bake(net)
    assert type(baked.decoder) is nn.ConvTranspose2d
    assert baked.decoder.output_padding == (1, 1) and baked.decoder.stride == (2, 2)
    x = torch.randn(2, 3, 10, 10)
    torch.testing.assert_close(baked(x), net(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(baked.decoder.weight, net.encoder.weight.detach().square())
    assert isinstance(net.decoder, FusedTiedConvTranspose2d)  # the original untouched
    alone = fusedtie.bake(net.decoder)
    assert type(alone) is nn.ConvTranspose2d


def test_source_must_be_a_plain_conv2d():
    encoder = nn.Conv2d(3, 8, 3)
    with pytest.raises(TypeError, match="nn.Conv2d source .*not a transposed one.*ConvTranspose2d"):
        FusedTiedConvTranspose2d(nn.ConvTranspose2d(3, 8, 3))
    with pytest.raises(TypeError, match="got another FusedTiedConvTranspose2d"):
        FusedTiedConvTranspose2d(FusedTiedConvTranspose2d(encoder))
    with pytest.raises(TypeError, match="got a FusedTiedConv2d"):
        FusedTiedConvTranspose2d(FusedTiedConv2d(encoder))
    with pytest.raises(TypeError, match="got Linear"):
        FusedTiedConvTranspose2d(nn.Linear(3, 3))


def test_layer_arguments_are_checked():
    encoder = nn.Conv2d(4, 6, 3)
    with pytest.raises(ValueError, match='Only "zeros" padding mode'):
        FusedTiedConvTranspose2d(encoder, padding_mode="reflect")
    with pytest.raises(TypeError, match="bias must be True or False"):
        FusedTiedConvTranspose2d(encoder, bias="same")
    with pytest.raises(ValueError, match="groups=4: the source weight \\[6, 4, 3, 3\\] gives 6 input channels"):
        FusedTiedConvTranspose2d(encoder, groups=4)
    with pytest.raises(
        ValueError,
        match=r"output_padding must be smaller than either stride or dilation, "
        r"got output_padding \[1, 1\], stride \[1, 1\], dilation \[1, 1\]",
    ):
        FusedTiedConvTranspose2d(encoder, output_padding=1)
    with pytest.raises(ValueError, match="unknown transform 'cube'"):
        FusedTiedConvTranspose2d(encoder, "cube")


# --- bad input: the C++ check (real tensors) and the fake kernel (meta tensors) say the same ------


def _bad_op_calls():
    x, w, b = torch.randn(1, 4, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(3)
    return [
        (
            (x, w, b, "identity", 1.0, [1, 1], [0, 0], [1, 1], [1, 1], 1),
            ValueError,
            r"output_padding must be smaller than either stride or dilation, got output_padding \[1, 1\], "
            r"stride \[1, 1\], dilation \[1, 1\]",
        ),
        (
            (x, w, b, "identity", 1.0, [2, 2], [0, 0], [0, 0], [1, 1], 3),
            ValueError,
            r"in_channels \(4, the weight's first dimension\) must be divisible by groups \(3\)",
        ),
        (
            (x, torch.randn(5, 3, 3, 3), b, "identity", 1.0, [1, 1], [0, 0], [0, 0], [1, 1], 1),
            ValueError,
            r"Given transposed=1, weight of size \[5, 3, 3, 3\], expected input\[1, 4, 5, 5\] to have 5 channels, "
            r"but got 4 channels instead",
        ),
        (
            (x, w, torch.randn(4), "identity", 1.0, [1, 1], [0, 0], [0, 0], [1, 1], 1),
            ValueError,
            r"expected bias of size \[3\] \(out_channels = weight.size\(1\) \* groups\), got \[4\]",
        ),
        (
            (torch.randn(1, 4, 1, 1), w, b, "identity", 1.0, [1, 1], [3, 3], [0, 0], [1, 1], 1),
            ValueError,
            r"Given input size per channel: \(1 x 1\). Calculated output size per channel: \(-3 x -3\). "
            r"Output size is too small",
        ),
        (
            (x, w, b, "identity", 1.0, [1, 1], [-1, 0], [0, 0], [1, 1], 1),
            ValueError,
            r"negative padding is not supported, got \[-1, 0\]",
        ),
        (
            (x, w, b, "identity", 1.0, [2, 2], [0, 0], [-1, 0], [1, 1], 1),
            ValueError,
            r"negative output_padding is not supported, got \[-1, 0\]",
        ),
        (
            (x, w, b, "identity", 1.0, [0, 1], [0, 0], [0, 0], [1, 1], 1),
            ValueError,
            r"stride must be positive, got \[0, 1\]",
        ),
        (
            (x, w, b, "identity", 1.0, [1, 1], [0, 0], [0, 0], [1, 0], 1),
            ValueError,
            r"dilation must be positive, got \[1, 0\]",
        ),
        (
            (x, w, b, "identity", 1.0, [1, 1], [0, 0], [0, 0], [1, 1], 0),
            ValueError,
            r"groups must be a positive integer, got 0",
        ),
        ((x, w, b, "cube", 1.0, [1, 1], [0, 0], [0, 0], [1, 1], 1), ValueError, r"unknown transform 'cube'"),
        (
            (x[0], w, b, "identity", 1.0, [1, 1], [0, 0], [0, 0], [1, 1], 1),
            ValueError,
            r"expects a 4-D input \(N, C, H, W\), got input of size \[4, 5, 5\]",
        ),
        (
            (x, w[0], b, "identity", 1.0, [1, 1], [0, 0], [0, 0], [1, 1], 1),
            ValueError,
            r"expects a 4-D weight \(in_channels, out_channels/groups, kH, kW\), got weight of size \[3, 3, 3\]",
        ),
        (
            (x, w.double(), b, "identity", 1.0, [1, 1], [0, 0], [0, 0], [1, 1], 1),
            TypeError,
            r"expected input and weight to have the same dtype, got input Float and weight Double|"
            r"expected input and weight to have the same dtype, got input torch.float32 and weight torch.float64",
        ),
        (
            (x.int(), w.int(), None, "identity", 1.0, [1, 1], [0, 0], [0, 0], [1, 1], 1),
            TypeError,
            r"fusedtie::tied_conv_transpose2d supports floating-point tensors",
        ),
    ]


@pytest.mark.parametrize("case", range(len(_bad_op_calls())))
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_op_arguments_are_named_by_the_kernel_and_the_fake(case, device):
    args, error, message = _bad_op_calls()[case]
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    with pytest.raises(error, match=message):
        torch.ops.fusedtie.tied_conv_transpose2d(*args)


def test_bad_backward_arguments_are_named():
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 3, 3, 3)
    for device in ("cpu", "meta"):
        args = [t.to(device) for t in (torch.randn(1, 3, 6, 6), x, w)]
        with pytest.raises(ValueError, match=r"expected grad_output of size \[1, 3, 7, 7\], got \[1, 3, 6, 6\]"):
            torch.ops.fusedtie._tied_conv_transpose2d_backward(
                *args, None, "identity", 1.0, [1, 1], [0, 0], [0, 0], [1, 1], 1, [True, True, False]
            )
        args[0] = torch.randn(1, 3, 7, 7, device=device)
        with pytest.raises(ValueError, match="output_mask asks for a bias gradient, but bias is None"):
            torch.ops.fusedtie._tied_conv_transpose2d_backward(
                *args, None, "identity", 1.0, [1, 1], [0, 0], [0, 0], [1, 1], 1, [True, True, True]
            )


def test_functional_arguments_are_checked_as_conv_transpose2d():
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 3, 3, 3)
    with pytest.raises(TypeError, match="padding must be an int or a pair of ints, got 'same'"):
        tied_conv_transpose2d(x, w, padding="same")
    with pytest.raises(ValueError, match="negative padding is not supported, got -1"):
        tied_conv_transpose2d(x, w, padding=-1)
    with pytest.raises(ValueError, match=r"Expected 3D \(unbatched\) or 4D \(batched\) input to tied_conv_transpose2d"):
        tied_conv_transpose2d(x[0, 0], w)
    with pytest.raises(ValueError, match=r"expected a 4-D weight \(in_channels, out_channels/groups, kH, kW\)"):
        tied_conv_transpose2d(x, w[0])
    with pytest.raises(TypeError, match="groups must be an int"):
        tied_conv_transpose2d(x, w, groups=1.0)
    # stride and the rest as ints, 1-element or 2-element sequences
    out = tied_conv_transpose2d(x, w, None, "identity", [2], (1, 1), [1], 1, (1,))
    torch.testing.assert_close(out, F.conv_transpose2d(x, w, None, 2, 1, 1, 1, 1))


def test_layer_input_with_the_wrong_channel_count_names_it():
    decoder = FusedTiedConvTranspose2d(nn.Conv2d(3, 8, 3))
    with pytest.raises(ValueError, match="expected input\\[1, 3, 5, 5\\] to have 8 channels, but got 3"):
        decoder(torch.randn(1, 3, 5, 5))


# --- autocast -------------------------------------------------------------------------------------


def _rounded(t64, dtype):
    return t64 + (t64.to(dtype).double() - t64).detach()


@pytest.mark.parametrize("transform", ["identity", "square", "tanh", "abs"])
def test_autocast_cpu_bf16_within_twice_the_builtin_error(transform):
    dtype = torch.bfloat16
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    w = (torch.randn(8, 4, 3, 3) * 0.5).requires_grad_(True)
    b = (torch.randn(4) * 0.5).requires_grad_(True)
    t = transform_arg(transform)
    grad_out = torch.randn(2, 4, 11, 11).to(dtype)

    def run(fn):
        with torch.autocast("cpu", dtype=dtype):
            out = fn(x, w, b)
        return out, torch.autograd.grad(out, (x, w, b), grad_out)

    ours, our_grads = run(lambda x, w, b: tied_conv_transpose2d(x, w, b, t, stride=2, padding=1))
    builtin, builtin_grads = run(lambda x, w, b: F.conv_transpose2d(x, reference_f(transform, w), b, 2, 1))
    # the float64 oracle on the rounded operands: round(x), round(f(W)) (f in float32, then
    # rounded), round(b), as the built-in conv under autocast sees them
    x64, w64, b64 = (t_.detach().double().requires_grad_(True) for t_ in (x, w, b))
    oracle = F.conv_transpose2d(
        _rounded(x64, dtype), _rounded(reference_f(transform, w64), dtype), _rounded(b64, dtype), 2, 1
    )
    oracle_grads = torch.autograd.grad(oracle, (x64, w64, b64), grad_out.double())
    assert ours.dtype == dtype and ours.shape == oracle.shape
    eps = torch.finfo(dtype).eps
    pairs = [(ours, builtin, oracle)] + list(zip(our_grads, builtin_grads, oracle_grads))
    for name, (mine, theirs, ref) in zip(("output", "grad x", "grad w", "grad b"), pairs):
        assert mine.dtype == theirs.dtype, name
        err = (mine.double() - ref).abs().max().item()
        builtin_err = (theirs.double() - ref).abs().max().item()
        scale = ref.abs().max().item()
        assert err <= 2 * builtin_err + 1e-3 * eps * scale, (
            f"{name}: error {err:.3g} against the float64 oracle, F.conv_transpose2d's is {builtin_err:.3g}"
        )


def test_autocast_cpu_rounds_f_computed_in_float32():
    # 1x1 kernel, one input channel, input of ones: each output is round(f(w)) exactly
    w = (torch.randn(1, 64, 1, 1) * 2).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tied_conv_transpose2d(torch.ones(1, 1, 1, 1), w, None, "exp")
    assert out.dtype == torch.bfloat16
    with torch.no_grad():
        expected = fusedtie.apply_transform(w, "exp").to(torch.bfloat16)
    assert torch.equal(out.flatten(), expected.flatten())


# --- on each device, and CUDA ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("transform", ["identity", "square", "tanh"])
@pytest.mark.parametrize("device", DEVICES)
def test_device_matches_the_float64_oracle(device, dtype, transform):
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    x = torch.randn(2, 6, 5, 5, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(6, 2, 3, 3, device=device, dtype=dtype) * 0.5).requires_grad_(True)
    b = torch.randn(4, device=device, dtype=dtype, requires_grad=True)
    with torch.backends.cudnn.flags(allow_tf32=False):
        out = tied_conv_transpose2d(x, w, b, transform_arg(transform), stride=2, padding=1, output_padding=1, groups=2)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, (x, w, b), grad_out)
    ref, ref_grads = reference_conv_transpose2d(x.cpu(), w.cpu(), b.cpu(), transform, 2, 1, 1, 2)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol)
    for g, r in zip(grads, ref_grads(grad_out.cpu())):
        assert g.device.type == device
        torch.testing.assert_close(g.double().cpu(), r, rtol=tol, atol=tol)


@needs_cuda
def test_cuda_autoencoder_layer_and_opcheck():
    net = TiedAutoencoder("square").cuda()
    x = torch.randn(2, 3, 10, 10, device="cuda")
    assert net(x).shape == x.shape
    net(x).sum().backward()
    assert net.encoder.weight.grad is not None
    sample = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in _op_samples()[0])
    torch.library.opcheck(torch.ops.fusedtie.tied_conv_transpose2d.default, sample)
