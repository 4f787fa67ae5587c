"""Montages of simulated images with the ground truth drawn over them."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import FactoryError, StoreError
from .stores import Store

# What a preview can be written as (.gif: an animation, movie stores only).
PICTURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".gif")


def preview_store(path: str | Path, out: str | Path, n: int = 16, start: int = 0, movie: int = 0,
                  stage: Callable[[Path], AbstractContextManager[Path]] | None = None) -> Path:
    """Draw a store's images with their truth into a picture (``factory.preview_store``).

    A store of independent images (or z-stacks) gives a montage of ``n`` images from
    ``start`` on (``preview``); a movie store gives a strip of ``n`` frames of movie
    ``movie``, or with an ``out`` ending in .gif an animation of the whole movie
    (``movie_preview``).

    Parameters
    ----------
    path : str or Path
        A store (``.h5`` or ``.zarr``).
    out : str or Path
        The picture: ``.png``, ``.pdf``, ``.svg``, ``.jpg``, or ``.gif`` for a movie store.
    n : int
        Images in the montage, or frames in a movie's strip (fewer when the store or
        the movie ends first).
    start : int
        Index of the first image of the montage; any store: below the store's length.
    movie : int
        Movie stores: which movie to draw (from 0).
    stage : callable, optional
        ``stage(out)`` gives a context manager that yields where to draw the picture and
        puts it at ``out`` when its block succeeds (`factory preview` passes
        ``models.recordings.outputs.staged_output``, which also refuses to replace a
        picture without ``--overwrite``); it is entered before the store is opened.
        Default: drawn at ``out`` directly.

    Returns
    -------
    Path
        ``out``, the picture written (what `factory preview` prints).

    Raises
    ------
    FactoryError
        ``out`` not of a suffix above (before anything else), or a .gif of a store of
        independent images; what ``stage`` raises.
    StoreError
        ``path`` is not a readable store, ``start`` is beyond its last image, or the
        store has no movie ``movie``.

    Examples
    --------
    >>> from factory import preview_store
    >>> preview_store("data/val.h5", "val.png", n=9)  # doctest: +SKIP
    PosixPath('val.png')
    """
    out = Path(out)
    if out.suffix.lower() not in PICTURE_SUFFIXES:
        raise FactoryError(f"{out}: --out must end in .png, .pdf, .svg, .jpg or .gif")
    with (stage or nullcontext)(out) as picture:
        with Store(path) as st:
            is_movie = st.kind == "movies" and "exposure_xy" in st
            if start >= len(st):
                raise StoreError(f"{path}: --start {start} is beyond the last image ({len(st) - 1})")
        if is_movie:
            try:
                movie_preview(path, picture, movie, n)
            except ValueError as exc:
                raise StoreError(f"{path}: --movie: {exc}") from None
        elif out.suffix.lower() == ".gif":
            raise FactoryError(f"{out}: a .gif animates a movie store; {path} holds independent images")
        else:
            preview(path, picture, n, start)
    return out


def preview(path: str | Path, out: str | Path, n: int = 16, start: int = 0,
            predictions=None) -> Path:
    """Draw ``n`` images from ``start`` on (stacks: their maximum over z) with their truth.

    Writes a montage to ``out`` (a PNG or any format Matplotlib writes) and returns it.
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
    stacks = images.ndim == 4
    if stacks:  # z-stacks: seen from above (the maximum over the planes)
        images = images.max(axis=1)
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
        label = f"#{start + i}" + (" max over z" if stacks else "") + (f"  D={d[0]:.2f}" if len(d) else "")
        ax.set_title(label, fontsize=8)
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def movie_preview(path: str | Path, out: str | Path, movie: int = 0, n_frames: int = 8) -> Path:
    """A strip of a movie's frames with each particle's path and both truths.

    Every particle has its colour: its path of exposure positions over the whole movie
    (thin line), the whole-frame trajectory centroid (x) and the exposure-weighted
    position (o, what the laser saw) in each frame, drawn where the particle is in view.
    An output ending in .gif is an animation of the whole movie instead.  Returns ``out``;
    ValueError when the store has no movie ``movie``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    with Store(path) as st:
        F = st.dataset.movie.n_frames if st.kind == "movies" else 1
        n_movies = len(st) // F
        if not 0 <= movie < n_movies:
            raise ValueError(f"movie {movie} is out of range (the store has movies 0..{n_movies - 1})")
        a, b = movie * F, (movie + 1) * F
        images = st.read("images", a, b)
        centroids, exposure = st.read("centroids", a, b), st.read("exposure_xy", a, b)
        in_view, count = st.read("in_view", a, b).astype(bool), int(st.read("n_particles", a, a + 1)[0])
        diffusion, t0 = st.read("diffusion", a, a + 1)[0], st.read("frame_start_s", a, b)
    h, w = images.shape[1:]
    colours = plt.cm.tab10(np.arange(max(count, 1)) % 10)
    vmax = np.percentile(images, 99.5)

    def draw(ax, f):
        ax.imshow(images[f], cmap="gray", interpolation="nearest", vmin=0, vmax=vmax)
        for p in range(count):
            ax.plot(exposure[:, p, 0], exposure[:, p, 1], color=colours[p], lw=0.6, alpha=0.6)
            if in_view[f, p]:
                ax.plot(*centroids[f, p], marker="x", color=colours[p], ms=6, mew=1.5)
                ax.plot(*exposure[f, p], marker="o", mfc="none", mec=colours[p], ms=8, mew=1.2)
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.axis("off")
        ax.set_title(f"frame {f}, t = {1000 * t0[f]:.0f} ms", fontsize=8)

    out.parent.mkdir(parents=True, exist_ok=True)
    title = (f"{Path(path).name} movie {movie}: {count} particles, D "
             + ", ".join(f"{d:.2f}" for d in diffusion[:count]) + " um^2/s; x centroid, o exposure position")
    if out.suffix.lower() == ".gif":
        from matplotlib.animation import FuncAnimation, PillowWriter

        fig, ax = plt.subplots(figsize=(4, 4 * h / w + 0.4))

        def update(f):
            ax.clear()
            draw(ax, f)

        anim = FuncAnimation(fig, update, frames=F)
        anim.save(out, writer=PillowWriter(fps=max(1, int(round(1 / max(t0[1] - t0[0], 1e-3)))) if F > 1 else 1))
        plt.close(fig)
        return out
    k = min(n_frames, F)
    fig, axes = plt.subplots(1, k, figsize=(2.3 * k, 2.3 * h / w + 0.5), squeeze=False)
    for f in range(k):
        draw(axes[0, f], f)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
