"""The run folder of a trained model: one type that writes and reads its own files.

    config.yaml    the full training config (``models.training.config.TrainConfig``); passing it
                   back to ``factory train --config`` reproduces the run
    best.pt        {"model": state dict, "epoch": int}: the epoch with the best
                   validation score
    last.pt        model, optimiser and scheduler state, epoch, history: what
                   ``--resume`` continues from
    metrics.json   per-epoch history, best epoch, the data used, the score
                   threshold that maximises F1 on the validation set, and (SpotNet)
                   each head's int8 activation ranges (``models.networks.int8``)

Weights hold tensors and plain values only and are read with ``weights_only=True``;
anything else is refused (``models.detectors.weights``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from factory.errors import FactoryError

from models.training.config import TrainConfig, dump_train_config, parse_train_config, read_yaml
from models.detectors.registry import NetDetector, family
from models.detectors.weights import load_weights, state_dict_of


PRECISIONS = ("float32", "int8", "auto")  # inference arithmetic (``RunFolder.detector``)
# A calibrated activation of a standardised image stays within a few hundred; a range
# beyond this is not a calibration (an 8-bit step would swallow every value).
INT8_RANGE_LIMIT = 1e6


class RunFolder:
    """A trained model's folder (the files above), written by ``factory train`` and read by every command.

    Parameters
    ----------
    path : str or Path
        The folder.
    """

    CONFIG, BEST, LAST, METRICS = "config.yaml", "best.pt", "last.pt", "metrics.json"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        """The path of the folder's file ``name`` (``CONFIG``, ``BEST``, ``LAST``, ``METRICS``)."""
        return self.path / name

    # --- writing --------------------------------------------------------------------

    def create(self) -> None:
        """Create the folder (and its parents); FactoryError when it cannot be."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FactoryError(f"{self.path}: cannot create the run folder: {exc.strerror}") from None

    def clear(self) -> None:
        """Remove a previous run's files (``--overwrite``)."""
        for name in (self.CONFIG, self.BEST, self.LAST, self.METRICS):
            self.file(name).unlink(missing_ok=True)

    def write_config(self, cfg: TrainConfig) -> None:
        """Write ``config.yaml``: the full training config."""
        self.file(self.CONFIG).write_text(dump_train_config(cfg))

    def save_best(self, model: torch.nn.Module, epoch: int) -> None:
        """Write ``best.pt``: the model's state dict and its epoch."""
        torch.save({"model": model.state_dict(), "epoch": epoch}, self.file(self.BEST))

    def save_last(self, model, optimizer, scheduler, epoch: int, history: list, best: float) -> None:
        """Write ``last.pt``: model, optimiser and scheduler state, epoch, history and best score (``--resume``)."""
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history,
                    "best": best}, self.file(self.LAST))

    def write_metrics(self, metrics: dict) -> None:
        """Write ``metrics.json``."""
        self.file(self.METRICS).write_text(json.dumps(metrics, indent=2))

    # --- reading --------------------------------------------------------------------

    def check(self) -> None:
        """FactoryError unless this is a run folder (a folder with ``config.yaml``)."""
        if not self.path.is_dir() or not self.file(self.CONFIG).is_file():
            raise FactoryError(f"{self.path}: not a model run folder (no {self.CONFIG}; made by `factory train`)")

    def has_model(self) -> bool:
        """Whether ``best.pt`` exists (training finished an epoch)."""
        return self.file(self.BEST).exists()

    def read_config(self) -> TrainConfig:
        """The run's training config; FactoryError (ConfigError) when missing or invalid."""
        self.check()
        path = self.file(self.CONFIG)
        return parse_train_config(read_yaml(path), str(path))

    def load(self, name: str, map_location="cpu") -> dict:
        """The weights file ``name`` (``BEST`` or ``LAST``), loaded safely (``models.detectors.weights.load_weights``).

        Raises FactoryError when it is missing or refused.
        """
        path = self.file(name)
        if not path.exists():
            raise FactoryError(f"{path}: no weights (training did not finish an epoch?)")
        return load_weights(path, map_location)

    def read_metrics(self) -> dict:
        """``metrics.json`` ({} when absent); FactoryError when it is not a JSON object."""
        path = self.file(self.METRICS)
        if not path.exists():
            return {}
        try:
            metrics = json.loads(path.read_text())
        except ValueError as exc:
            raise FactoryError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(metrics, dict):
            raise FactoryError(f"{path}: must hold a JSON object (key: value), not a {type(metrics).__name__}")
        return metrics

    @property
    def threshold(self) -> float | None:
        """The score threshold tuned for F1 on the validation set (None: none recorded)."""
        t = self.read_metrics().get("threshold")
        if t is not None and not _finite_number(t):
            raise FactoryError(f"{self.file(self.METRICS)}: threshold must be a finite number")
        return t

    @property
    def thresholds(self) -> dict:
        """Per head threshold of a network with a head per target."""
        t = self.read_metrics().get("thresholds") or {}
        if not isinstance(t, dict) or not all(_finite_number(v) for v in t.values()):
            raise FactoryError(f"{self.file(self.METRICS)}: thresholds must map targets to finite numbers")
        return t

    def int8_ranges(self, target: str) -> dict | None:
        """The int8 activation ranges of the head of ``target`` (None: none recorded)."""
        ranges = self.read_metrics().get("int8_ranges") or {}
        if not isinstance(ranges, dict):
            raise FactoryError(f"{self.file(self.METRICS)}: int8_ranges must map targets to layers' ranges")
        r = ranges.get(target)
        if r is not None and not (isinstance(r, dict) and all(
                isinstance(v, list) and all(_finite_number(x) and abs(x) <= INT8_RANGE_LIMIT for x in v)
                for v in r.values())):
            raise FactoryError(f"{self.file(self.METRICS)}: int8_ranges.{target} must map layers to [min, max], "
                               f"finite numbers within +-{INT8_RANGE_LIMIT:g}")
        return r

    def detector(self, device: str = "cpu", weights: str = BEST, target: str | None = None,
                 precision: str = "float32") -> NetDetector:
        """The trained network behind the detector contract, with its tuned threshold.

        A network with a head per target (``target: both``) gives the head of ``target``
        (default: its first, the centroid) with that head's threshold.

        Parameters
        ----------
        device : str
            ``"cpu"`` or ``"cuda"``.
        weights : str
            The weights file: ``BEST`` (``best.pt``) or ``LAST`` (``last.pt``).
        target : {"centroid", "exposure"}, optional
            The head (default: the network's first target).
        precision : {"float32", "int8", "auto"}
            The arithmetic of inference: "int8" runs the head in 8-bit integers on the
            CPU (``models.networks.int8``; about 2x faster), "auto" does where it can
            (a SpotNet without flip averaging whose ranges were recorded, on a CPU with
            PyTorch's oneDNN engine), float32 elsewhere.

        Returns
        -------
        NetDetector
            The network on ``device``, in inference mode, with the head's tuned threshold.

        Raises
        ------
        FactoryError
            Not a run folder, no such head, missing or refused weights, weights that
            do not fit the network of ``config.yaml``, or "int8" where it cannot run.
        """
        if precision not in PRECISIONS:
            raise FactoryError(f"precision {precision!r}: unknown (have: {', '.join(PRECISIONS)})")
        cfg = self.read_config()
        targets = cfg.targets
        target = target or targets[0]
        if target not in targets:
            raise FactoryError(f"{self.path}: the model was trained on the {cfg.target} target; "
                               f"it has no {target} output")
        head = targets.index(target)
        fam = family(cfg.model)
        state = state_dict_of(self.load(weights))
        model = fam.build(cfg.params())
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise FactoryError(f"{self.file(weights)}: weights do not fit the network of {self.CONFIG} "
                               f"({str(exc).splitlines()[0]})") from None
        threshold = self.thresholds.get(target, self.threshold) if len(targets) > 1 else self.threshold
        label = None
        if len(targets) > 1:
            label = fam.label if target == "centroid" else f"{fam.label}, exposure head"
        # 3D networks: the z step of the training stacks (``models.training.train`` records it).
        z_step_um = cfg.model_params.get("z_step_um")
        int8 = self._int8(model, cfg, target, head, device, precision, weights) if precision != "float32" else None
        return NetDetector(fam, model, threshold, cfg.min_score, device, label, target=target, head=head,
                           z_step_um=z_step_um, int8=int8)

    def _int8(self, model, cfg: TrainConfig, target: str, head: int, device: str, precision: str, weights: str):
        """The int8 version of the head, or None ("auto" where it cannot run)."""
        from models.networks import int8

        ranges = self.int8_ranges(target)
        why = ("it runs on the CPU only" if device != "cpu" else
               f"this PyTorch has no {int8.ENGINE} quantized engine" if not int8.available(device) else
               f"{cfg.model} has no int8 version (SpotNet has)" if cfg.model != "spotnet" else
               "the model averages flips at prediction" if getattr(model, "flip_tta", False) else
               f"the int8 ranges were measured with {self.BEST}, not {weights}" if weights != self.BEST else
               f"{self.file(self.METRICS)} records no int8 ranges for the {target} head (a model trained "
               "before they were; train it again)" if ranges is None else None)
        if why is None:
            try:
                return int8.Int8Head(model, head, ranges)
            except ValueError as exc:
                why = f"{self.file(self.METRICS)}: {exc}"
        if precision == "int8":
            raise FactoryError(f"{self.path}: int8 inference cannot run: {why}")
        return None


def load_model(run_dir: str | Path, device: str = "cpu", weights: str = RunFolder.BEST,
               target: str | None = None, precision: str = "float32") -> NetDetector:
    """A detector from a run folder written by ``factory train``.

    ``RunFolder(run_dir).detector(device, weights, target, precision)``: ``target`` is
    which head of a two-headed network.
    """
    return RunFolder(run_dir).detector(device, weights, target, precision)


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

