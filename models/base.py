"""The one detector contract.

A detector takes images (N, H, W) and returns one localisation table, a DataFrame with
columns ``frame, x, y, score`` (plus optional ones such as ``sigma``), in pixels with
the origin at the centre of pixel (0, 0).  Higher scores mean more confident.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd

COLUMNS = ["frame", "x", "y", "score"]


@runtime_checkable
class Detector(Protocol):
    name: str

    def detect(self, images: np.ndarray, progress: bool = False) -> pd.DataFrame:
        """Localise particles in ``images`` (N, H, W)."""
        ...


def empty_table(extra: tuple[str, ...] = ()) -> pd.DataFrame:
    cols = COLUMNS + list(extra)
    return pd.DataFrame({c: np.zeros(0, np.int64 if c == "frame" else np.float64) for c in cols})


def as_table(frame, x, y, score, **extra) -> pd.DataFrame:
    """Build a localisation table with the contract's column order and dtypes."""
    data = {
        "frame": np.asarray(frame, np.int64),
        "x": np.asarray(x, np.float64),
        "y": np.asarray(y, np.float64),
        "score": np.asarray(score, np.float64),
    }
    for key, value in extra.items():
        data[key] = np.asarray(value, np.float64)
    return pd.DataFrame(data)


def check_images(images) -> np.ndarray:
    """Accept (H, W) or (N, H, W) arrays; return (N, H, W) float32."""
    a = np.asarray(images)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"images must be (N, H, W) or (H, W), got shape {a.shape}")
    return a.astype(np.float32, copy=False)
