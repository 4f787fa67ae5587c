"""Augmentations that respect the laser scan.

A 2PM image is recorded along x (fast axis) then y (slow axis), so the two axes are not
interchangeable: transposes and 90-degree rotations would swap the fast and slow scan
axes and produce blur no microscope makes, so none is offered.  Flips are valid:
Brownian motion is isotropic and time-reversible.  Flipping both axes is exactly the
frame's time reversal; a single flip also reverses the order within each line, which is
exact up to the motion during one line's scan (50 us: about 0.2 px at D = 1.75 um^2/s).
Coordinates move with the pixels (pixel-centre origin: x -> W - 1 - x).
"""

from __future__ import annotations

import numpy as np
import torch

ALLOWED = ("hflip", "vflip")
FORBIDDEN = ("transpose", "rot90", "rotate90", "rot270")


def hflip(image: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror along x: column c -> W - 1 - c."""
    w = image.shape[-1]
    p = points.clone()
    p[..., 0] = (w - 1) - p[..., 0]
    return image.flip(-1), p


def vflip(image: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror along y: row r -> H - 1 - r."""
    h = image.shape[-2]
    p = points.clone()
    p[..., 1] = (h - 1) - p[..., 1]
    return image.flip(-2), p


class RandomFlips:
    """Random horizontal and vertical flips of an (image, target) item.

    Deterministic for a given ``seed``, item index and epoch, so a run reproduces on
    any number of workers."""

    def __init__(self, ops=ALLOWED, p: float = 0.5, seed: int = 0):
        bad = [o for o in ops if o not in ALLOWED]
        if bad:
            why = " (it swaps the fast and slow scan axes)" if bad[0] in FORBIDDEN else ""
            raise ValueError(f"augmentation {bad[0]!r} is not allowed{why}; allowed: {', '.join(ALLOWED)}")
        self.ops, self.p, self.seed, self.epoch = tuple(ops), p, seed, 0

    def __call__(self, image, target):
        rng = np.random.default_rng([self.seed, self.epoch, int(target.get("index", 0))])
        pts = target["centroids"]
        for op in self.ops:
            if rng.random() < self.p:
                image, pts = (hflip if op == "hflip" else vflip)(image, pts)
        return image, {**target, "centroids": pts}


def flip_batch(images: torch.Tensor, centroids: torch.Tensor, generator: torch.Generator | None = None):
    """Flip each image of a batch (B, 1, H, W) at random, with its (B, P, 2) centroids."""
    b, _, h, w = images.shape
    fx = torch.rand(b, generator=generator) < 0.5
    fy = torch.rand(b, generator=generator) < 0.5
    images = images.clone()
    c = centroids.clone()
    images[fx] = images[fx].flip(-1)
    images[fy] = images[fy].flip(-2)
    c[fx, :, 0] = (w - 1) - c[fx, :, 0]
    c[fy, :, 1] = (h - 1) - c[fy, :, 1]
    return images, c
