"""z-stack acquisition: a stack's planes become one store row.

The planes are simulated as consecutive raster frames of one random stream (the kernel).

The kernel images plane ``k`` of a stack in frame ``k`` of the stream, with the focal
plane at ``plane_z_um[k]``, and accumulates the truth per frame.  Every plane has the
same ``H * W`` pixel time steps, so the stack's trajectory centroid (the mean position
over all its pixel steps) is the mean of the plane centroids, and the stack's
exposure-weighted position and time weight each plane's by that plane's summed signal.
"""

from __future__ import annotations

import numpy as np

# Arrays the kernel fills per frame that only stack stores keep.
Z_TRUTH = ("centroid_z_um", "exposure_z_um", "exposure_weight")


def weighted_mean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean over axis 1 of (n, Z, P[, k]) values weighted by (n, Z, P); NaN where no weight."""
    w = weights if values.ndim == weights.ndim else weights[..., None]
    total = w.sum(1)
    v = np.where(w > 0, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (w * v).sum(1) / total, np.nan)


def stack_rows(frames: dict, planes: int, plane_z_um, height: int, width: int) -> dict:
    """Per-frame kernel arrays of ``n * planes`` frames -> the arrays of ``n`` stack rows."""
    n = len(frames["images"]) // planes
    Z = planes

    def by_plane(a):
        return a.reshape((n, Z) + a.shape[1:])

    c = by_plane(frames["centroids"].astype(np.float64))  # (n, Z, P, 2)
    cz = by_plane(frames["centroid_z_um"].astype(np.float64))
    w = by_plane(frames["exposure_weight"])
    centroids = c.mean(1)
    n_part = by_plane(frames["n_particles"])[:, 0]
    P = centroids.shape[1]
    real = np.arange(P)[None, :] < n_part[:, None]
    ex = weighted_mean(by_plane(frames["exposure_xy"].astype(np.float64)), w)
    ez = weighted_mean(by_plane(frames["exposure_z_um"].astype(np.float64)), w)
    et = weighted_mean(by_plane(frames["exposure_t_s"]), w)
    x, y = centroids[..., 0], centroids[..., 1]
    with np.errstate(invalid="ignore"):
        in_view = real & (x >= -0.5) & (x < width - 0.5) & (y >= -0.5) & (y < height - 0.5)
    out = {
        "images": by_plane(frames["images"]),
        "n_particles": n_part,
        "centroids": centroids.astype(np.float32),
        "centroid_z_um": cz.mean(1).astype(np.float32),
        "diffusion": by_plane(frames["diffusion"])[:, 0],
        "n_qd": by_plane(frames["n_qd"])[:, 0],
        "exposure_xy": ex.astype(np.float32),
        "exposure_z_um": ez.astype(np.float32),
        "exposure_t_s": et,
        "in_view": in_view.astype(np.uint8),
        "plane_start_s": by_plane(frames["frame_start_s"]),
        "plane_z_um": np.broadcast_to(np.asarray(plane_z_um, np.float32), (n, Z)).copy(),
    }
    if "on_fraction" in frames:  # every plane has the same pixel steps: the mean of the planes'
        out["on_fraction"] = by_plane(frames["on_fraction"]).mean(1)
    if "expected" in frames and len(frames["expected"]) == len(frames["images"]):
        out["expected"] = by_plane(frames["expected"])
    if "trajectories" in frames and len(frames["trajectories"]) == len(frames["images"]):
        t = by_plane(frames["trajectories"])  # (n, Z, P, T, 3) -> (n, P, Z * T, 3)
        out["trajectories"] = np.ascontiguousarray(t.transpose(0, 2, 1, 3, 4)).reshape(n, P, -1, 3)
    return out


def as_rows(frames: dict, planes: int, plane_z_um, height: int, width: int) -> dict:
    """Store rows from the kernel's frames.

    One row per frame for images and movies (``planes`` None; their z truth is not
    stored), one per stack of ``planes`` frames for stacks.
    """
    if planes is None:
        return {k: v for k, v in frames.items() if k not in Z_TRUTH}
    return stack_rows(frames, planes, plane_z_um, height, width)
