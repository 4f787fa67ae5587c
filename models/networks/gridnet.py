"""Grid-cell network after deepBlink: a U-Net with squeeze-excitation blocks whose output
grid has one cell per 4 x 4 pixels, each predicting (probability, dy, dx) of one spot.

Loss: dice on the probabilities + 2 x RMSE of the offsets in cells holding a spot
(deepBlink's recipe, trained with AMSGrad).  Targets and decoding are those of
``loaders.targets.grid_target`` / ``grid_decode``.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch
from pydantic import Field
from torch import nn

from loaders.targets import CELL_PX, grid_decode, grid_target

from factory.config import StrictModel

from .blocks import UNet, normalize_images, pad_to_multiple

LABEL = "Grid-cell net (deepBlink-style)"
TRAIN_DEFAULTS = {"optimizer": "amsgrad", "lr": 1e-3}  # deepBlink trains with AMSGrad
PIXELS_PER_BATCH = 2**16


class Params(StrictModel):
    widths: list[Annotated[int, Field(ge=1, le=1024)]] = Field(default=[32, 64, 128], min_length=2)


class GridNet(nn.Module):
    def __init__(self, widths=(32, 64, 128)):
        super().__init__()
        widths = tuple(widths) + (widths[-1],)  # one more level so a stride-4 decoder exists
        self.unet = UNet(1, widths, se=True, out_stride=CELL_PX)
        self.head = nn.Conv2d(self.unet.out_channels, 3, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> (B, 3, ceil(H/4), ceil(W/4)): probability, dy, dx in [0, 1]."""
        h, w = images.shape[-2:]
        x, _ = pad_to_multiple(normalize_images(images), self.unet.multiple)
        out = torch.sigmoid(self.head(self.unet(x)))
        return out[..., : -(-h // CELL_PX), : -(-w // CELL_PX)]


def build(params: Params) -> GridNet:
    return GridNet(params.widths)


def targets(centroids: torch.Tensor, h: int, w: int) -> torch.Tensor:
    c = centroids.cpu().numpy()
    out = [grid_target(ci[np.isfinite(ci).all(-1)], h, w) for ci in c]
    return torch.from_numpy(np.stack(out)).to(centroids.device)


def dice_loss(p: torch.Tensor, t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return 1 - (2 * (p * t).sum() + eps) / (p.sum() + t.sum() + eps)


def loss(model, images, centroids):
    out = model(images)
    t = targets(centroids, images.shape[-2], images.shape[-1])
    dice = dice_loss(out[:, 0], t[:, 0])
    mask = t[:, 0] > 0.5
    if mask.any():
        rmse = torch.sqrt((((out[:, 1:] - t[:, 1:]) ** 2).permute(0, 2, 3, 1)[mask]).sum(-1).mean() + 1e-8)
    else:
        rmse = out.sum() * 0.0
    return dice + 2 * rmse, {"dice": dice.item(), "rmse_cells": rmse.item()}


def predict(model: GridNet, images: torch.Tensor, min_score: float = 0.01):
    return decode(model(images), min_score)


@torch.no_grad()
def decode(out: torch.Tensor, min_score: float = 0.01):
    res = []
    for g in out.cpu().numpy():
        xy, p = grid_decode(g, threshold=min_score)
        res.append((xy, p, None))
    return res
