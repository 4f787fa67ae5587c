"""DM-DetNet's 3D detector: a residual hourglass over whole z-stacks that regresses a
density map of anisotropic 3D Gaussians, trained with the adaptive wing loss times the
3D weight map; 3D local maxima with sub-voxel refinement give the detections.

Voxels are anisotropic (the z step is several times the pixel size), and the network
says so explicitly: it pools and upsamples in x and y only, keeping every plane, and the
target Gaussians have their widths in micrometres, converted per axis by the voxel size
of the training data (``pixel_size_um``, ``z_step_um``, filled in from the training
store and kept in the run's config).  Points are voxel coordinates (x px, y px, z in
planes from the first, each voxel's centre at an integer).  Fully convolutional: any
stack size.
"""

from __future__ import annotations

from typing import Annotated, Optional

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from factory.config import ImageSpec, StrictModel

from .densitynet import awing, weight_map

LABEL = "DM-DetNet 3D (ours)"
TRAIN_DEFAULTS: dict = {"batch_size": 8, "val_images": 200, "lr": 2e-3}
PIXELS_PER_BATCH = 2**17  # voxels per inference batch
NDIM = 3


class Params(StrictModel):
    """The 3D density-map network's parameters (``model_params`` of a training config)."""

    widths: list[Annotated[int, Field(ge=1, le=512)]] = Field(default=[8, 16, 32], min_length=2)
    blocks: Annotated[int, Field(ge=1, le=8)] = 1  # residual blocks per level
    sigma_xy_um: Annotated[float, Field(gt=0)] = 0.07  # target Gaussian widths (one px, 0.7 planes)
    sigma_z_um: Annotated[float, Field(gt=0)] = 0.35
    pixel_size_um: Optional[Annotated[float, Field(gt=0)]] = None  # voxel size the targets use
    z_step_um: Optional[Annotated[float, Field(gt=0)]] = None  # (from the training data when None)


def normalize_stacks(x: torch.Tensor) -> torch.Tensor:
    """Per-stack standardisation (B, 1, Z, H, W): one scale for every plane, so the axial
    intensity profile that carries z survives."""
    mean = x.mean(dim=(-3, -2, -1), keepdim=True)
    std = x.std(dim=(-3, -2, -1), keepdim=True)
    return (x - mean) / (std + 1e-3)


class ResBlock3d(nn.Module):
    """Two 3 x 3 x 3 convolutions with instance norm, plus the identity (or a 1 x 1 x 1
    projection when the width changes)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.InstanceNorm3d(cout, affine=True),
            nn.ReLU(inplace=True),
            nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.InstanceNorm3d(cout, affine=True))
        self.skip = nn.Identity() if cin == cout else nn.Conv3d(cin, cout, 1, bias=False)

    def forward(self, x):
        return F.relu(self.body(x) + self.skip(x))


class Hourglass3d(nn.Module):
    def __init__(self, widths=(8, 16, 32), blocks: int = 1):
        super().__init__()
        widths = tuple(widths)
        self.levels = len(widths)
        self.stem = nn.Sequential(nn.Conv3d(1, widths[0], 3, padding=1, bias=False),
                                  nn.InstanceNorm3d(widths[0], affine=True), nn.ReLU(inplace=True))

        def stage(cin, cout):
            return nn.Sequential(*[ResBlock3d(cin if i == 0 else cout, cout) for i in range(blocks)])

        self.down = nn.ModuleList([stage(widths[max(i - 1, 0)], widths[i]) for i in range(len(widths))])
        self.up = nn.ModuleList([stage(widths[i + 1], widths[i]) for i in range(len(widths) - 1)])
        self.skip = nn.ModuleList([ResBlock3d(widths[i], widths[i]) for i in range(len(widths) - 1)])
        self.head = nn.Conv3d(widths[0], 1, 1)
        # Start from a low density everywhere (most voxels are background).
        nn.init.constant_(self.head.bias, -4.0)

    @property
    def multiple(self) -> int:
        return 2 ** (self.levels - 1)

    def forward(self, stacks: torch.Tensor) -> torch.Tensor:
        """(B, 1, Z, H, W) counts -> (B, Z, H, W) density in [0, 1]."""
        x = normalize_stacks(stacks.float())
        h, w = x.shape[-2:]
        m = self.multiple
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        x = self.stem(x)
        skips = []
        for i, stage in enumerate(self.down):
            if i:
                skips.append(x)
                x = F.max_pool3d(x, (1, 2, 2))  # anisotropic voxels: pool in x and y only
            x = stage(x)
        for i in reversed(range(self.levels - 1)):
            x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
            x = self.up[i](x) + self.skip[i](skips[i])
        return torch.sigmoid(self.head(x))[:, 0, :, :h, :w]


def build(params: Params) -> Hourglass3d:
    model = Hourglass3d(params.widths, params.blocks)
    model.sigma_voxels = sigma_voxels(params)
    return model


def sigma_voxels(params: Params) -> tuple[float, float, float]:
    """Target Gaussian widths (z, y, x) in voxels of the training data."""
    px = params.pixel_size_um or ImageSpec().pixel_size_um  # the schema default when the data did not say
    dz = params.z_step_um or 0.5
    return params.sigma_z_um / dz, params.sigma_xy_um / px, params.sigma_xy_um / px


def density_target_3d(points: torch.Tensor, shape, sigma_zyx) -> torch.Tensor:
    """(B, Z, H, W) map of anisotropic Gaussians at the (B, P, 3) voxel points (x, y, z),
    peak 1 (the maximum where they overlap); NaN points are absent."""
    B = points.shape[0]
    Z, H, W = shape
    out = torch.zeros(B, Z, H, W, device=points.device)
    sz, sy, sx = sigma_zyx
    zz = torch.arange(Z, device=points.device, dtype=torch.float32).view(Z, 1, 1)
    yy = torch.arange(H, device=points.device, dtype=torch.float32).view(1, H, 1)
    xx = torch.arange(W, device=points.device, dtype=torch.float32).view(1, 1, W)
    valid = torch.isfinite(points).all(-1)
    for b, p in zip(*torch.nonzero(valid, as_tuple=True)):
        x, y, z = points[b, p].float()
        g = torch.exp(-(xx - x) ** 2 / (2 * sx**2) - (yy - y) ** 2 / (2 * sy**2) - (zz - z) ** 2 / (2 * sz**2))
        out[b] = torch.maximum(out[b], g)
    return out


def loss(model: nn.Module, stacks: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, dict]:
    pred = model(stacks)
    t = density_target_3d(points, pred.shape[-3:], model.sigma_voxels)
    value = (awing(pred, t) * weight_map(t)).mean()
    return value, {"awing": value.item()}


def local_maxima_3d(d: torch.Tensor, threshold: float) -> torch.Tensor:
    """(k, 4) indices (b, z, y, x) of 3 x 3 x 3 local maxima at or above ``threshold``."""
    peak = (d == F.max_pool3d(d[:, None], 3, 1, 1)[:, 0]) & (d >= threshold)
    return torch.nonzero(peak)


def subvoxel(d: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(k, 3) refined (x, y, z) of the peaks ``idx``: per axis, the vertex of the parabola
    through the log of the three neighbouring values (exact for a Gaussian peak); no
    shift at a border."""
    ld = torch.log(d.clamp_min(1e-12))
    b, z, y, x = idx.unbind(1)
    out = []
    for axis, (pos, size) in zip((3, 2, 1), ((x, d.shape[3]), (y, d.shape[2]), (z, d.shape[1]))):
        lo, hi = (pos - 1).clamp(0, size - 1), (pos + 1).clamp(0, size - 1)

        def at(q):
            i = [b, z, y, x]
            i[axis] = q
            return ld[i[0], i[1], i[2], i[3]]

        a, c0, c = at(lo), at(pos), at(hi)
        denom = a - 2 * c0 + c
        off = torch.where(denom < 0, 0.5 * (a - c) / torch.where(denom < 0, denom, -1.0), torch.zeros_like(a))
        inside = (pos > 0) & (pos < size - 1)
        out.append(pos.to(d.dtype) + torch.where(inside, off.clamp(-0.5, 0.5), torch.zeros_like(off)))
    return torch.stack(out, 1)


MAX_PEAKS = 512
VOXELS_PER_PEAK = 16 * 16  # one peak per 16 x 16 px of each plane, as SpotNet's cap per image


@torch.no_grad()
def decode(density: torch.Tensor, min_score: float = 0.05, max_per_stack: int | None = None):
    """Density (B, Z, H, W) -> per stack (xyz voxels (n, 3), score (n,), None).

    At most ``max_per_stack`` peaks per stack, the most probable (default: 512, or one per
    ``VOXELS_PER_PEAK`` voxels in a larger stack, so a 512 x 512 px stack of many planes
    keeps its faint peaks for the evaluation's score sweep)."""
    if max_per_stack is None:
        max_per_stack = max(MAX_PEAKS, density.shape[-3] * density.shape[-2] * density.shape[-1] // VOXELS_PER_PEAK)
    d = density.double()
    idx = local_maxima_3d(d, min_score)
    xyz = subvoxel(d, idx).cpu().numpy()
    score = d[idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3]].cpu().numpy()
    b = idx[:, 0].cpu().numpy()
    bounds = np.searchsorted(b, np.arange(d.shape[0] + 1))
    res = []
    for i in range(d.shape[0]):
        sl = slice(bounds[i], bounds[i + 1])
        keep = np.arange(bounds[i], bounds[i + 1])
        if len(keep) > max_per_stack:
            keep = np.sort(keep[np.argsort(-score[sl], kind="stable")[:max_per_stack]])
        res.append((xyz[keep], score[keep], None))
    return res


def predict(model: Hourglass3d, stacks: torch.Tensor, min_score: float = 0.05):
    return decode(model(stacks), min_score)
