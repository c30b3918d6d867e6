"""A faster weight gradient for depthwise convolutions on CPU.

PyTorch's CPU kernel for the weight gradient of a depthwise convolution (groups = channels) is slow on small
feature maps: for the level model's 2x2 and 4x4 maps (batch 320 slices, 5x5 kernels) it takes 40-110 ms a
layer, most of a training step (docs/benchmarks.md, Stage 1, "Depthwise convolutions on CPU"). The
same gradient is a grouped convolution of the input with the output's gradient, the channels as groups and the
batch as each group's input channels, which oneDNN runs several times faster at these sizes.

`DepthwiseConv2d` is an `nn.Conv2d` (same parameters, same state dict) whose training forward on CPU takes
this route when the output is at most `SMALL` pixels wide; the forward pass and the input's gradient are
PyTorch's own, the weight's gradient differs by float rounding only. `fast_depthwise(model)` switches every
eligible convolution of a model in place; `kit.models.create_model` does it for every model it builds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

SMALL = 4  # output width (pixels) up to which the grouped-convolution weight gradient is faster (docs/benchmarks.md)


class _DepthwiseFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return F.conv2d(x, weight, bias, stride, padding, 1, x.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        channels = x.shape[1]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(grad, x, weight, None, ctx.stride, ctx.padding, (1, 1), False,
                                                         (0, 0), channels, (True, False, False))[0]
        if ctx.needs_input_grad[1]:  # channels as groups, the batch as each group's input channels
            n, _, h, w = x.shape
            kh, kw = weight.shape[-2:]
            out = F.conv2d(x.transpose(0, 1).reshape(1, channels * n, h, w), grad.transpose(0, 1).contiguous(),
                           padding=ctx.padding, dilation=ctx.stride, groups=channels)
            grad_w = out[0, :, :kh, :kw].reshape(weight.shape).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


class DepthwiseConv2d(nn.Conv2d):
    """nn.Conv2d with groups = in_channels = out_channels whose CPU training step uses `_DepthwiseFn` on small
    outputs in float32 without autocast (see the module's docstring); everything else is nn.Conv2d's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and torch.is_grad_enabled() and self.weight.requires_grad
                and x.dtype == self.weight.dtype == torch.float32 and x.dim() == 4 and not _cpu_autocast()
                and (x.shape[-1] + 2 * self.padding[1] - self.kernel_size[1]) // self.stride[1] + 1 <= SMALL):
            return _DepthwiseFn.apply(x, self.weight, self.bias, self.stride, self.padding)
        return super().forward(x)


def eligible(module: nn.Module) -> bool:
    """A plain nn.Conv2d that is depthwise (one filter per channel), zero-padded by integers, undilated."""
    return (type(module) is nn.Conv2d and module.groups > 1
            and module.groups == module.in_channels == module.out_channels
            and module.padding_mode == "zeros" and not isinstance(module.padding, str)
            and module.dilation == (1, 1))


def fast_depthwise(model: nn.Module) -> int:
    """Switch every eligible depthwise convolution of `model` to `DepthwiseConv2d` in place (parameters and
    state-dict keys unchanged); returns how many were switched."""
    switched = 0
    for module in model.modules():
        if eligible(module):
            module.__class__ = DepthwiseConv2d
            switched += 1
    return switched
