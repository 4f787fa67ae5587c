"""Training targets of the three detector families, and their decoders.

Points are (x, y) in pixels with the origin at the centre of pixel (0, 0) (the stores'
convention).  torchvision puts the origin at the corner of pixel (0, 0), so the
Keypoint R-CNN target shifts by half a pixel; the grid-cell and density-map targets
are defined on the pixel grid directly.  Each encoder has a decoder and the pair is
tested by a round trip points -> target -> points.
"""

from __future__ import annotations

import numpy as np
import torch

# --- coordinates -------------------------------------------------------------------------


def centre_to_corner(xy):
    """Pixel-centre origin (stores, TrackPy) -> pixel-corner origin (torchvision)."""
    return xy + 0.5


def corner_to_centre(xy):
    """Pixel-corner origin (torchvision) -> pixel-centre origin."""
    return xy - 0.5


# --- Keypoint R-CNN ------------------------------------------------------------------------

BOX_HALF_PX = 3.0  # a smeared spot spans about 6-10 px


def keypoint_target(points_xy, box_half_px: float = BOX_HALF_PX) -> dict:
    """The torchvision Keypoint R-CNN target of an image: a box around each point plus one keypoint.

    Parameters
    ----------
    points_xy : array_like
        Points (N, 2), x and y in pixels from the centre of pixel (0, 0).
    box_half_px : float
        Half the side of each square box (px).

    Returns
    -------
    dict
        ``boxes`` (N, 4) float32 x0, y0, x1, y1 and ``keypoints`` (N, 1, 3) x, y,
        visibility 1, both in torchvision's pixel-corner origin; ``labels`` (N,) int64 ones.
    """
    p = torch.as_tensor(np.asarray(points_xy, np.float32).reshape(-1, 2))
    c = centre_to_corner(p)
    boxes = torch.cat([c - box_half_px, c + box_half_px], dim=1)
    keypoints = torch.cat([c, torch.ones(len(c), 1)], dim=1)[:, None, :]
    return {"boxes": boxes, "labels": torch.ones(len(c), dtype=torch.int64), "keypoints": keypoints}


def keypoint_decode(output: dict) -> tuple[np.ndarray, np.ndarray]:
    """Points (pixel-centre origin) and scores from a Keypoint R-CNN output dict."""
    kp = output["keypoints"].detach().cpu().numpy().reshape(-1, 3)
    return corner_to_centre(kp[:, :2]).astype(np.float64), output["scores"].detach().cpu().numpy()


# --- deepBlink grid cells ------------------------------------------------------------------

CELL_PX = 4


def grid_shape(height: int, width: int, cell: int = CELL_PX) -> tuple[int, int]:
    """Cells (rows, columns) of ``cell`` px covering a ``height`` x ``width`` px image (rounded up)."""
    return -(-height // cell), -(-width // cell)


def grid_target(points_xy, height: int, width: int, cell: int = CELL_PX) -> np.ndarray:
    """The deepBlink grid target (3, Gh, Gw): probability, y offset, x offset of the point in each cell.

    Offsets are the position inside the cell in [0, 1), measured from the cell's
    corner.  A cell holds one point; when two fall in one cell the later one is kept
    (the limitation of deepBlink's encoding, rare at the 4 px cell size).  Points (N, 2)
    are x, y in pixels from the centre of pixel (0, 0); points outside the grid are
    dropped.  ``grid_shape`` gives (Gh, Gw).
    """
    gh, gw = grid_shape(height, width, cell)
    out = np.zeros((3, gh, gw), np.float32)
    for x, y in np.asarray(points_xy, np.float64).reshape(-1, 2):
        u, v = (x + 0.5) / cell, (y + 0.5) / cell  # corner-origin, in cells
        j, i = int(np.floor(u)), int(np.floor(v))
        if 0 <= i < gh and 0 <= j < gw:
            out[:, i, j] = (1.0, v - i, u - j)
    return out


def grid_decode(grid: np.ndarray, threshold: float = 0.5, cell: int = CELL_PX):
    """Points (N, 2) px, pixel-centre origin, and probabilities (N,) of the cells at or above ``threshold``."""
    prob, dy, dx = grid
    i, j = np.nonzero(prob >= threshold)
    x = (j + np.clip(dx[i, j], 0, 1)) * cell - 0.5
    y = (i + np.clip(dy[i, j], 0, 1)) * cell - 0.5
    return np.stack([x, y], axis=1).astype(np.float64), prob[i, j].astype(np.float64)


# --- DM-DetNet density maps ----------------------------------------------------------------

DENSITY_SIGMA_PX = 1.0


def density_target(points_xy, height: int, width: int, sigma_px: float = DENSITY_SIGMA_PX) -> np.ndarray:
    """DM-DetNet target: (H, W) map of Gaussians of ``sigma_px`` px at the points, each with peak 1 (max where they overlap)."""
    out = np.zeros((height, width), np.float32)
    rows = np.arange(height)[:, None]
    cols = np.arange(width)[None, :]
    for x, y in np.asarray(points_xy, np.float64).reshape(-1, 2):
        g = np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * sigma_px**2))
        np.maximum(out, g, out=out)
    return out


def local_maxima(density: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Row, column of 3 x 3 local maxima at or above ``threshold`` (plateaus: first pixel)."""
    d = np.asarray(density, np.float64)
    p = np.pad(d, 1, constant_values=-np.inf)
    h, w = d.shape
    is_max = d >= threshold
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            if di == 0 and dj == 0:
                continue
            nb = p[1 + di:1 + di + h, 1 + dj:1 + dj + w]
            # Strict against earlier neighbours, non-strict against later: one per plateau.
            is_max &= (d > nb) if (di, dj) < (0, 0) else (d >= nb)
    return np.nonzero(is_max)


def subpixel_peak(d: np.ndarray, i, j) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel peak by a parabola through the log of the 3-point neighbourhoods.

    Exact for a Gaussian peak (its log is a parabola).  ``i, j`` are the peaks' rows and
    columns in ``d``; returns their x and y (px), each moved by at most half a pixel
    (not at all at the image's edge).
    """
    h, w = d.shape
    ld = np.log(np.maximum(d, 1e-12))

    def offset(a, b, c):
        denom = a - 2 * b + c
        with np.errstate(divide="ignore", invalid="ignore"):
            off = np.where(denom < 0, 0.5 * (a - c) / denom, 0.0)
        return np.clip(off, -0.5, 0.5)

    il, ir = np.clip(i - 1, 0, h - 1), np.clip(i + 1, 0, h - 1)
    jl, jr = np.clip(j - 1, 0, w - 1), np.clip(j + 1, 0, w - 1)
    oy = np.where((i > 0) & (i < h - 1), offset(ld[il, j], ld[i, j], ld[ir, j]), 0.0)
    ox = np.where((j > 0) & (j < w - 1), offset(ld[i, jl], ld[i, j], ld[i, jr]), 0.0)
    return j + ox, i + oy


def density_decode(density: np.ndarray, threshold: float = 0.3):
    """Points (N, 2) px, pixel-centre origin, and peak values (N,) of a density map's local maxima at or above ``threshold``."""
    d = np.asarray(density, np.float64)
    i, j = local_maxima(d, threshold)
    x, y = subpixel_peak(d, i, j)
    return np.stack([x, y], axis=1), d[i, j]
