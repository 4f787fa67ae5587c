"""Augmentations that respect the laser scan: the one place that knows how flips act.

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
# op -> (image axis it mirrors, point coordinate it mirrors: 0 = x, 1 = y)
AXES = {"hflip": (-1, 0), "vflip": (-2, 1)}
# The four flips of test-time averaging: identity, x, y, both.
ALL_FLIPS = ((), ("hflip",), ("vflip",), ("hflip", "vflip"))


def mirror(coord, size: int):
    """A pixel-centre coordinate after mirroring an axis of ``size`` pixels."""
    return (size - 1) - coord


def flip(image: torch.Tensor, points: torch.Tensor, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror an image (..., H, W) and its points (..., 2) along x (hflip) or y (vflip).

    Parameters
    ----------
    image : torch.Tensor
        Images (..., H, W).
    points : torch.Tensor
        Points (..., 2), x and y in pixels from the centre of pixel (0, 0); NaN stays NaN.
    op : {"hflip", "vflip"}
        The flip.

    Returns
    -------
    image, points : torch.Tensor
        New tensors; the inputs are left as they are.
    """
    axis, k = AXES[op]
    p = points.clone()
    p[..., k] = mirror(p[..., k], image.shape[axis])
    return image.flip(axis), p


def hflip(image: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror along x: column c -> W - 1 - c."""
    return flip(image, points, "hflip")


def vflip(image: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror along y: row r -> H - 1 - r."""
    return flip(image, points, "vflip")


def image_dims(ops) -> tuple[int, ...]:
    """The image axes a sequence of flips mirrors (for ``tensor.flip``)."""
    return tuple(AXES[o][0] for o in ops)


class RandomFlips:
    """Random horizontal and vertical flips of an (image, target) item.

    Deterministic for a given ``seed``, item index (``target["index"]``) and epoch
    (``self.epoch``, 0 until set), so a run reproduces on any number of workers.
    Called as ``image, target = flips(image, target)``; ``target["centroids"]`` (P, 2)
    px moves with the image.

    Parameters
    ----------
    ops : sequence of {"hflip", "vflip"}
        The flips that may be applied, each on its own.
    p : float
        Probability of each flip.
    seed : int
        Seed of the draws.

    Raises
    ------
    ValueError
        An op that is not a flip (a transpose or rotation swaps the fast and slow scan
        axes).
    """

    def __init__(self, ops=ALLOWED, p: float = 0.5, seed: int = 0):
        bad = [o for o in ops if o not in ALLOWED]
        if bad:
            why = " (it swaps the fast and slow scan axes)" if bad[0] in FORBIDDEN else ""
            raise ValueError(f"augmentation {bad[0]!r} is not allowed{why}; allowed: {', '.join(ALLOWED)}")
        self.ops, self.p, self.seed, self.epoch = tuple(ops), p, seed, 0

    def __call__(self, image, target):
        """The item flipped: ``(image, target)`` with ``target["centroids"]`` moved along."""
        rng = np.random.default_rng([self.seed, self.epoch, int(target.get("index", 0))])
        pts = target["centroids"]
        for op in self.ops:
            if rng.random() < self.p:
                image, pts = flip(image, pts, op)
        return image, {**target, "centroids": pts}


def flip_batch(images: torch.Tensor, centroids: torch.Tensor, generator: torch.Generator | None = None):
    """Flip each image of a batch (B, 1, H, W) at random, with its (B, P, 2) centroids.

    Each image is flipped along x with probability 1/2 and along y with probability 1/2,
    drawn from ``generator`` (default: torch's global generator).  Returns new tensors
    ``(images, centroids)``.
    """
    chosen = {op: torch.rand(images.shape[0], generator=generator) < 0.5 for op in ALLOWED}
    images, c = images.clone(), centroids.clone()
    for op, sel in chosen.items():
        images[sel], c[sel] = flip(images[sel], c[sel], op)
    return images, c
