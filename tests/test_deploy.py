"""fusedtie.bake: a deployable copy with plain nn.Conv2d layers, checked against the float64 reference.

The reference here is written from the network's parameters with F.conv2d, F.batch_norm and PyTorch's
own elementwise ops in float64 (tests/reference.py's transforms), never through fusedtie.
"""

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference import reference_f

import fusedtie
from fusedtie import FusedTiedConv2d


class DeployNet(nn.Module):
    """Ties at the top level, inside a Sequential, and to a source held only by its tied layer."""

    def __init__(self, padding_mode="zeros"):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.conv_1 = nn.Conv2d(8, 8, 3, padding=1, padding_mode=padding_mode)
        self.conv_2 = FusedTiedConv2d(self.conv_1, "square", bias="transform")
        self.bn = nn.BatchNorm2d(8)
        self.block = nn.Sequential(
            FusedTiedConv2d(self.conv_1, "tanh", stride=2, dilation=2, padding=2),
            nn.ReLU(),
            FusedTiedConv2d(nn.Conv2d(8, 4, (2, 3), bias=False), "exp", padding="same"),
        )

    def forward(self, x):
        h = self.conv_1(self.stem(x))
        return self.block(self.bn(self.conv_2(h)))


class PlainDeployNet(DeployNet):
    """DeployNet written with nn.Conv2d only (what a deployment target without fusedtie defines)."""

    def __init__(self):
        nn.Module.__init__(self)
        self.stem, self.conv_1 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
        self.conv_2, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.block = nn.Sequential(
            nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2),
            nn.ReLU(),
            nn.Conv2d(8, 4, (2, 3), padding="same", bias=False),
        )


def _with_running_stats(net):
    """Give the BatchNorm running statistics that are not the identity, then switch to eval."""
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.uniform_(-0.5, 0.5)
    return net.eval()


def reference_forward(net, x):
    """DeployNet's forward in float64 from its (original, tied) parameters, without fusedtie."""

    def d(t):
        return None if t is None else t.detach().double()

    c1, bn = net.conv_1, net.bn
    x = x.double()
    h = F.conv2d(x, d(net.stem.weight), d(net.stem.bias))
    if c1.padding_mode == "zeros":
        h = F.conv2d(h, d(c1.weight), d(c1.bias), padding=1)
        h = F.conv2d(h, reference_f("square", d(c1.weight)), reference_f("square", d(c1.bias)), padding=1)
    else:
        pad = lambda t: F.pad(t, (1, 1, 1, 1), mode=c1.padding_mode)  # noqa: E731
        h = F.conv2d(pad(h), d(c1.weight), d(c1.bias))
        h = F.conv2d(pad(h), reference_f("square", d(c1.weight)), reference_f("square", d(c1.bias)))
    h = F.batch_norm(h, d(bn.running_mean), d(bn.running_var), d(bn.weight), d(bn.bias), False, 0.0, bn.eps)
    if c1.padding_mode == "zeros":
        h = F.conv2d(h, reference_f("tanh", d(c1.weight)), d(c1.bias), stride=2, padding=2, dilation=2)
    else:
        h = F.conv2d(
            F.pad(h, (2, 2, 2, 2), mode=c1.padding_mode),
            reference_f("tanh", d(c1.weight)),
            d(c1.bias),
            stride=2,
            dilation=2,
        )
    h = F.relu(h)
    lone = net.block[2].source
    return F.conv2d(h, reference_f("exp", d(lone.weight)), None, padding="same")


def _snapshot(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_bake_replaces_every_tie_and_computes_the_same(padding_mode):
    net = _with_running_stats(DeployNet(padding_mode)).double()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    baked = fusedtie.bake(net)
    assert not any(isinstance(m, FusedTiedConv2d) for m in baked.modules())
    for path in ("conv_2", "block.0", "block.2"):
        conv, layer = baked.get_submodule(path), net.get_submodule(path)
        assert type(conv) is nn.Conv2d
        for name in (
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "groups",
            "padding_mode",
        ):
            assert getattr(conv, name) == getattr(layer, name), (path, name)
        assert conv.weight.dtype == torch.float64 and conv.weight.device == layer.source.weight.device
    assert baked.block[2].bias is None
    ref = reference_forward(net, x)
    torch.testing.assert_close(baked(x), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(baked(x), net(x), rtol=1e-10, atol=1e-10)
    # the baked conv holds f(W) and g(b) as its own values: compare with PyTorch's f
    torch.testing.assert_close(baked.conv_2.weight, net.conv_1.weight.detach() ** 2, rtol=0, atol=0)
    torch.testing.assert_close(baked.conv_2.bias, net.conv_1.bias.detach() ** 2, rtol=0, atol=0)


def test_bake_float32_matches_the_float64_reference():
    net = _with_running_stats(DeployNet())
    x = torch.randn(1, 3, 10, 10)
    baked = fusedtie.bake(net)
    assert baked.conv_2.weight.dtype == torch.float32
    torch.testing.assert_close(baked(x).double(), reference_forward(net, x), rtol=1e-4, atol=1e-4)


def test_bake_leaves_the_original_alone_and_unties_the_copy():
    net = _with_running_stats(DeployNet())
    keys, values = list(net.state_dict()), _snapshot(net)
    params = [id(p) for p in net.parameters()]
    x = torch.randn(1, 3, 10, 10)
    before = net(x)
    baked = fusedtie.bake(net)
    assert isinstance(net.conv_2, FusedTiedConv2d) and net.conv_2.source is net.conv_1
    assert list(net.state_dict()) == keys and [id(p) for p in net.parameters()] == params
    for key, value in net.state_dict().items():
        assert torch.equal(value, values[key]), key
    assert net.conv_1._fusedtie_hooks  # the original's tie bookkeeping is untouched
    # the copy's parameters are its own: the source's copy and the baked conv no longer share
    assert not {id(p) for p in baked.parameters()} & set(params)
    with torch.no_grad():
        baked.conv_1.weight.add_(1.0)
        baked.conv_2.weight.zero_()
    assert torch.equal(net(x), before)
    # the baked conv is f(W) as it was at baking time, not a view of the copied source
    assert torch.count_nonzero(baked.conv_2.weight) == 0


def test_baked_model_is_plain_pytorch():
    net = _with_running_stats(DeployNet())
    baked = fusedtie.bake(net)
    # no fusedtie state_dict bookkeeping is left on the copied sources
    for module in baked.modules():
        assert not hasattr(module, "_fusedtie_hooks")
        assert not module._state_dict_hooks and not module._load_state_dict_pre_hooks
    assert list(baked.state_dict()) == [
        "stem.weight",
        "stem.bias",
        "conv_1.weight",
        "conv_1.bias",
        "conv_2.weight",
        "conv_2.bias",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
        "block.0.weight",
        "block.0.bias",
        "block.2.weight",
    ]
    # its state_dict loads (strict) into the same architecture written with nn.Conv2d only
    plain = PlainDeployNet()
    plain.load_state_dict(baked.state_dict())
    x = torch.randn(1, 3, 10, 10)
    torch.testing.assert_close(plain.eval()(x).double(), reference_forward(net, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("how", ["fuse_modules", "fuse_conv_bn_eval"])
def test_conv_bn_folding_on_the_baked_model(how):
    net = _with_running_stats(DeployNet()).double()
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    baked = fusedtie.bake(net).eval()
    if how == "fuse_modules":
        folded = torch.ao.quantization.fuse_modules(baked, [["conv_2", "bn"]])
        assert isinstance(folded.bn, nn.Identity)
    else:
        folded = baked
        folded.conv_2 = torch.nn.utils.fusion.fuse_conv_bn_eval(baked.conv_2, baked.bn)
        folded.bn = nn.Identity()
    assert type(folded.conv_2) is nn.Conv2d
    # folding changed the conv's values (the BN is not the identity), and the output is still right
    assert not torch.allclose(folded.conv_2.weight, net.conv_1.weight.detach() ** 2)
    torch.testing.assert_close(folded(x), reference_forward(net, x), rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_of_the_baked_model_runs_and_round_trips():
    net = _with_running_stats(DeployNet())
    x = torch.randn(1, 3, 10, 10)
    ref = reference_forward(net, x)
    baked = fusedtie.bake(net)
    scripted = torch.jit.script(baked)
    torch.testing.assert_close(scripted(x).double(), ref, rtol=1e-4, atol=1e-4)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    torch.testing.assert_close(loaded(x), scripted(x), rtol=0, atol=0)
    traced = torch.jit.trace(baked, x)
    other = torch.randn(2, 3, 14, 14)
    torch.testing.assert_close(traced(other).double(), reference_forward(net, other), rtol=1e-4, atol=1e-4)


def test_bake_a_tied_layer_alone_and_a_layer_registered_twice():
    conv = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect").double()
    layer = FusedTiedConv2d(conv, fusedtie.Transform("scale", alpha=-0.5), bias="transform").eval()
    baked = fusedtie.bake(layer)
    assert type(baked) is nn.Conv2d and baked.padding_mode == "reflect" and not baked.training
    x = torch.randn(1, 4, 7, 7, dtype=torch.float64)
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), -0.5 * conv.weight.detach(), -0.5 * conv.bias.detach())
    torch.testing.assert_close(baked(x), expected, rtol=1e-12, atol=1e-12)
    assert conv._fusedtie_hooks and layer.source is conv  # the original keeps its tie
    # one tied layer under two names stays one module under both names
    shared = FusedTiedConv2d(nn.Conv2d(4, 4, 1), "abs")
    seq = nn.Sequential(shared, nn.ReLU(), shared)
    out = fusedtie.bake(seq)
    assert type(out[0]) is nn.Conv2d and out[0] is out[2]
    assert len(list(out.parameters())) == 2


def test_bake_keeps_flags_and_hooks():
    source = nn.Conv2d(4, 4, 3, padding=1)
    source.weight.requires_grad_(False)  # a frozen source
    net = nn.Sequential(source, FusedTiedConv2d(source, "sigmoid")).eval()
    calls = []
    net[1].register_forward_hook(lambda module, args, output: calls.append(output.shape))
    baked = fusedtie.bake(net)
    conv = baked[1]
    assert not conv.training and not conv.weight.requires_grad and conv.bias.requires_grad
    baked(torch.randn(1, 4, 5, 5))
    assert calls == [torch.Size([1, 4, 5, 5])]  # the tied layer's hook moved onto the baked conv


def test_bake_reads_a_parametrized_source_through_its_parametrization():
    conv = nn.Conv2d(3, 3, 3).double()
    torch.nn.utils.parametrizations.weight_norm(conv)
    with torch.no_grad():
        conv.parametrizations.weight.original0.mul_(3.0)  # weight = g * v / |v|: not the raw v
    baked = fusedtie.bake(FusedTiedConv2d(conv, "square"))
    torch.testing.assert_close(baked.weight, conv.weight.detach() ** 2, rtol=1e-12, atol=1e-12)


def test_bake_refuses_what_is_not_a_module():
    with pytest.raises(TypeError, match="fusedtie.bake takes an nn.Module, got Tensor"):
        fusedtie.bake(torch.zeros(3))
