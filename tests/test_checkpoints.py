"""Checkpoints of tied networks: meta-device construction, safetensors, the forum recipe's files,
duplicate keys that disagree, and a source that holds its own tied layer (a cycle).

Outputs are compared with F.conv2d on PyTorch's own f(W) in float64 (tests/reference.py), never with
fusedtie's result alone.
"""

import re

import pytest
import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference import reference_f

from fusedtie import FusedTiedConv2d


class TiedNet(nn.Module):
    """conv_2 = softplus(conv_1.weight), conv_1's bias; the source registered first, second, or only
    inside the tied layer ("alone")."""

    def __init__(self, layout="source first"):
        super().__init__()
        conv = nn.Conv2d(6, 6, 3, padding=1)
        if layout == "source first":
            self.conv_1 = conv
        self.conv_2 = FusedTiedConv2d(conv, "softplus")
        if layout == "derived first":
            self.conv_1 = conv
        self.layout = layout

    def forward(self, x):
        if self.layout == "alone":
            return self.conv_2(x)
        return self.conv_2(self.conv_1(x))


def reference_tied(net, x):
    """TiedNet's forward in float64 from the source's values, with PyTorch's softplus."""
    c = net.conv_2.source
    w, b = c.weight.detach().double(), c.bias.detach().double()
    h = x.double() if net.layout == "alone" else F.conv2d(x.double(), w, b, padding=1)
    return F.conv2d(h, reference_f("softplus", w), b, padding=1)


class ForumSquare(nn.Module):
    """The forum's recipe: no parameters of its own, the source hidden in a list, w ** 2 every call."""

    def __init__(self, source):
        super().__init__()
        self.other = [source]

    def forward(self, x):
        c = self.other[0]
        return F.conv2d(x, c.weight**2, c.bias, c.stride, c.padding, c.dilation, c.groups)


class ForumNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_1 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv_2 = ForumSquare(self.conv_1)

    def forward(self, x):
        return self.conv_2(self.conv_1(x))


class SeedNet(ForumNet):
    """The same network with fusedtie."""

    def __init__(self):
        nn.Module.__init__(self)
        self.conv_1 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv_2 = FusedTiedConv2d(self.conv_1, "square")


def reference_seed(net, x):
    c = net.conv_1
    w, b = c.weight.detach().double(), c.bias.detach().double()
    return F.conv2d(F.conv2d(x.double(), w, b, padding=1), reference_f("square", w), b, padding=1)


def _assert_tied(net):
    source = net.conv_2.source
    if net.layout != "alone":
        assert source is net.conv_1
    assert [id(p) for p in net.parameters()] == [id(source.weight), id(source.bias)]
    assert sum(p.numel() for p in net.parameters()) == 6 * 6 * 9 + 6


# --- meta-device construction -----------------------------------------------------------------------


LAYOUTS = ["source first", "derived first", "alone"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_meta_construction_then_to_empty_and_load_keeps_the_tie(layout):
    trained = TiedNet(layout)
    with torch.device("meta"):
        net = TiedNet(layout)
    assert net.conv_2.source.weight.is_meta
    assert list(net.state_dict()) == list(trained.state_dict())  # one key per tensor on meta too
    net.to_empty(device="cpu")
    assert not any(p.is_meta for p in net.parameters())
    _assert_tied(net)
    net.load_state_dict(trained.state_dict())  # strict
    _assert_tied(net)
    x = torch.randn(2, 6, 7, 7)
    torch.testing.assert_close(net(x).double(), reference_tied(trained, x), rtol=1e-5, atol=1e-5)
    # still one tensor: a change to the source is what the tied layer computes with
    with torch.no_grad():
        net.conv_2.source.weight.mul_(-1.0)
    torch.testing.assert_close(net(x).double(), reference_tied(net, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_meta_construction_then_load_with_assign_keeps_the_tie(layout):
    trained = TiedNet(layout)
    with torch.device("meta"):
        net = TiedNet(layout)
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    net.load_state_dict(state, assign=True)
    assert not any(p.is_meta for p in net.parameters())
    _assert_tied(net)
    x = torch.randn(1, 6, 5, 5)
    torch.testing.assert_close(net(x).double(), reference_tied(trained, x), rtol=1e-5, atol=1e-5)
    loss = net(x).square().sum()
    loss.backward()  # gradients reach the one source through both paths
    assert net.conv_2.source.weight.grad is not None


# --- safetensors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_safetensors_save_model_load_model_round_trip(tmp_path, layout):
    net, fresh = TiedNet(layout), TiedNet(layout)
    path = tmp_path / "net.safetensors"
    safetensors.torch.save_model(net, path)
    assert sorted(safetensors.torch.load_file(path)) == sorted(net.state_dict())  # nothing dropped
    missing, unexpected = safetensors.torch.load_model(fresh, path)  # strict
    assert not missing and not unexpected
    _assert_tied(fresh)
    x = torch.randn(1, 6, 6, 6)
    assert torch.equal(fresh(x), net(x))
    torch.testing.assert_close(fresh(x).double(), reference_tied(net, x), rtol=1e-5, atol=1e-5)


def test_safetensors_save_file_of_the_state_dict_finds_no_shared_tensors(tmp_path):
    # save_file itself refuses tensors that share memory; a tied network's state_dict has none
    net = nn.ModuleDict({"a": FusedTiedConv2d(nn.Conv2d(3, 3, 3), "exp")})
    net["b"] = FusedTiedConv2d(net["a"].source, "tanh")
    net["c"] = net["a"].source
    state = net.state_dict()
    assert list(state) == ["c.weight", "c.bias"]  # the source's own name, though registered last
    safetensors.torch.save_file(state, tmp_path / "net.safetensors")
    loaded = safetensors.torch.load_file(tmp_path / "net.safetensors")
    fresh = nn.ModuleDict({"a": FusedTiedConv2d(nn.Conv2d(3, 3, 3), "exp")})
    fresh["b"] = FusedTiedConv2d(fresh["a"].source, "tanh")
    fresh["c"] = fresh["a"].source
    fresh.load_state_dict(loaded)  # strict
    assert torch.equal(fresh["c"].weight, net["c"].weight) and fresh["b"].source is fresh["c"]


@pytest.mark.parametrize("how", ["load_state_dict", "safetensors"])
def test_forum_recipe_checkpoints_load_both_ways(tmp_path, how):
    forum, ours = ForumNet(), SeedNet()
    assert list(forum.state_dict()) == list(ours.state_dict()) == ["conv_1.weight", "conv_1.bias"]
    path = tmp_path / "forum.safetensors"
    safetensors.torch.save_model(forum, path)
    if how == "safetensors":
        safetensors.torch.load_model(ours, path)  # strict
    else:
        ours.load_state_dict(safetensors.torch.load_file(path))  # strict
    assert ours.conv_2.source is ours.conv_1
    x = torch.randn(1, 16, 6, 6)
    torch.testing.assert_close(ours(x).double(), reference_seed(forum, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours(x), forum(x), rtol=1e-5, atol=1e-5)
    # and back: fusedtie's checkpoint is what the forum's network loads
    back = ForumNet()
    safetensors.torch.save_model(ours, tmp_path / "ours.safetensors")
    safetensors.torch.load_model(back, tmp_path / "ours.safetensors")
    assert torch.equal(back.conv_1.weight, ours.conv_1.weight)


# --- duplicate keys that disagree --------------------------------------------------------------------


def _duplicated(net, extra):
    """net's checkpoint plus copies of the source under other keys (a parametrize-style checkpoint)."""
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state.update({k: state[v].clone() for k, v in extra.items()})
    return state


@pytest.mark.parametrize("strict", [True, False])
def test_disagreeing_duplicates_are_refused_whichever_is_visited_first(strict):
    net = TiedNet("derived first")  # "conv_2.source.*" is visited before "conv_1.*"
    state = _duplicated(net, {"conv_2.source.weight": "conv_1.weight", "conv_2.source.bias": "conv_1.bias"})
    net.load_state_dict(state, strict=strict)  # equal duplicates load
    state["conv_1.weight"][1, 2, 0, 1] = 5.0
    first = state["conv_2.source.weight"][1, 2, 0, 1].item()
    pattern = (
        r"'conv_2\.source\.weight' and 'conv_1\.weight' differ \(1 of 324 elements, first at "
        rf"\[1, 2, 0, 1\]: {first!r} and 5\.0\)"
    )
    with pytest.raises(RuntimeError, match=pattern):
        net.load_state_dict(state, strict=strict)  # strict=False does not make it silent


def test_disagreeing_duplicates_of_a_source_held_only_by_tied_layers():
    net = nn.ModuleDict({"a": FusedTiedConv2d(nn.Conv2d(3, 3, 3), "square")})
    net["b"] = FusedTiedConv2d(net["a"].source, "neg", bias="transform")
    state = _duplicated(net, {"b.source.weight": "a.source.weight", "b.source.bias": "a.source.bias"})
    state["b.source.bias"][2] += 1.0
    expected = (state["a.source.bias"][2].item(), state["b.source.bias"][2].item())
    with pytest.raises(
        RuntimeError,
        match=(
            r"'a\.source\.bias' and 'b\.source\.bias' differ \(1 of 3 "
            rf"elements, first at \[2\]: {expected[0]!r} and {expected[1]!r}\)"
        ),
    ):
        net.load_state_dict(state)


def test_disagreeing_duplicates_of_another_shape_name_both_shapes():
    net = TiedNet()
    state = _duplicated(net, {"conv_2.source.bias": "conv_1.bias"})
    state["conv_2.source.bias"] = torch.zeros(4)
    with pytest.raises(
        RuntimeError,
        match=r"'conv_1\.bias' and 'conv_2\.source\.bias' differ \(shapes \[6\] "
        r"and \[4\]\)",
    ):
        net.load_state_dict(state)


def test_disagreeing_duplicates_in_a_safetensors_file_are_refused(tmp_path):
    net = SeedNet()
    state = _duplicated(net, {"conv_2.source.weight": "conv_1.weight", "conv_2.source.bias": "conv_1.bias"})
    state["conv_2.source.weight"].neg_()
    safetensors.torch.save_file(state, tmp_path / "dup.safetensors")
    with pytest.raises(RuntimeError, match=r"'conv_1\.weight' and 'conv_2\.source\.weight' differ \(\d+ of 2304"):
        safetensors.torch.load_model(SeedNet(), tmp_path / "dup.safetensors")


# --- a source that holds its own tied layer ------------------------------------------------------------


class MirroredConv(nn.Conv2d):
    """A conv that registers a tie to itself as its own submodule: a cycle in the module tree."""

    def __init__(self):
        super().__init__(4, 4, 3, padding=1)
        self.mirror = FusedTiedConv2d(self, "neg")


@pytest.mark.parametrize(
    "call",
    [
        ("train()/eval()", lambda m: m.eval()),
        ("convert or move", lambda m: m.double()),
        ("convert or move", lambda m: m.to_empty(device="cpu")),
        ("apply()", lambda m: m.apply(lambda module: None)),
        ("state_dict()", lambda m: m.state_dict()),
        ("load_state_dict()", lambda m: m.load_state_dict({})),
    ],
    ids=["eval", "double", "to_empty", "apply", "state_dict", "load_state_dict"],
)
def test_a_source_holding_its_own_tied_layer_is_a_clear_error(call):
    action, fn = call
    conv = MirroredConv()
    with pytest.raises(
        RuntimeError,
        match=(
            rf"cannot {re.escape(action)}.*registered inside its own source "
            r"\(MirroredConv, as its submodule 'mirror'\).*source -> mirror -> source"
        ),
    ):
        fn(conv)


def test_repr_of_a_source_holding_its_own_tied_layer_describes_the_cycle():
    text = repr(MirroredConv())
    assert "the MirroredConv that holds this layer as 'mirror': a cycle" in text
    # the same tie held beside its source is fine
    holder = nn.Module()
    holder.conv = nn.Conv2d(4, 4, 3, padding=1)
    holder.mirror = FusedTiedConv2d(holder.conv, "neg")
    holder.eval().double()
    assert list(holder.state_dict()) == ["conv.weight", "conv.bias"]
