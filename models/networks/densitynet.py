"""Density-map network after DM-DetNet: a residual hourglass with instance norm and a
sigmoid output that regresses a map of Gaussians at the spots (peak 1), trained with the
adaptive wing loss times a weight map; local maxima with sub-pixel refinement give the
detections.  The loss and weight map work on 2D maps and 3D stacks alike.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from loaders.targets import density_target, local_maxima, subpixel_peak

from factory.config import StrictModel

from .blocks import UNet, normalize_images, pad_to_multiple

LABEL = "Density-map net (DM-DetNet-style)"
TRAIN_DEFAULTS: dict = {}
PIXELS_PER_BATCH = 2**16


class Params(StrictModel):
    widths: list[Annotated[int, Field(ge=1, le=1024)]] = Field(default=[32, 64, 128], min_length=2)

# DM-DetNet's constants.
ALPHA, OMEGA, EPSILON, THETA = 2.1, 14.0, 1.0, 0.5
LAMBDA, WEIGHT_THRESHOLD = 10.0, 0.2


class DensityNet(nn.Module):
    def __init__(self, widths=(32, 64, 128)):
        super().__init__()
        self.unet = UNet(1, tuple(widths), norm="instance")
        self.head = nn.Conv2d(self.unet.out_channels, 1, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x, (h, w) = pad_to_multiple(normalize_images(images), self.unet.multiple)
        return torch.sigmoid(self.head(self.unet(x)))[:, 0, :h, :w]


def awing(pred: torch.Tensor, target: torch.Tensor, alpha=ALPHA, omega=OMEGA, epsilon=EPSILON,
          theta=THETA) -> torch.Tensor:
    """Adaptive wing loss per element (Wang et al. 2019, as used by DM-DetNet).

    Small errors: omega * ln(1 + (|y - yhat| / epsilon) ** (alpha - y)); large errors:
    A |y - yhat| - C, with A and C making the two branches meet with the same value and
    slope at |y - yhat| = theta.  (Dividing by omega instead of epsilon in the small
    branch, a known wrong variant, breaks that continuity.)"""
    d = (pred - target).abs()
    power = alpha - target
    ratio = theta / epsilon
    A = omega * (1 / (1 + ratio**power)) * power * ratio ** (power - 1) / epsilon
    C = theta * A - omega * torch.log1p(ratio**power)
    small = omega * torch.log1p((d / epsilon) ** power)
    large = A * d - C
    return torch.where(d < theta, small, large)


def weight_map(target: torch.Tensor, lam: float = LAMBDA, threshold: float = WEIGHT_THRESHOLD) -> torch.Tensor:
    """lambda + 1 where a 3 x 3 (x 3) grey dilation of the target exceeds ``threshold``, else 1."""
    if target.dim() == 3:  # (B, H, W)
        dil = F.max_pool2d(target[:, None], 3, 1, 1)[:, 0]
    elif target.dim() == 4:  # (B, D, H, W)
        dil = F.max_pool3d(target[:, None], 3, 1, 1)[:, 0]
    else:
        raise ValueError(f"target must be (B, H, W) or (B, D, H, W), got {tuple(target.shape)}")
    return 1 + lam * (dil > threshold).float()


def build(params: Params) -> DensityNet:
    return DensityNet(params.widths)


def targets(centroids: torch.Tensor, h: int, w: int) -> torch.Tensor:
    c = centroids.cpu().numpy()
    return torch.from_numpy(np.stack([density_target(ci[np.isfinite(ci).all(-1)], h, w) for ci in c])).to(centroids.device)


def loss(model, images, centroids):
    pred = model(images)
    t = targets(centroids, images.shape[-2], images.shape[-1])
    value = (awing(pred, t) * weight_map(t)).mean()
    return value, {"awing": value.item()}


def predict(model: DensityNet, images: torch.Tensor, min_score: float = 0.01):
    return decode(model(images), min_score)


@torch.no_grad()
def decode(pred: torch.Tensor, min_score: float = 0.01):
    res = []
    for d in pred.cpu().numpy().astype(np.float64):
        i, j = local_maxima(d, min_score)
        x, y = subpixel_peak(d, i, j)
        res.append((np.stack([x, y], 1), d[i, j], None))
    return res
