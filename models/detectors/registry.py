"""The one registry of detectors: TrackPy and every network family.

A family has a name, a label for tables, typed parameters (a strict pydantic model:
unknown keys and wrong types are errors) and, for networks, how to build the network
from them, its training loss (images and NaN-padded centroids (B, P, 2) in), and its
decoding into localisations.  ``NetDetector`` puts a network behind the detector
contract that TrackPy follows (``models.detectors.base``).

A network's module is imported when its family is first asked for (``family``): a
command that runs SpotNet never loads torchvision, which Keypoint R-CNN needs and which
alone takes longer to import than a short recording takes to track.  ``FAMILIES`` and
``DETECTORS_2D`` import them all.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import ValidationError

from factory.config import StrictModel
from factory.errors import ConfigError, FactoryError

from models.detectors import trackpy as trackpy_detector
from models.detectors.base import check_images, localisations


@dataclass(frozen=True)
class Family:
    """A detector family of the registry (``family``): its name, label, parameters and, for networks, its code.

    Attributes
    ----------
    name : str
        The family's name (``"spotnet"``, ``"trackpy"``, ...).
    label : str
        How tables name it.
    Params : type of StrictModel
        Its typed parameters (``parse_params``).
    kind : {"network", "classical"}
        A network, or TrackPy.
    build, loss, predict : callable or None
        Networks: build the network from ``Params``; its training loss; its decoding
        into localisations (see the comments below).
    train_defaults : dict
        Overrides of ``TrainConfig``'s defaults for this family.
    pixels_per_batch : int
        Inference batch size by image area (voxels for stacks).
    ndim : {2, 3}
        2: images (N, H, W); 3: z-stacks (N, Z, H, W).
    """

    name: str
    label: str
    Params: type[StrictModel]
    kind: Literal["network", "classical"]
    build: Callable[[Any], torch.nn.Module] | None = None
    loss: Callable | None = None  # (model, images, centroids) -> (loss, parts)
    predict: Callable | None = None  # (model, images, min_score) -> [(xy, score, sigma|None)]
    train_defaults: dict = field(default_factory=dict)  # overrides of TrainConfig's defaults
    pixels_per_batch: int = 2**16  # inference batch size by image area (voxels for stacks)
    ndim: int = 2  # 2: images (N, H, W); 3: z-stacks (N, Z, H, W)


def _network(name: str, module: ModuleType) -> Family:
    return Family(name, module.LABEL, module.Params, "network", module.build, module.loss, module.predict,
                  dict(module.TRAIN_DEFAULTS), module.PIXELS_PER_BATCH, getattr(module, "NDIM", 2))


# Network family -> its module in models.networks.
_NETWORK_MODULES = {
    "spotnet": "spotnet",
    "gridnet": "gridnet",
    "densitynet": "densitynet",
    "keypointrcnn": "keypoint_rcnn",
    "dmdetnet3d": "dmdetnet3d",
}
NETWORKS = tuple(_NETWORK_MODULES)
_NAMES = NETWORKS + ("trackpy",)
_LOADED: dict[str, Family] = {
    "trackpy": Family("trackpy", trackpy_detector.LABEL, trackpy_detector.Params, "classical"),
}


def family(name: str) -> Family:
    """The family called ``name``, its network module imported on first use.

    Raises FactoryError for an unknown name.
    """
    if name not in _NAMES:
        raise FactoryError(f"{name}: unknown detector (have: {', '.join(_NAMES)})")
    if name not in _LOADED:
        module = importlib.import_module(f"models.networks.{_NETWORK_MODULES[name]}")
        _LOADED[name] = _network(name, module)
    return _LOADED[name]


def __getattr__(name: str):
    """``FAMILIES`` (every family, by name) and ``DETECTORS_2D``: every module imported."""
    if name == "FAMILIES":
        return {n: family(n) for n in _NAMES}
    if name == "DETECTORS_2D":
        return tuple(n for n in _NAMES if family(n).ndim == 2)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_params(name: str, raw: Any, source: str = "config", prefix: str = "model_params") -> StrictModel:
    """A family's typed parameters from a mapping (or a parameters model; None: the defaults).

    Raises ConfigError naming ``source`` and the field under ``prefix``: not a mapping,
    an unknown key or a bad value.
    """
    fam = family(name)
    if raw is None:
        raw = {}
    if isinstance(raw, StrictModel):
        raw = raw.model_dump()
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix}: must be a mapping of {name}'s parameters")
    try:
        return fam.Params.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join([prefix] + [str(p) for p in err["loc"]])
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"{source}: {loc}: unknown key (allowed: {', '.join(fam.Params.model_fields)})") from None
        raise ConfigError(f"{source}: {loc}: {err['msg'].removeprefix('Value error, ')}") from None


def make_detector(name: str, params: Any = None, **kwargs):
    """An untrained detector of any family (TrackPy is ready to use as it is).

    ``params`` as ``parse_params`` takes them; ``kwargs`` go to the detector
    (``TrackPyDetector`` or ``NetDetector``).
    """
    fam = family(name)
    p = parse_params(name, params)
    if fam.kind == "classical":
        return trackpy_detector.TrackPyDetector(p, **kwargs)
    return NetDetector(fam, fam.build(p), **kwargs)


class NetDetector:
    """A network behind the detector contract (frame, x, y, score, sigma).

    Parameters
    ----------
    fam : Family
        The network's family.
    model : torch.nn.Module
        The network; moved to ``device`` and kept in inference mode.
    threshold : float, optional
        The tuned score threshold (``Detector.threshold``).
    min_score : float
        Lowest score a candidate keeps (the network's decoding).
    device : str
        ``"cpu"`` or ``"cuda"``.
    label : str, optional
        How tables name it (default: the family's label, marked for the exposure target).
    target : {"centroid", "exposure"}
        The truth it was trained on; sets ``timestamps`` (``"frame"``, ``"scan"``).
    head : int
        Which output head of a network with a head per target.
    z_step_um : float, optional
        3D networks: the z step (um) of the training stacks.
    int8 : torch.nn.Module, optional
        The head in 8-bit integers (``models.networks.int8.Int8Head``): inference runs
        it instead of ``model``.
    """

    def __init__(self, fam: Family, model: torch.nn.Module, threshold: float | None = None,
                 min_score: float = 0.01, device: str = "cpu", label: str | None = None,
                 target: str = "centroid", head: int = 0, z_step_um: float | None = None,
                 int8: torch.nn.Module | None = None):
        self.family = fam
        self.head = head  # which output head of a multi-target network (SpotNet, target: both)
        self.target = target  # the truth it was trained on: "centroid" or "exposure"
        # A centroid is the whole frame's; an exposure position is where the laser saw it.
        self.timestamps = "scan" if target == "exposure" else "frame"
        self.name = fam.name
        self.label = label or (fam.label if target == "centroid" else f"{fam.label}, exposure target")
        self.model = model.to(device).eval()
        self.threshold = threshold
        self.min_score = min_score
        self.device = device
        self.ndim = fam.ndim
        self.z_step_um = z_step_um  # 3D: the training stacks' z step, which its z targets assume
        self.int8 = int8
        self.precision = "int8" if int8 is not None else "float32"
        # Inference batch size by image area: the int8 head's own where it runs.
        self.pixels_per_batch = getattr(int8, "pixels_per_batch", fam.pixels_per_batch)

    @torch.no_grad()
    def detect(self, images, progress: bool = False, min_score: float | None = None) -> pd.DataFrame:
        """Images (N, H, W) -> ``frame, x, y, score, sigma``.

        A 3D network's stacks (N, Z, H, W) -> ``frame, x, y, z, score, sigma`` (z in
        planes from the first plane).  Every candidate from the detector's ``min_score``
        on, or from ``min_score`` where that is higher (``Detector.detect``).
        """
        from tqdm.auto import tqdm

        # Inference mode every time: a detector validating a network mid-training must not
        # run batch norm on batch statistics, nor move its running statistics.  (Only when
        # it is in training mode: eval() walks every module, a millisecond a frame.)
        if self.model.training:
            self.model.eval()
        images = check_images(images, self.ndim, self.name)
        n = len(images)
        # The decoders cut candidates on a score that bounds the table's from above
        # (SpotNet's peak probability; the others' own score), so every candidate scored
        # from ``min_score`` on survives the cut.
        floor = self.min_score if min_score is None else max(self.min_score, min_score)
        bs = max(1, self.pixels_per_batch // int(np.prod(images.shape[1:])))
        frames, pos, scores, sigmas = [], [], [], []
        for a in tqdm(range(0, n, bs), desc=self.name, unit="batch", disable=not progress):
            x = torch.from_numpy(np.ascontiguousarray(images[a:a + bs]))[:, None].to(self.device)
            for i, (p, s, sig) in enumerate(self._predict(x, floor)):
                frames.append(np.full(len(s), a + i))
                pos.append(np.asarray(p).reshape(-1, self.ndim))
                scores.append(s)
                sigmas.append(sig if sig is not None else np.full(len(s), np.nan))
        if not frames:
            return localisations([], np.zeros((0, self.ndim)), [])
        return localisations(np.concatenate(frames), np.concatenate(pos), np.concatenate(scores),
                             np.concatenate(sigmas))

    def batch_frames(self, height: int, width: int) -> int:
        """Images of ``height`` x ``width`` px per forward pass."""
        return max(1, self.pixels_per_batch // (height * width))

    def _predict(self, x, floor: float):
        # The head in 8-bit integers runs in the network's place; only SpotNet has heads.
        model = self.int8 if self.int8 is not None else self.model
        if self.int8 is not None or self.head:
            return self.family.predict(model, x, floor, head=self.head)
        return self.family.predict(model, x, floor)
