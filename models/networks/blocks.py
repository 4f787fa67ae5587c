"""Building blocks shared by the networks: convolutions, squeeze-excitation, residual
blocks, a U-Net, and padding so any image size works."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def normalize_images(x: torch.Tensor) -> torch.Tensor:
    """Per-image standardisation: counts of any gain or background become comparable.

    The guard against a zero spread adds 1e-3 to a spread of a count or more (photon
    counts; what every model was trained on) and 1e-3 of itself below that, so that
    pixels of any scale (a float recording scaled to 0 - 1 has a spread of about 1e-4)
    standardise alike; a flat image gives zeros.
    """
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = x.std(dim=(-2, -1), keepdim=True)
    guarded = std + 1e-3 * std.clamp(max=1.0)
    return (x - mean) / torch.where(guarded > 0, guarded, torch.ones_like(guarded))


def pad_to_multiple(x: torch.Tensor, m: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad (replicate) bottom/right to a multiple of ``m``; returns the original (H, W)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % m, (-w) % m
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, (h, w)


class _ScaleChannels(torch.autograd.Function):
    """``x * weight`` per output channel, with a 1 x 1 convolution's gradients."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return x * weight.view(1, -1, 1, 1)

    @staticmethod
    def backward(ctx, grad):
        # The convolution's own backward kernels, so training stays bit-identical to a
        # plain nn.Conv2d (a reduction of x * grad would sum in another order).
        x, weight = ctx.saved_tensors
        gx = torch.nn.grad.conv2d_input(x.shape, weight, grad) if ctx.needs_input_grad[0] else None
        gw = torch.nn.grad.conv2d_weight(x, weight.shape, grad) if ctx.needs_input_grad[1] else None
        return gx, gw


class Conv1x1(nn.Conv2d):
    """A 1 x 1 convolution without bias.  From one input channel it is a product per
    output channel, and is computed as one: oneDNN's kernel for that shape took 3.5 ms
    per 256 x 256 channels-last image here against 0.03 ms, with the same bits (each
    output is one rounded product either way)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 1, bias=False)

    def forward(self, x):
        return _ScaleChannels.apply(x, self.weight) if self.in_channels == 1 else super().forward(x)


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, dilation: int = 1, norm: str = "batch"):
        layers = [nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False)]
        layers.append(nn.BatchNorm2d(cout) if norm == "batch" else nn.InstanceNorm2d(cout, affine=True))
        layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    """Channel attention of deepBlink's blocks."""

    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(c, max(c // r, 4)), nn.ReLU(inplace=True),
                                nn.Linear(max(c // r, 4), c), nn.Sigmoid())

    def forward(self, x):
        w = self.fc(x.mean(dim=(-2, -1)))
        return x * w[:, :, None, None]


class ResBlock(nn.Module):
    """Two 3 x 3 convolutions with a skip; optional squeeze-excitation."""

    def __init__(self, cin: int, cout: int, dilation: int = 1, se: bool = False, norm: str = "batch"):
        super().__init__()
        self.body = nn.Sequential(
            ConvBlock(cin, cout, dilation, norm),
            nn.Conv2d(cout, cout, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout) if norm == "batch" else nn.InstanceNorm2d(cout, affine=True),
        )
        self.se = SqueezeExcite(cout) if se else nn.Identity()
        self.skip = nn.Identity() if cin == cout else Conv1x1(cin, cout)

    def forward(self, x):
        return F.relu(self.se(self.body(x)) + self.skip(x))


class UNet(nn.Module):
    """A small U-Net: ``depth`` poolings, residual blocks, dilated bottleneck.

    Returns full-resolution features with ``widths[0]`` channels, or, with
    ``out_stride`` = 2**k, the decoder's features at that stride."""

    def __init__(self, cin: int = 1, widths=(32, 64, 128), se: bool = False, norm: str = "batch",
                 out_stride: int = 1, bottleneck_dilations=(1, 2)):
        super().__init__()
        self.depth = len(widths) - 1
        self.stem = ResBlock(cin, widths[0], se=se, norm=norm)
        self.down = nn.ModuleList(ResBlock(widths[i], widths[i + 1], se=se, norm=norm) for i in range(self.depth))
        self.mid = nn.Sequential(*[ResBlock(widths[-1], widths[-1], dilation=d, se=se, norm=norm)
                                   for d in bottleneck_dilations])
        levels = self.depth - (out_stride.bit_length() - 1)
        self._decoder_args = (tuple(widths), levels, se, norm)
        self.up = self.new_decoder()
        self.multiple = 2 ** self.depth
        self.out_channels = widths[self.depth - levels]

    def new_decoder(self, levels: int | None = None) -> nn.ModuleList:
        """A freshly initialised decoder of this U-Net's shape (``levels`` from the
        bottleneck up: fewer stop short of full resolution)."""
        widths, own, se, norm = self._decoder_args
        levels = own if levels is None else levels
        return nn.ModuleList(ResBlock(widths[i + 1] + widths[i], widths[i], se=se, norm=norm)
                             for i in reversed(range(self.depth - levels, self.depth)))

    def forward(self, x):
        return self.decode(*self.encode(x))

    def encode(self, x) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The bottleneck features and the skips, finest first."""
        skips = [self.stem(x)]
        for down in self.down:
            skips.append(down(F.max_pool2d(skips[-1], 2)))
        return self.mid(skips.pop()), skips

    def decode(self, y, skips, up: nn.ModuleList | None = None):
        """Decode with this U-Net's decoder, or with ``up``, a decoder of the same shape
        (a second output branch on the one encoder)."""
        skips = list(skips)
        for block in (self.up if up is None else up):
            skip = skips.pop()
            y = F.interpolate(y, size=skip.shape[-2:], mode="nearest")
            y = block(torch.cat([y, skip], dim=1))
        return y
