"""fusedtie.tie_: each kind of tie on a small model against F.conv*/F.linear in float64 on f of the
source's weights, gradients reaching the source, the parameters and state_dict left, all or nothing
on a bad tie, every validation's message, nested containers, bake and torch.save round trips."""

from __future__ import annotations

import io
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from reference import reference_f
from torch import nn

import fusedtie
from fusedtie.nn import FusedTiedConv1d, FusedTiedConv2d, FusedTiedConvTranspose2d, FusedTiedLinear

torch.manual_seed(0)


def _64(t):
    return None if t is None else t.detach().double()


def _fingerprint(model: nn.Module):
    """What tie_ must not change when it fails: every module by name and identity, the state_dict's
    keys, and the state_dict hooks of every module."""
    return (
        [(name, id(m)) for name, m in model.named_modules(remove_duplicate=False)],
        list(model.state_dict()),
        [(name, len(m._state_dict_hooks), len(m._load_state_dict_pre_hooks)) for name, m in model.named_modules()],
    )


# --- each kind of tie --------------------------------------------------------------------------------


def test_conv2d_takes_the_target_geometry():
    source = nn.Conv2d(4, 4, 3, padding=1)
    # another geometry than the source's: stride, dilation, circular padding
    target = nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, padding_mode="circular")
    model = nn.Sequential(OrderedDict(source=source, act=nn.ReLU(), target=target))
    x = torch.randn(2, 4, 9, 9)
    expected_shape = model(x).shape
    assert fusedtie.tie_(model, {"target": "source"}, transform="square") is model
    tied = model.target
    assert type(tied) is FusedTiedConv2d and tied.source is source
    assert (tied.stride, tied.padding, tied.dilation, tied.padding_mode) == ((2, 2), (2, 2), (2, 2), "circular")

    w, b = _64(source.weight), _64(source.bias)
    h = F.relu(F.conv2d(x.double(), w, b, padding=1))
    reference = F.conv2d(F.pad(h, (2, 2, 2, 2), mode="circular"), reference_f("square", w), b, stride=2, dilation=2)
    out = model(x)
    assert out.shape == expected_shape
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)


def test_conv1d_with_other_groups_and_transformed_bias():
    # the source's weight [6, 2, 3] read with groups=1 by the target: 2 -> 6 channels
    source = nn.Conv1d(4, 6, 3, groups=2)
    target = nn.Conv1d(2, 6, 3, padding="same", padding_mode="replicate")
    model = nn.ModuleDict({"source": source, "target": target})
    fusedtie.tie_(model, {"target": "source"}, transform="tanh", bias="transform")
    tied = model["target"]
    assert type(tied) is FusedTiedConv1d and (tied.groups, tied.in_channels) == (1, 2)
    x = torch.randn(3, 2, 11)
    w, b = _64(source.weight), _64(source.bias)
    reference = F.conv1d(F.pad(x.double(), (1, 1), mode="replicate"), torch.tanh(w), torch.tanh(b))
    torch.testing.assert_close(tied(x).double(), reference, rtol=1e-5, atol=1e-5)


def test_conv3d_where_fusedtie_has_it():
    model = nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.Conv3d(2, 3, 3))
    if getattr(fusedtie.nn, "FusedTiedConv3d", None) is None:
        before = _fingerprint(model)
        with pytest.raises(
            TypeError, match=r"cannot tie '1' to '0': tying an nn.Conv3d needs fusedtie.nn.FusedTiedConv3d"
        ):
            fusedtie.tie_(model, {"1": "0"})
        assert _fingerprint(model) == before
        return
    fusedtie.tie_(model, {"1": "0"}, transform="abs")
    assert type(model[1]).__name__ == "FusedTiedConv3d"
    x = torch.randn(1, 2, 5, 5, 5)
    reference = F.conv3d(x.double(), torch.abs(_64(model[0].weight)), _64(model[0].bias))
    torch.testing.assert_close(model[1](x).double(), reference, rtol=1e-5, atol=1e-5)


class ConvAutoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.decoder = nn.Sequential(nn.ConvTranspose2d(8, 3, 3, stride=2, padding=1, output_padding=1))

    def forward(self, x):
        return self.decoder(self.encoder(x))


def test_conv_transpose2d_decoder_keeps_the_target_bias_and_geometry():
    model = ConvAutoencoder()
    bias = model.decoder[0].bias
    x = torch.randn(2, 3, 8, 8)
    fusedtie.tie_(model, {"decoder.0": "encoder.0"}, transform="sigmoid")
    tied = model.decoder[0]
    assert type(tied) is FusedTiedConvTranspose2d
    assert tied.bias is bias  # the target's parameter itself
    assert tied.output_padding == (1, 1) and model(x).shape == x.shape

    encoder = model.encoder[0]
    w, b = _64(encoder.weight), _64(encoder.bias)
    h = F.relu(F.conv2d(x.double(), w, b, stride=2, padding=1))
    reference = F.conv_transpose2d(h, torch.sigmoid(w), _64(bias), stride=2, padding=1, output_padding=1)
    torch.testing.assert_close(model(x).double(), reference, rtol=1e-5, atol=1e-5)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(6, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 6)])

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(torch.tanh(x) if i else x)
        return x


def test_linear_forward_and_transposed_ties_by_shape():
    model = MLP()
    bias_3 = model.layers[3].bias
    fusedtie.tie_(model, {"layers.2": "layers.1", "layers.3": "layers.0"}, transform={"layers.3": "softplus"})
    forward, decoder = model.layers[2], model.layers[3]
    assert type(forward) is FusedTiedLinear and not forward.transpose  # square: transpose=False
    assert type(decoder) is FusedTiedLinear and decoder.transpose and decoder.bias is bias_3

    x = torch.randn(5, 6)
    (w0, b0), (w1, b1) = [(_64(m.weight), _64(m.bias)) for m in model.layers[:2]]
    h = F.linear(x.double(), w0, b0)
    h = F.linear(torch.tanh(h), w1, b1)
    h = F.linear(torch.tanh(h), w1, b1)  # identity, the source's bias
    reference = F.linear(torch.tanh(h), F.softplus(w0).t(), _64(bias_3))
    torch.testing.assert_close(model(x).double(), reference, rtol=1e-5, atol=1e-5)


def test_square_linear_transposed_on_request():
    model = MLP()
    fusedtie.tie_(model, {"layers.2": "layers.1"}, transpose={"layers.2": True}, bias=None)
    tied = model.layers[2]
    assert tied.transpose and tied.bias is None
    x = torch.randn(3, 4)
    reference = x.double() @ _64(model.layers[1].weight)
    torch.testing.assert_close(tied(x).double(), reference, rtol=1e-5, atol=1e-6)


def test_target_without_bias_gives_a_tied_layer_without_one():
    model = nn.Sequential(
        nn.Linear(3, 3), nn.Linear(3, 3, bias=False), nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1, bias=False)
    )
    fusedtie.tie_(model, {"1": "0", "3": "2"}, bias="transform")
    assert model[1].bias is None and model[3].bias is None
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]


# --- what the model holds after the surgery -------------------------------------------------------------


def test_gradients_reach_the_source_and_the_target_weights_are_gone():
    model = ConvAutoencoder()
    target = model.decoder[0]
    count = sum(p.numel() for p in model.parameters())
    fusedtie.tie_(model, {"decoder.0": "encoder.0"}, transform="square")
    assert sum(p.numel() for p in model.parameters()) == count - target.weight.numel()
    assert all(p is not target.weight for p in model.parameters())
    assert list(model.state_dict()) == ["encoder.0.weight", "encoder.0.bias", "decoder.0.bias"]

    x = torch.randn(2, 3, 8, 8)
    model(x).square().sum().backward()
    encoder = model.encoder[0]
    w, b, db = (_64(t).requires_grad_() for t in (encoder.weight, encoder.bias, target.bias))
    h = F.relu(F.conv2d(x.double(), w, b, stride=2, padding=1))
    F.conv_transpose2d(h, w**2, db, stride=2, padding=1, output_padding=1).square().sum().backward()
    for ours, theirs in ((encoder.weight, w), (encoder.bias, b), (target.bias, db)):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-4, atol=1e-4)


def test_nested_containers_and_a_target_under_two_names():
    shared = nn.Linear(5, 5)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.ModuleDict({"proj": shared})

    model = nn.Module()
    model.source = nn.Linear(5, 5)
    model.block = Block()
    model.alias = nn.Sequential(shared)  # the same module under a second name
    fusedtie.tie_(model, {"block.inner.proj": "source"})
    tied = model.block.inner["proj"]
    assert type(tied) is FusedTiedLinear and model.alias[0] is tied
    assert list(model.state_dict()) == ["source.weight", "source.bias"]


def test_training_flag_and_hooks_carry_over():
    model = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 3)).eval()
    seen = []
    model[1].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    fusedtie.tie_(model, {"1": "0"})
    assert not model[1].training
    model(torch.randn(1, 2, 7, 7))
    assert seen == [torch.Size([1, 2, 3, 3])]


def test_bake_round_trip():
    model = MLP()
    fusedtie.tie_(model, {"layers.2": "layers.1", "layers.3": "layers.0"}, transform="exp")
    baked = fusedtie.bake(model)
    assert [type(m) for m in baked.layers] == [nn.Linear] * 4
    x = torch.randn(4, 6)
    with torch.no_grad():
        torch.testing.assert_close(baked(x), model(x))


def test_torch_save_load_of_the_tied_model():
    model = ConvAutoencoder()
    fusedtie.tie_(model, {"decoder.0": "encoder.0"}, transform="tanh")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.decoder[0].source is loaded.encoder[0]
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert list(loaded.state_dict()) == list(model.state_dict())


# --- all or nothing --------------------------------------------------------------------------------------


def test_a_bad_second_tie_leaves_the_model_unchanged():
    model = MLP()
    before = _fingerprint(model)
    with pytest.raises(ValueError, match=r"cannot tie 'layers.3' to 'layers.1': target weight \[6, 4\]"):
        fusedtie.tie_(model, {"layers.2": "layers.1", "layers.3": "layers.1"})
    assert _fingerprint(model) == before


def test_a_second_tie_refused_by_its_layer_leaves_the_model_unchanged():
    # the first tie's layer has been built (and has hooked its source) when the second's fails
    model = MLP()
    before = _fingerprint(model)
    with pytest.raises(ValueError, match=r"cannot tie 'layers.3' to 'layers.0': unknown transform 'nope'"):
        fusedtie.tie_(model, {"layers.2": "layers.1", "layers.3": "layers.0"}, transform={"layers.3": "nope"})
    assert _fingerprint(model) == before
    assert not hasattr(model.layers[1], "_fusedtie_hooks")


# --- validation ------------------------------------------------------------------------------------------


def _autoencoder_with_extras():
    model = ConvAutoencoder()
    model.head = nn.Linear(8, 8)
    model.conv1d = nn.Conv1d(3, 8, 3)
    model.tied = FusedTiedConv2d(nn.Conv2d(3, 3, 1), "identity")
    model.wide = nn.Conv2d(3, 16, 3)
    model.double_ = nn.Conv2d(3, 8, 3, stride=2, padding=1).double()
    model.nobias = nn.Conv2d(3, 8, 3, bias=False)
    model.lazy = nn.LazyLinear(8)
    return model


BAD_TIES = [
    ({"decoder.O": "encoder.0"}, {}, ValueError, r"no module 'decoder.O' \(the target of .*close matches: 'decoder.0'"),
    ({"decoder.0": "encodr.0"}, {}, ValueError, r"no module 'encodr.0' \(the source of the tie .*'encoder.0'"),
    ({"decoder.0": "decoder.0"}, {}, ValueError, r"the target is its own source"),
    (
        {"decoder.0": "encoder.0", "encoder.0": "double_"},
        {},
        ValueError,
        r"cannot tie 'decoder.0' to 'encoder.0': the source is itself the target of the tie 'encoder.0'.*not chain",
    ),
    ({"tied": "encoder.0"}, {}, TypeError, r"the target is a FusedTiedConv2d, which is already tied"),
    ({"decoder.0": "tied"}, {}, TypeError, r"the source is a FusedTiedConv2d, which does not own its weight"),
    ({"tied.source": "head"}, {}, ValueError, r"the target is the source of the fusedtie layer 'tied'"),
    ({"head": "encoder.0"}, {}, TypeError, r"no tied layer replaces an nn.Linear with the weight of an nn.Conv2d"),
    ({"conv1d": "encoder.0"}, {}, TypeError, r"tie_ ties nn.Conv1d to nn.Conv1d, nn.Conv2d to nn.Conv2d"),
    (
        {"wide": "encoder.0"},
        {},
        ValueError,
        r"^cannot tie 'wide' to 'encoder.0': target weight \[16, 3, 3, 3\] \(nn.Conv2d\) does not match "
        r"source weight \[8, 3, 3, 3\] \(nn.Conv2d\)$",
    ),
    ({"decoder.0": "double_"}, {}, ValueError, r"the target weight's dtype is torch.float32, the source weight's"),
    ({"head": "lazy"}, {}, ValueError, r"the source is a lazy nn.LazyLinear whose weight is not initialised"),
    (
        {"encoder.0": "nobias"},
        {},
        ValueError,
        r"the target has a bias and its source has none.*bias=\{'encoder.0': None\}",
    ),
    (
        {"decoder.0": "encoder.0"},
        {"bias": "transform"},
        ValueError,
        r"the tied layer is a decoder with a bias of its own",
    ),
    ({"decoder.0": "encoder.0"}, {"transpose": {"decoder.0": True}}, ValueError, r"transpose= applies to nn.Linear"),
    ({"decoder.0": "encoder.0"}, {"transform": {"decoder.1": "tanh"}}, ValueError, r"transform= names 'decoder.1'"),
    ({"decoder.0": "encoder.0"}, {"bias": True}, ValueError, r"bias must be 'same', 'transform' or None, got True"),
    ({"decoder.0": "encoder.0"}, {"transpose": "yes"}, ValueError, r"transpose must be None"),
    ({"": "encoder.0"}, {}, ValueError, r"the target is the model itself"),
]


@pytest.mark.parametrize("ties, options, error, match", BAD_TIES, ids=[m[:40] for *_, m in BAD_TIES])
def test_validation_errors(ties, options, error, match):
    model = _autoencoder_with_extras()
    before = _fingerprint(model)
    with pytest.raises(error, match=match):
        fusedtie.tie_(model, ties, **options)
    assert _fingerprint(model) == before


def test_linear_shape_messages():
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(5, 6), nn.Linear(6, 4))
    with pytest.raises(
        ValueError, match=r"target weight \[6, 5\] \(nn.Linear\) does not match source weight \[6, 4\] "
    ):
        fusedtie.tie_(model, {"1": "0"})
    with pytest.raises(ValueError, match=r"nor its transpose \[4, 6\]"):
        fusedtie.tie_(model, {"1": "0"})
    with pytest.raises(ValueError, match=r"with transpose=False, the target weight \[4, 6\] must be the source weight"):
        fusedtie.tie_(model, {"2": "0"}, transpose=False)


def test_one_module_named_twice():
    shared = nn.Linear(3, 3)
    model = nn.Sequential(nn.Linear(3, 3), shared, shared)
    with pytest.raises(ValueError, match=r"'1' and '2' are one module registered under two names"):
        fusedtie.tie_(model, {"1": "0", "2": "0"})


def test_bad_arguments():
    with pytest.raises(TypeError, match="takes an nn.Module"):
        fusedtie.tie_({"a": 1}, {"a": "b"})
    with pytest.raises(TypeError, match="ties must map target names to source names"):
        fusedtie.tie_(nn.Sequential(nn.Linear(2, 2)), [("0", "0")])
