"""Model families behind one interface, and the detector that wraps a trained network.

A family knows how to build its network from parameters, compute its training loss from
images and NaN-padded centroids (B, P, 2), and turn network output into localisations.
A run folder (``factory train``) holds ``config.yaml`` and ``best.pt``; ``load_model``
turns it into a detector with the same contract as TrackPy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import yaml

from factory.errors import FactoryError

from .base import as_table, check_images, empty_table


@dataclass
class Family:
    name: str
    label: str
    build: Callable[..., torch.nn.Module]
    loss: Callable  # (model, images, centroids) -> (loss, parts)
    predict: Callable  # (model, images, min_score) -> [(xy, score, sigma|None)]
    defaults: dict = field(default_factory=dict)  # network parameters
    train_defaults: dict = field(default_factory=dict)  # overrides of TrainConfig
    pixels_per_batch: int = 2**16  # inference batch size by image area (small batches stay in cache)


FAMILIES: dict[str, Family] = {}


def family(name: str) -> Family:
    _load_families()
    if name not in FAMILIES:
        raise FactoryError(f"--model {name}: unknown (have: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[name]


def _load_families() -> None:
    if FAMILIES:
        return
    from . import densitynet, gridnet, keypoint_rcnn, spotnet

    FAMILIES["spotnet"] = Family(
        "spotnet", "SpotNet (ours)", lambda **p: spotnet.SpotNet(**p), spotnet.loss,
        lambda m, x, s: spotnet.decode(spotnet.forward_flips(m, x) if m.flip_tta else m(x), s),
        {"widths": [32, 64, 128], "flip_tta": True})
    FAMILIES["gridnet"] = Family(
        "gridnet", "Grid-cell net (deepBlink-style)", lambda **p: gridnet.GridNet(**p), gridnet.loss,
        lambda m, x, s: gridnet.decode(m(x), s), {"widths": [32, 64, 128]},
        {"optimizer": "amsgrad", "lr": 1e-3})
    FAMILIES["densitynet"] = Family(
        "densitynet", "Density-map net (DM-DetNet-style)", lambda **p: densitynet.DensityNet(**p),
        densitynet.loss, lambda m, x, s: densitynet.decode(m(x), s), {"widths": [32, 64, 128]})
    FAMILIES["keypointrcnn"] = Family(
        "keypointrcnn", "Keypoint R-CNN (ours)", keypoint_rcnn.build, keypoint_rcnn.loss,
        keypoint_rcnn.predict, keypoint_rcnn.DEFAULTS, keypoint_rcnn.TRAIN_DEFAULTS, pixels_per_batch=2**16)


class NetDetector:
    """A trained network behind the detector contract (frame, x, y, score, sigma)."""

    def __init__(self, fam: Family, model: torch.nn.Module, threshold: float | None = None,
                 min_score: float = 0.01, device: str = "cpu", label: str | None = None):
        self.family = fam
        self.name = fam.name
        self.label = label or fam.label
        self.model = model.to(device).eval()
        self.threshold = threshold
        self.min_score = min_score
        self.device = device

    @torch.no_grad()
    def detect(self, images, progress: bool = False) -> pd.DataFrame:
        from tqdm.auto import tqdm

        images = check_images(images)
        n, h, w = images.shape
        bs = max(1, self.family.pixels_per_batch // (h * w))
        frames, xys, scores, sigmas = [], [], [], []
        for a in tqdm(range(0, n, bs), desc=self.name, unit="batch", disable=not progress):
            x = torch.from_numpy(np.ascontiguousarray(images[a:a + bs]))[:, None].to(self.device)
            for i, (xy, s, sig) in enumerate(self.family.predict(self.model, x, self.min_score)):
                frames.append(np.full(len(s), a + i))
                xys.append(xy.reshape(-1, 2))
                scores.append(s)
                sigmas.append(sig if sig is not None else np.full(len(s), np.nan))
        if not frames or sum(len(s) for s in scores) == 0:
            return empty_table(("sigma",))
        xy = np.concatenate(xys)
        return as_table(np.concatenate(frames), xy[:, 0], xy[:, 1], np.concatenate(scores),
                        sigma=np.concatenate(sigmas))


def load_model(run_dir: str | Path, device: str = "cpu", weights: str = "best.pt") -> NetDetector:
    """A detector from a run folder written by ``factory train``."""
    run = Path(run_dir)
    cfg_path = run / "config.yaml"
    if not run.is_dir() or not cfg_path.exists():
        raise FactoryError(f"{run}: not a model run folder (no config.yaml; made by `factory train`)")
    cfg = yaml.safe_load(cfg_path.read_text())
    fam = family(cfg["model"])
    path = run / weights
    if not path.exists():
        raise FactoryError(f"{path}: no weights (training did not finish an epoch?)")
    model = fam.build(**cfg.get("model_params", {}))
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"] if "model" in state else state)
    threshold = cfg.get("threshold")
    if (run / "metrics.json").exists():
        import json

        threshold = json.loads((run / "metrics.json").read_text()).get("threshold", threshold)
    return NetDetector(fam, model, threshold, cfg.get("min_score", 0.01), device)
