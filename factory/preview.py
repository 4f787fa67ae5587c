"""Montages of simulated images with the ground truth drawn over them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .stores import Store


def preview(path: str | Path, out: str | Path, n: int = 16, start: int = 0,
            predictions=None) -> Path:
    """Draw ``n`` images from a store with their trajectories and centroids.

    Trajectories are green lines, true centroids green crosses; ``predictions`` (a
    DataFrame with frame, x, y) are drawn as magenta circles.  Pixel centres sit on
    integer coordinates, as in the stores.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    with Store(path) as st:
        total = len(st)
        n = max(1, min(n, total - start))
        images = st.read("images", start, start + n)
        centroids = st.read("centroids", start, start + n)
        counts = st.read("n_particles", start, start + n)
        traj = st.read("trajectories", start, start + n) if "trajectories" in st else None
        diffusion = st.read("diffusion", start, start + n)
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    h, w = images.shape[1:]
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols * max(1.0, w / h), 2.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        ax = axes.ravel()[i]
        ax.imshow(images[i], cmap="gray", interpolation="nearest")
        for p in range(counts[i]):
            if traj is not None:
                ax.plot(traj[i, p, :, 0], traj[i, p, :, 1], color="#2ca02c", lw=0.6, alpha=0.8)
            ax.plot(*centroids[i, p], marker="x", color="#2ca02c", ms=7, mew=2)
        if predictions is not None:
            sel = predictions[predictions["frame"] == start + i]
            ax.plot(sel["x"], sel["y"], "o", mfc="none", mec="#e377c2", ms=8, mew=1.5)
        d = diffusion[i][np.isfinite(diffusion[i])]
        label = f"#{start + i}" + (f"  D={d[0]:.2f}" if len(d) else "")
        ax.set_title(label, fontsize=8)
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
