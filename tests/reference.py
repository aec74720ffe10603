"""The reference oracles: F.conv2d(x, f(W), g(b), ...), F.conv1d(x, f(W), g(b), ...),
F.conv3d(x, f(W), g(b), ...) and F.conv_transpose2d(x, f(W), b, ...) in float64, with f written in
torch ops.

Independent of fusedtie's kernels: f here is PyTorch's own elementwise ops, gradients are autograd's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REFERENCE_TRANSFORMS = {
    "identity": lambda w, alpha: w,
    "square": lambda w, alpha: w**2,
    "abs": lambda w, alpha: torch.abs(w),
    "neg": lambda w, alpha: -w,
    "scale": lambda w, alpha: alpha * w,
    "exp": lambda w, alpha: torch.exp(w),
    "sigmoid": lambda w, alpha: torch.sigmoid(w),
    "tanh": lambda w, alpha: torch.tanh(w),
    "softplus": lambda w, alpha: F.softplus(w),
    "relu": lambda w, alpha: torch.relu(w),
}

SCALE_ALPHA = 0.75


def transform_arg(name: str):
    """What tests pass to fusedtie for a transform name (scale needs its constant)."""
    import fusedtie

    return fusedtie.Transform("scale", alpha=SCALE_ALPHA) if name == "scale" else name


def reference_f(name: str, w: torch.Tensor) -> torch.Tensor:
    return REFERENCE_TRANSFORMS[name](w, SCALE_ALPHA)


def reference_conv2d(
    x, w, b, transform, bias_transform="identity", stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"
):
    """Forward output and (grad_x, grad_w, grad_b) of sum(out * grad_out) in float64.

    Returns (out, grads_fn) where grads_fn(grad_out) gives the source gradients.
    """
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    b64 = None if b is None else b.detach().double().requires_grad_(True)
    xin = x64
    if padding_mode != "zeros":
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        xin = F.pad(x64, (pw, pw, ph, ph), mode=padding_mode)
        padding = 0
    out = F.conv2d(
        xin,
        reference_f(transform, w64),
        None if b64 is None else reference_f(bias_transform, b64),
        stride,
        padding,
        dilation,
        groups,
    )

    def grads(grad_out):
        inputs = [x64, w64] + ([b64] if b64 is not None else [])
        g = torch.autograd.grad(out, inputs, grad_out.double(), retain_graph=True)
        return g[0], g[1], (g[2] if b64 is not None else None)

    return out.detach(), grads


def reference_conv1d(
    x, w, b, transform, bias_transform="identity", stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"
):
    """float64 F.conv1d(x, f(W), g(b)) and a function giving (dL/dx, dL/dW, dL/db) for a grad_out.

    A padding_mode other than "zeros" pads with F.pad first, as nn.Conv1d does ("same" split with the
    odd element on the right); the gradients are autograd's through PyTorch's own ops.
    """
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    b64 = None if b is None else b.detach().double().requires_grad_(True)
    xin = x64
    if padding_mode != "zeros":
        if padding == "same":
            total = (dilation if isinstance(dilation, int) else dilation[0]) * (w.shape[2] - 1)
            sides = (total // 2, total - total // 2)
        elif padding == "valid":
            sides = (0, 0)
        else:
            p = padding if isinstance(padding, int) else padding[0]
            sides = (p, p)
        xin = F.pad(x64, sides, mode=padding_mode)
        padding = 0
    out = F.conv1d(
        xin,
        reference_f(transform, w64),
        None if b64 is None else reference_f(bias_transform, b64),
        stride,
        padding,
        dilation,
        groups,
    )

    def grads(grad_out):
        inputs = [x64, w64] + ([b64] if b64 is not None else [])
        g = torch.autograd.grad(out, inputs, grad_out.double(), retain_graph=True, allow_unused=True)
        g = [torch.zeros_like(t) if gi is None else gi for gi, t in zip(g, inputs)]  # an empty batch
        return g[0], g[1], (g[2] if b64 is not None else None)

    return out.detach(), grads


def reference_conv3d(
    x, w, b, transform, bias_transform="identity", stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"
):
    """float64 F.conv3d(x, f(W), g(b)) and a function giving (dL/dx, dL/dW, dL/db) for a grad_out.

    A padding_mode other than "zeros" pads with F.pad first, as nn.Conv3d does ("same" split with the
    odd element at the back/bottom/right); the gradients are autograd's through PyTorch's own ops.
    """
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    b64 = None if b is None else b.detach().double().requires_grad_(True)
    xin = x64
    if padding_mode != "zeros":
        dil = (dilation,) * 3 if isinstance(dilation, int) else tuple(dilation)
        if padding == "same":
            totals = [dil[d] * (w.shape[2 + d] - 1) for d in range(3)]
            sides = [(t // 2, t - t // 2) for t in totals]
        elif padding == "valid":
            sides = [(0, 0)] * 3
        else:
            p = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
            sides = [(q, q) for q in p]
        xin = F.pad(x64, [s for pair in reversed(sides) for s in pair], mode=padding_mode)
        padding = 0
    out = F.conv3d(
        xin,
        reference_f(transform, w64),
        None if b64 is None else reference_f(bias_transform, b64),
        stride,
        padding,
        dilation,
        groups,
    )

    def grads(grad_out):
        inputs = [x64, w64] + ([b64] if b64 is not None else [])
        g = torch.autograd.grad(out, inputs, grad_out.double(), retain_graph=True, allow_unused=True)
        g = [torch.zeros_like(t) if gi is None else gi for gi, t in zip(g, inputs)]  # an empty batch
        return g[0], g[1], (g[2] if b64 is not None else None)

    return out.detach(), grads


def reference_conv_transpose2d(x, w, b, transform, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """float64 F.conv_transpose2d(x, f(W), b) and a function giving (dL/dx, dL/dW, dL/db) for a grad_out."""
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    b64 = None if b is None else b.detach().double().requires_grad_(True)
    out = F.conv_transpose2d(x64, reference_f(transform, w64), b64, stride, padding, output_padding, groups, dilation)

    def grads(grad_out):
        inputs = [x64, w64] + ([b64] if b64 is not None else [])
        g = torch.autograd.grad(out, inputs, grad_out.double(), retain_graph=True, allow_unused=True)
        g = [torch.zeros_like(t) if gi is None else gi for gi, t in zip(g, inputs)]  # an empty batch
        return g[0], g[1], (g[2] if b64 is not None else None)

    return out.detach(), grads


def nonfinite_mask_differences(ours_and_theirs):
    """For (name, ours, reference) triples: one message per NaN / +Inf / -Inf mask that differs."""

    def masks(t):
        return {"nan": torch.isnan(t), "+inf": torch.isposinf(t), "-inf": torch.isneginf(t)}

    differences = []
    for name, ours, theirs in ours_and_theirs:
        expected_masks = masks(theirs)
        for kind, mask in masks(ours).items():
            expected = expected_masks[kind]
            if not torch.equal(mask, expected):
                differences.append(
                    f"{name} {kind}: fusedtie {int(mask.sum())} elements, F.conv2d "
                    f"{int(expected.sum())}, {int((mask != expected).sum())} differ"
                )
    return differences


def reference_linear(x, w, b, transform, bias_transform="identity", transpose=False):
    """``F.linear(x, f(W), g(b))`` (``x @ f(W) + b`` with ``transpose``) in float64, and a function of a
    gradient of the output giving the gradients with respect to x, W and b (None for no b)."""
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    b64 = None if b is None else b.detach().double().requires_grad_(True)
    fw = reference_f(transform, w64)
    gb = None if b64 is None else reference_f(bias_transform, b64)
    out = x64 @ fw + (0 if gb is None else gb) if transpose else F.linear(x64, fw, gb)
    inputs = [x64, w64] + ([b64] if b64 is not None else [])

    def grads(grad_out):
        computed = torch.autograd.grad(out, inputs, grad_out, retain_graph=True)
        return list(computed) + ([None] if b64 is None else [])

    return out.detach(), grads
