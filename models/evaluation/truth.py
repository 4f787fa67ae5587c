"""Both sides of a score in micrometres: a store's truth and a detector's table.

Detectors return pixels (``frame, x, y``; stacks also ``z`` in planes from the first
plane); users' stack CSVs give ``z_um``.  A store's ``Geometry`` (its pixel size, and
for stacks its z step) turns either into ``Points`` in um, so the metrics are physical
and have one code path for images, movies and stacks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from factory.stores import Store
from loaders.datasets import TARGETS, store_targets

from models.evaluation.metrics import Points


@dataclass(frozen=True)
class Geometry:
    """Pixel size (um) and, for stacks, the z step (um) between planes.

    Turns a detector's table (pixels; stacks also planes) into ``Points`` in um.

    Attributes
    ----------
    pixel_size_um : float
        The pixel size (um), in x and y.
    z_step_um : float or None
        The z step (um) between planes of a stack; None for images and movies.
    """

    pixel_size_um: float
    z_step_um: float | None = None

    @property
    def ndim(self) -> int:
        """2 for images and movies, 3 for stacks (a z step is set)."""
        return 2 if self.z_step_um is None else 3

    @property
    def voxel_um(self) -> np.ndarray:
        """Micrometres per unit of each coordinate a detector returns (x, y[, z]).

        (2,) ``[pixel_size_um] * 2``, or (3,) with ``z_step_um`` appended for stacks.
        """
        return np.array([self.pixel_size_um] * 2 + ([] if self.z_step_um is None else [self.z_step_um]))

    def points(self, table: pd.DataFrame, n_frames: int) -> Points:
        """A localisation table (``frame, x, y`` px; stacks ``z`` planes or ``z_um``) in um.

        Parameters
        ----------
        table : pandas.DataFrame
            ``frame``, ``x`` and ``y`` (px, origin at the centre of pixel (0, 0)); for stacks
            also ``z_um`` (um from the first plane, a user's CSV), else ``z`` (planes from the
            first plane, a detector's table), converted with ``z_step_um``.
        n_frames : int
            The frames (images or stacks) scored.

        Returns
        -------
        Points
            x, y (and z) in um; no ``score``: the caller keeps ``table["score"]`` beside it.
        """
        x = table["x"].to_numpy(np.float64) * self.pixel_size_um
        y = table["y"].to_numpy(np.float64) * self.pixel_size_um
        cols = [x, y]
        if self.z_step_um is not None:
            cols.append(table["z_um"].to_numpy(np.float64) if "z_um" in table
                        else table["z"].to_numpy(np.float64) * self.z_step_um)
        return Points(table["frame"].to_numpy(np.int64), np.stack(cols, 1).reshape(-1, len(cols)), n_frames)

    def with_z_um(self, table: pd.DataFrame) -> pd.DataFrame:
        """A table as users get it: for stacks ``z`` (planes) becomes ``z_um``.

        Parameters
        ----------
        table : pandas.DataFrame
            A detector's localisation table.

        Returns
        -------
        pandas.DataFrame
            ``table`` itself for images; for stacks as ``with_z_um`` makes it.
        """
        return table if self.z_step_um is None else with_z_um(table, self.z_step_um)


def with_z_um(table: pd.DataFrame, z_step_um: float) -> pd.DataFrame:
    """A stack detector's table with ``z_um`` in place of ``z``, as users get it.

    Parameters
    ----------
    table : pandas.DataFrame
        A localisation table; ``z`` in planes from the first plane.
    z_step_um : float
        The z step (um) between planes.

    Returns
    -------
    pandas.DataFrame
        A copy with ``z_um = z * z_step_um`` (um from the first plane) where ``z`` was;
        ``table`` itself when it has no ``z``.
    """
    if "z" not in table:
        return table
    out = table.copy()
    out.insert(list(out.columns).index("z"), "z_um", out.pop("z") * z_step_um)
    return out


def geometry(store: Store) -> Geometry:
    """A store's geometry: its pixel size, and for a stack store its z step.

    Parameters
    ----------
    store : Store
        An open store of any kind.

    Returns
    -------
    Geometry
        ``z_step_um`` is None unless the store holds stacks.
    """
    ds = store.dataset
    return Geometry(float(ds.image.pixel_size_um), float(ds.stack.z_step_um) if ds.stack is not None else None)


def targets_of(store: Store) -> list[str]:
    """The truths a store can score against.

    Stores from before the exposure target hold centroids only.

    Parameters
    ----------
    store : Store
        An open store.

    Returns
    -------
    list of str
        The keys of ``loaders.datasets.TARGETS`` (``"centroid"``, ``"exposure"``) whose
        array the store holds.
    """
    return [t for t, name in TARGETS.items() if name in store]


def truth(store: Store, target: str = "centroid", start: int = 0, stop: int | None = None) -> Points:
    """The detection targets of rows ``start .. stop`` in um, for a store of any kind.

    Parameters
    ----------
    store : Store
        An open store: images, movies or stacks.
    target : {"centroid", "exposure"}
        Which truth (``loaders.datasets.store_targets``).
    start : int
        The first row.
    stop : int, optional
        The row after the last (default: the end).

    Returns
    -------
    Points
        x, y (and for stacks z from the first plane) in um, one frame per row read.

    Raises
    ------
    StoreError
        The store lacks the target's arrays.
    """
    pts = store_targets(store, target, start, stop).astype(np.float64)
    return Points.from_masked(pts * geometry(store).voxel_um)


def dataset_diffusion(store: Store) -> float | None:
    """The diffusion coefficient (um^2/s) of a store's particles when fixed, else None.

    Fixed: the paper's test sets (``type: fixed``); ``store`` is an open store.
    """
    d = store.dataset.particles.diffusion_um2_s
    return float(d.value) if d.type == "fixed" else None
