"""`LowBitLinear` and `LowBitConv2d`: drop-in modules that hold packed codes and call the custom ops."""

from __future__ import annotations

import torch
from torch import nn

from fxpress.kernels import ops
from fxpress.kernels.packing import field_width, pack_words


class _LowBitBase(nn.Module):
    """Shared state: packed codes, scales, optional bias, and the grid they came from.

    `scale` is per output channel (N,) or group-wise (N, G). `kernels` names the ops this layer runs
    (ops.registered_kernels(); "reference" until a backend lowers it); `fallback`, when set by a
    backend, is the reason this layer runs the plain torch reference instead of that backend's kernels.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 qmin: int, levels: int, weight_shape: tuple[int, ...]):
        super().__init__()
        self.levels, self.offset = int(levels), int(-qmin)
        self.width = field_width(self.levels)
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.kernels: str = ops.REFERENCE
        self.fallback: str | None = None
        self.register_buffer("packed", pack_words((codes + self.offset).reshape(codes.shape[0], -1), self.width))
        self.register_buffer("scale", scale.clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def cols(self) -> int:
        return int(torch.Size(self.weight_shape[1:]).numel())

    def codes(self) -> torch.Tensor:
        """Return the signed integer codes, shaped like the weight."""
        return ops.unpack_words(self.packed, self.width, self.cols).reshape(self.weight_shape) - self.offset

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (for code that reads `.weight.dtype` or `.weight.shape`)."""
        w = ops.dequantize(self.packed, self.scale, self.width, self.offset, self.cols)
        return w.reshape(self.weight_shape)

    def to_dense(self) -> nn.Module:
        """A float32 nn.Linear / nn.Conv2d computing what this layer computes (for runtimes without low-bit ops)."""
        dense = self._empty_dense()
        with torch.no_grad():
            dense.weight.copy_(self.weight.to(torch.float32))
            if self.bias is not None:
                dense.bias.copy_(self.bias.to(torch.float32))
        return dense


class LowBitLinear(_LowBitBase):
    """A linear layer whose weight is stored as low-bit codes with per-output-channel scales."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, qmin: int,
                 levels: int):
        super().__init__(codes, scale, bias, qmin, levels, tuple(codes.shape))
        self.out_features, self.in_features = self.weight_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = ops.linear_reference if self.fallback else ops.kernels_for(self.kernels)[0]
        return op(x, self.packed, self.scale, self.bias, self.width, self.offset, self.in_features)

    def _empty_dense(self) -> nn.Linear:
        return nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, levels={self.levels}"


class LowBitConv2d(_LowBitBase):
    """A conv2d layer (zero padding) whose weight is stored as low-bit codes."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, qmin: int,
                 levels: int, stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                 groups: int):
        super().__init__(codes, scale, bias, qmin, levels, tuple(codes.shape))
        self.stride, self.padding, self.dilation = list(stride), list(padding), list(dilation)
        self.groups = int(groups)
        self.out_channels, self.in_channels = self.weight_shape[0], self.weight_shape[1] * self.groups
        self.kernel_size = tuple(self.weight_shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = ops.conv2d_reference if self.fallback else ops.kernels_for(self.kernels)[1]
        return op(x, self.packed, self.scale, self.bias, self.width, self.offset, list(self.weight_shape),
                  self.stride, self.padding, self.dilation, self.groups)

    def _empty_dense(self) -> nn.Conv2d:
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, bias=self.bias is not None)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, levels={self.levels}"


def conv_geometry(module: nn.Conv2d) -> dict:
    """Return the stride/padding/dilation/groups of a zero-padded Conv2d; raises ValueError otherwise."""
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise ValueError(f"padding {module.padding!r} with mode {module.padding_mode!r} is not supported")
    return {"stride": tuple(module.stride), "padding": tuple(module.padding),
            "dilation": tuple(module.dilation), "groups": module.groups}
