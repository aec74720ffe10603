"""FusedTiedConv2d: the seed's network, tie semantics, state_dict, copies, moves and training."""

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.init as init
from reference import reference_conv2d, transform_arg

import fusedtie
from fusedtie import FusedTiedConv2d


def weights_init(m):  # the seed's own initialiser: writes through .data
    if isinstance(m, nn.Conv2d):
        init.kaiming_uniform_(m.weight.data)
        m.bias.data.zero_()


class SeedNet(nn.Module):
    """The seed's network with compatible shapes: conv_2's weight is conv_1's squared."""

    def __init__(self, transform="square", bias="same"):
        super().__init__()
        self.conv_1 = nn.Conv2d(in_channels=16, out_channels=16, kernel_size=3, padding=1)
        self.conv_2 = FusedTiedConv2d(self.conv_1, transform, bias)

    def forward(self, x):
        return self.conv_2(self.conv_1(x))


class ForumNet(nn.Module):
    """The forum's answer: the source hidden in a list, F.conv2d(x, w ** 2) on every call."""

    def __init__(self):
        super().__init__()
        self.conv_1 = nn.Conv2d(16, 16, 3, padding=1)
        self.other = [self.conv_1]

    def forward(self, x):
        h = self.conv_1(x)
        c = self.other[0]
        return F.conv2d(h, c.weight**2, c.bias, c.stride, c.padding, c.dilation, c.groups)


def reference_seed_forward(net, x, transform="square", bias_mode="same"):
    c = net.conv_1
    h = F.conv2d(x.double(), c.weight.double(), c.bias.double(), padding=1)
    bias_t = transform if bias_mode == "transform" else "identity"
    out, _ = reference_conv2d(h, c.weight, None if bias_mode is None else c.bias, transform, bias_t, padding=1)
    return out


def test_seed_network_parameters_are_conv_1s():
    net = SeedNet()
    params = list(net.parameters())
    assert len(params) == 2 and params[0] is net.conv_1.weight and params[1] is net.conv_1.bias
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in net.conv_1.parameters())
    assert list(net.state_dict()) == ["conv_1.weight", "conv_1.bias"]
    assert net.conv_2.source is net.conv_1
    assert list(net.conv_2.parameters(recurse=False)) == []


@pytest.mark.parametrize("bias_mode", ["same", "transform", None])
@pytest.mark.parametrize("transform", fusedtie.available_transforms())
def test_seed_forward_matches_reference(transform, bias_mode):
    net = SeedNet(transform_arg(transform), bias_mode).double()
    x = torch.randn(2, 16, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(net(x), reference_seed_forward(net, x, transform, bias_mode), rtol=1e-9, atol=1e-9)


def test_weights_written_through_data_are_seen_in_train_and_eval():
    net = SeedNet()
    x = torch.randn(1, 16, 10, 10)
    for mode in (net.train, net.eval):
        mode()
        net.conv_1.apply(weights_init)  # the seed's weights_init, through .data
        with torch.no_grad():
            out = net(x)
        torch.testing.assert_close(out.double(), reference_seed_forward(net, x), rtol=1e-5, atol=1e-5)
        assert torch.count_nonzero(net.conv_1.bias) == 0


def test_load_state_dict_keeps_tie_and_accepts_forum_checkpoints():
    a, b = SeedNet(), SeedNet()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 16, 8, 8)
    torch.testing.assert_close(b(x), a(x))
    assert b.conv_2.source is b.conv_1
    forum = ForumNet()
    b.load_state_dict(forum.state_dict())  # strict: the forum net saves only conv_1's keys too
    torch.testing.assert_close(b(x), forum(x), rtol=1e-5, atol=1e-5)


def test_load_state_dict_reports_really_missing_keys_under_the_saved_names():
    net = SeedNet()
    with pytest.raises(RuntimeError, match="Missing key.*conv_1.weight"):
        net.load_state_dict({})
    result = net.load_state_dict({}, strict=False)
    assert sorted(result.missing_keys) == ["conv_1.bias", "conv_1.weight"]  # what state_dict() writes
    two = nn.ModuleDict({"a": FusedTiedConv2d(nn.Conv2d(2, 2, 1), "exp")})
    two["b"] = FusedTiedConv2d(two["a"].source, "tanh")
    assert sorted(two.load_state_dict({}, strict=False).missing_keys) == ["a.source.bias", "a.source.weight"]


@pytest.mark.parametrize("derived_first", [False, True])
def test_checkpoint_from_either_layout_loads_into_either_layout(derived_first):
    def build(with_holder):
        conv = nn.Conv2d(3, 3, 3)
        net = nn.Module()
        if derived_first:
            net.derived = FusedTiedConv2d(conv, "square")
            if with_holder:
                net.holder = conv
        else:
            if with_holder:
                net.holder = conv
            net.derived = FusedTiedConv2d(conv, "square")
        return net, conv

    # (a checkpoint with the holder's keys cannot load into a net without that holder: PyTorch's
    # ordinary unexpected-key error, so that combination is not among these)
    for saved_with_holder, loaded_with_holder in ((True, True), (False, False), (False, True)):
        if True:
            saved, saved_conv = build(saved_with_holder)
            loaded, loaded_conv = build(loaded_with_holder)
            keys = list(saved.state_dict())
            assert keys == (
                ["holder.weight", "holder.bias"]
                if saved_with_holder
                else ["derived.source.weight", "derived.source.bias"]
            )
            result = loaded.load_state_dict(saved.state_dict())  # strict
            assert not result.missing_keys and not result.unexpected_keys
            torch.testing.assert_close(loaded_conv.weight, saved_conv.weight)
            torch.testing.assert_close(loaded_conv.bias, saved_conv.bias)


def test_checkpoint_with_disagreeing_duplicate_keys_is_refused():
    net = SeedNet()
    with torch.no_grad():
        net.conv_1.weight[0, 0, 0, 0] = float("nan")  # NaN equals NaN for this check
    state = net.state_dict()
    same = dict(
        state,
        **{"conv_2.source.weight": state["conv_1.weight"].clone(), "conv_2.source.bias": state["conv_1.bias"].clone()},
    )
    net.load_state_dict(same)  # duplicates that agree (a parametrize-style checkpoint) load
    differ = dict(same, **{"conv_2.source.weight": state["conv_1.weight"] + 1})
    with pytest.raises(RuntimeError, match="'conv_1.weight' and 'conv_2.source.weight' differ"):
        net.load_state_dict(differ)


def test_deepcopy_follows_copied_source():
    net = SeedNet()
    clone = copy.deepcopy(net)
    assert clone.conv_2.source is clone.conv_1 and clone.conv_1 is not net.conv_1
    with torch.no_grad():
        clone.conv_1.weight.fill_(0.5)
    x = torch.randn(1, 16, 6, 6)
    torch.testing.assert_close(clone(x).double(), reference_seed_forward(clone, x), rtol=1e-5, atol=1e-5)
    assert not torch.equal(net.conv_1.weight, clone.conv_1.weight)


def test_whole_network_save_load_keeps_tie():
    net = SeedNet()
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.conv_2.source is loaded.conv_1
    x = torch.randn(1, 16, 6, 6)
    torch.testing.assert_close(loaded(x), net(x))
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    fresh = SeedNet()
    fresh.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(fresh(x), net(x))


def test_double_and_to_of_parent_keep_tie():
    net = SeedNet().double()
    assert net.conv_1.weight.dtype == torch.float64 and net.conv_2.source is net.conv_1
    x = torch.randn(1, 16, 6, 6, dtype=torch.float64)
    assert net(x).dtype == torch.float64
    torch.testing.assert_close(net(x), reference_seed_forward(net, x), rtol=1e-9, atol=1e-9)
    net.to(torch.float32)
    assert net(x.float()).dtype == torch.float32


def test_alone_moves_and_saves_source_once():
    source = nn.Conv2d(4, 4, 3)
    layer = FusedTiedConv2d(source, "tanh")
    assert list(layer.state_dict()) == ["source.weight", "source.bias"]
    layer.double()
    assert source.weight.dtype == torch.float64
    other = FusedTiedConv2d(nn.Conv2d(4, 4, 3), "tanh").double()
    other.load_state_dict(layer.state_dict())
    torch.testing.assert_close(other.source.weight, source.weight)
    assert [p is q for p, q in zip(layer.parameters(), source.parameters())] == [True, True]


def test_alone_inside_a_parent_saves_and_loads_its_source():
    seq = nn.Sequential(FusedTiedConv2d(nn.Conv2d(4, 4, 3), "square"))
    assert list(seq.state_dict()) == ["0.source.weight", "0.source.bias"]
    other = nn.Sequential(FusedTiedConv2d(nn.Conv2d(4, 4, 3), "square"))
    other.load_state_dict(seq.state_dict())
    torch.testing.assert_close(other[0].source.weight, seq[0].source.weight)
    with pytest.raises(RuntimeError, match="Missing key.*0.source.weight"):
        other.load_state_dict({})


def test_derived_registered_before_its_source_still_saves_source_keys():
    conv = nn.Conv2d(4, 4, 3)
    parent = nn.Module()
    parent.decoder = FusedTiedConv2d(conv, "square")
    parent.encoder = conv
    assert list(parent.state_dict()) == ["encoder.weight", "encoder.bias"]
    fresh = nn.Module()
    fresh_conv = nn.Conv2d(4, 4, 3)
    fresh.decoder = FusedTiedConv2d(fresh_conv, "square")
    fresh.encoder = fresh_conv
    fresh.load_state_dict(parent.state_dict())  # strict: no missing "decoder.source.*"
    torch.testing.assert_close(fresh_conv.weight, conv.weight)


def test_two_layers_tied_to_one_source():
    conv = nn.Conv2d(4, 4, 3)
    net = nn.ModuleDict({"a": FusedTiedConv2d(conv, "square"), "b": FusedTiedConv2d(conv, "exp")})
    assert list(net.state_dict()) == ["a.source.weight", "a.source.bias"]
    assert len(list(net.parameters())) == 2


def test_weight_and_bias_read_as_derived_tensors():
    conv = nn.Conv2d(4, 6, 3)
    layer = FusedTiedConv2d(conv, "exp", bias="transform")
    torch.testing.assert_close(layer.weight, torch.exp(conv.weight))
    torch.testing.assert_close(layer.bias, torch.exp(conv.bias))
    layer.weight.sum().backward()
    torch.testing.assert_close(conv.weight.grad, torch.exp(conv.weight.detach()))
    assert FusedTiedConv2d(conv, "exp", bias="same").bias is conv.bias
    assert FusedTiedConv2d(conv, "exp", bias=None).bias is None


def test_assigning_weight_and_reset_parameters_raise():
    layer = FusedTiedConv2d(nn.Conv2d(4, 4, 3), "square")
    with pytest.raises(AttributeError, match="derived"):
        layer.weight = nn.Parameter(torch.zeros(4, 4, 3, 3))
    with pytest.raises(AttributeError, match="derived"):
        layer.bias = None
    with pytest.raises(RuntimeError, match="owns no parameters"):
        layer.reset_parameters()


def test_not_a_conv2d_so_init_loops_touch_only_the_source():
    net = SeedNet()
    seen = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert seen == [net.conv_1]
    assert not isinstance(net.conv_2, nn.Conv2d)


def test_extra_repr_shows_transform_bias_and_geometry():
    layer = FusedTiedConv2d(
        nn.Conv2d(4, 4, 3, padding=1), fusedtie.Transform("scale", alpha=0.5), bias="transform", stride=2
    )
    text = repr(layer)
    for piece in ("transform=scale(alpha=0.5)", "bias='transform'", "stride=(2, 2)", "padding=(1, 1)"):
        assert piece in text, text


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_padding_mode_is_honoured(padding_mode):
    conv = nn.Conv2d(3, 5, 3, padding=1, padding_mode=padding_mode).double()
    layer = FusedTiedConv2d(conv, "square")
    assert layer.padding_mode == padding_mode
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    ref, _ = reference_conv2d(x, conv.weight, conv.bias, "square", padding=1, padding_mode=padding_mode)
    torch.testing.assert_close(layer(x), ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(layer(x[0]), ref[0], rtol=1e-9, atol=1e-9)  # unbatched
    torch.testing.assert_close(layer.to_conv2d()(x), ref, rtol=1e-9, atol=1e-9)


def test_padding_mode_override_and_same_padding():
    conv = nn.Conv2d(3, 5, (4, 3)).double()
    layer = FusedTiedConv2d(conv, "abs", padding="same", padding_mode="reflect")
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    expected = nn.Conv2d(3, 5, (4, 3), padding="same", padding_mode="reflect").double()
    with torch.no_grad():
        expected.weight.copy_(conv.weight.abs())
        expected.bias.copy_(conv.bias)
    torch.testing.assert_close(layer(x), expected(x), rtol=1e-9, atol=1e-9)


def test_geometry_overrides():
    conv = nn.Conv2d(4, 6, 3).double()
    layer = FusedTiedConv2d(conv, "square", stride=2, padding=(1, 2), dilation=(1, 2), groups=2)
    assert layer.in_channels == 8 and layer.out_channels == 6
    x = torch.randn(1, 8, 11, 11, dtype=torch.float64)
    ref, _ = reference_conv2d(x, conv.weight, conv.bias, "square", stride=2, padding=(1, 2), dilation=(1, 2), groups=2)
    torch.testing.assert_close(layer(x), ref, rtol=1e-9, atol=1e-9)


def test_to_conv2d_bakes_the_transform():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    layer = FusedTiedConv2d(conv, "sigmoid", bias="transform")
    baked = layer.to_conv2d()
    assert type(baked) is nn.Conv2d
    torch.testing.assert_close(baked.weight, torch.sigmoid(conv.weight))
    x = torch.randn(1, 4, 6, 6)
    ref, _ = reference_conv2d(x, conv.weight, conv.bias, "sigmoid", "sigmoid", padding=1)
    torch.testing.assert_close(baked(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_sgd_steps_match_reference_formula():
    torch.manual_seed(1)
    ours = SeedNet().double()
    forum = ForumNet().double()
    forum.load_state_dict(ours.state_dict())
    initial = ours.conv_1.weight.detach().clone()
    opt_ours = torch.optim.SGD(ours.parameters(), lr=1e-3, momentum=0.9)
    opt_forum = torch.optim.SGD(forum.parameters(), lr=1e-3, momentum=0.9)
    for step in range(5):
        x = torch.randn(2, 16, 9, 9, dtype=torch.float64)
        target = torch.randn(2, 16, 9, 9, dtype=torch.float64)
        for net, opt in ((ours, opt_ours), (forum, opt_forum)):
            opt.zero_grad()
            F.mse_loss(net(x), target).backward()
            opt.step()
    for p, q in zip(ours.parameters(), forum.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert not torch.equal(ours.conv_1.weight, initial)  # the steps did move the weights


def test_parametrized_source_is_read_lazily():
    conv = nn.Conv2d(3, 3, 3).double()
    torch.nn.utils.parametrizations.weight_norm(conv)
    layer = FusedTiedConv2d(conv, "square")
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    for _ in range(2):
        ref, _ = reference_conv2d(x, conv.weight, conv.bias, "square")
        torch.testing.assert_close(layer(x), ref, rtol=1e-9, atol=1e-9)
        with torch.no_grad():  # change what the parametrization computes: the next call must see it
            conv.parametrizations.weight.original0.mul_(1.5)
