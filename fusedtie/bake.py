"""fusedtie.bake(model): a deployable copy with every tie replaced by a plain nn.Conv2d (nn.Conv1d,
nn.Conv3d, nn.ConvTranspose2d, nn.Linear) holding f(W)."""

from __future__ import annotations

import copy

from torch import nn

from ._state_dict import remove_source_hooks
from ._tied_layer import _TiedLayer

# The hooks a user may have registered on a tied layer that run around its forward or backward;
# the baked conv takes them over, so a model with, say, a feature-extraction hook behaves the same.
_CALL_HOOK_ATTRIBUTES = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_is_full_backward_hook",
)


def bake(model: nn.Module) -> nn.Module:
    r"""A deep copy of ``model`` in which every ``FusedTiedConv2d`` is a plain ``nn.Conv2d``,
    every ``FusedTiedConv1d`` a plain ``nn.Conv1d``, every ``FusedTiedConv3d`` a plain ``nn.Conv3d``,
    every ``FusedTiedConvTranspose2d`` a plain ``nn.ConvTranspose2d`` and every ``FusedTiedLinear``
    a plain ``nn.Linear`` (``to_linear``).

    Each tied layer becomes the ``nn.Conv2d`` of ``FusedTiedConv2d.to_conv2d`` (the ``nn.Conv1d`` of
    ``FusedTiedConv1d.to_conv1d``, the ``nn.Conv3d`` of ``FusedTiedConv3d.to_conv3d``, the
    ``nn.ConvTranspose2d`` of ``FusedTiedConvTranspose2d.to_conv_transpose2d``, with a copy of that
    layer's own bias): f(W) and g(b) computed once from the source's current values and stored as that conv's own
    parameters, with the layer's geometry (``padding_mode`` included), dtype, device, training flag,
    ``requires_grad`` and forward/backward hooks. Everything else is the deep copy: the sources stay
    (with their own parameters), so do submodules of every kind (``nn.Sequential``,
    ``nn.ModuleDict``, custom modules); a tied layer registered under two names becomes one conv
    registered under both. The result computes what ``model`` computes and has no tie left: it needs
    nothing from fusedtie to run or to be saved and loaded, so conv-BN folding
    (``torch.ao.quantization.fuse_modules``, ``torch.nn.utils.fusion.fuse_conv_bn_eval``),
    TorchScript, ONNX and other tools that expect ``nn.Conv2d`` take it as they take any network.
    ``model`` itself is not modified.

    The baked weights are a snapshot: training the baked model trains the copies independently (the
    source and the baked conv are no longer tied), so bake for deployment, after training.

    Args:
        model: any ``nn.Module``; it may itself be a tied layer, whose plain counterpart is then
            returned.

    Returns:
        The baked deep copy; ``model`` itself is not modified.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.

    Examples:
        >>> conv = nn.Conv2d(8, 8, 3, padding=1)
        >>> tied = fusedtie.FusedTiedConv2d(conv, "square")
        >>> net = nn.Sequential(conv, nn.ReLU(), tied, nn.BatchNorm2d(8))
        >>> deployable = fusedtie.bake(net).eval()
        >>> type(deployable[2]).__name__
        'Conv2d'
        >>> x = torch.randn(1, 8, 16, 16)
        >>> torch.allclose(deployable(x), net.eval()(x), atol=1e-5)
        True
        >>> # conv-BN folding, as for any nn.Conv2d
        >>> folded = torch.ao.quantization.fuse_modules(deployable, [["2", "3"]])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusedtie.bake takes an nn.Module, got {type(model).__name__}")
    copied = copy.deepcopy(model)
    if isinstance(copied, _TiedLayer):
        root = _baked(copied)
        remove_source_hooks(root)
        return root
    baked: dict[int, nn.Module] = {}  # one conv per tied layer, however many names it has
    # remove_duplicate=False: a layer registered under two names is replaced under both.
    for parent in list(copied.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, _TiedLayer):
                if id(child) not in baked:
                    baked[id(child)] = _baked(child)
                parent._modules[name] = baked[id(child)]
    for module in copied.modules():
        remove_source_hooks(module)
    return copied


def _baked(layer: _TiedLayer) -> nn.Module:
    """The layer's plain counterpart (``to_conv2d()``, ``to_conv1d()``, ``to_conv3d()``,
    ``to_conv_transpose2d()``) with the layer's call hooks moved onto it."""
    conv = layer._untied()
    for name in _CALL_HOOK_ATTRIBUTES:
        hooks = layer.__dict__.get(name)
        if hooks:
            conv.__dict__[name] = hooks
    return conv
