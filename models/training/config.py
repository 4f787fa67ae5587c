"""The training config: one strict pydantic model, written to and read from a run folder.

The same code writes and reads a run folder's ``config.yaml``, so
``factory train --config RUN/config.yaml`` reproduces a run.

``model_params`` is validated by the chosen family's own parameter model (unknown keys
and wrong types name the file and field) and stored complete, defaults filled in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import Field, ValidationError, model_validator

from factory.config import StrictModel, parse_yaml
from factory.errors import ConfigError

from models.detectors.registry import NETWORKS, family, parse_params


class TrainConfig(StrictModel):
    """A validated training config: the network, its data and the optimisation (``factory train``).

    Build one with ``load_train_config`` or ``parse_train_config``, which fill in the
    family's training defaults and validate ``model_params``; the comments on the fields
    below say more.

    Attributes
    ----------
    model : {"spotnet", "gridnet", "densitynet", "keypointrcnn", "dmdetnet3d"}
        The network family (``models.detectors.registry.NETWORKS``).
    model_params : dict
        The family's parameters, complete (its parameter model's defaults filled in).
    data : str or None
        The folder holding the train and val stores (``--data`` overrides).
    train, val : str or list of str
        Store names inside ``data``; several are trained (validated) on together.
    target : {"centroid", "exposure", "both"}
        What the network learns to find: the whole-frame trajectory centroid, the
        exposure-weighted position (what the laser saw), or both, a head each (SpotNet).
    store_targets : dict of str to {"centroid", "exposure", "both"}
        With ``target: both``: the target each named store trains or validates (others:
        both).
    init_from : str or None
        A run folder (its ``best.pt``) or weights file to start from.
    freeze : list of str
        Prefixes of parameter names kept as loaded (needs ``init_from``).
    max_train_images : int or None
        Train on the first this many images of each train store (None: all).
    val_images : int
        The first this many images (>= 10) of each val store validate.
    epochs, batch_size : int
        Epochs (1 to 1000) and images per minibatch (1 to 4096).
    optimizer : {"adamw", "sgd", "amsgrad"}
        The optimiser (AMSGrad: AdamW's variant).
    lr, weight_decay, momentum : float
        Peak learning rate, weight decay, and SGD's momentum.
    schedule : {"onecycle", "cosine", "constant"}
        The learning-rate schedule over all epochs.
    augment_flips : bool
        Random flips of the training batches (``loaders.augment``).
    seed : int
        Seed of initialisation, shuffling and flips.
    min_score : float
        Lowest score in [0, 1) a network's candidate keeps (the detector's ``min_score``).
    val_tta : bool
        Flip test-time averaging while selecting epochs (4x slower).
    threads : int or None
        CPU threads for torch (None: torch's default).
    """

    model: Literal[NETWORKS] = "spotnet"  # type: ignore[valid-type]
    model_params: dict[str, Any] = {}
    data: Optional[str] = None  # folder holding the train and val stores (--data overrides)
    # Store names inside the data folder: one, or several trained on together (their
    # blocks shuffled together; minibatches hold ``batch_size`` images of the first
    # store's size and proportionally fewer of larger images) and validated together.
    train: Union[str, list[str]] = "train"
    val: Union[str, list[str]] = "val"
    # What the network learns to find: the paper's whole-frame trajectory centroid, the
    # exposure-weighted position (what the laser saw; its time stamp is the scan time at
    # the predicted position), or both from one backbone with a head each (SpotNet).
    target: Literal["centroid", "exposure", "both"] = "centroid"
    # With `target: both`: the target each train or val store trains or validates, so
    # each head learns from the data of its own task (a 64-line movie frame spans about
    # 0.1 s: its whole-frame centroid is mostly not in the frame); stores not named: both.
    store_targets: dict[str, Literal["centroid", "exposure", "both"]] = {}
    # Start from a trained network: a run folder (its best.pt) or a weights file; tensors
    # whose name and shape fit are loaded, and a second head absent from it starts as a
    # copy of the first.  `freeze` keeps parameters as loaded: prefixes of their names
    # ("unet", "head": SpotNet's backbone and first head), batch-norm statistics included.
    init_from: Optional[str] = None
    freeze: list[str] = []
    max_train_images: Optional[Annotated[int, Field(ge=1)]] = None
    val_images: Annotated[int, Field(ge=10)] = 3000
    epochs: Annotated[int, Field(ge=1, le=1000)] = 8
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 64
    optimizer: Literal["adamw", "sgd", "amsgrad"] = "adamw"
    lr: Annotated[float, Field(gt=0, le=10)] = 2e-3
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    augment_flips: bool = True
    seed: Annotated[int, Field(ge=0)] = 0
    min_score: Annotated[float, Field(ge=0, lt=1)] = 0.01
    val_tta: bool = False  # flip TTA while selecting epochs (4x slower; applied at deployment anyway)
    threads: Optional[Annotated[int, Field(ge=1)]] = None

    @model_validator(mode="after")
    def _store_targets_fit(self) -> "TrainConfig":
        if self.store_targets and self.target != "both":
            raise ValueError("store_targets applies to target: both")
        stores = self.train_stores + self.val_stores
        unknown = [k for k in self.store_targets if k not in stores]
        if unknown:
            raise ValueError(f"store_targets: {unknown[0]} is not a train or val store (have: {', '.join(stores)})")
        return self

    @model_validator(mode="after")
    def _freeze_needs_init(self) -> "TrainConfig":
        if self.freeze and self.init_from is None:
            raise ValueError("freeze: keeps loaded parameters; give init_from (a run folder or weights file)")
        return self

    def trains(self, store: str, target: str) -> bool:
        """Whether ``store`` trains (or validates) the head of ``target``."""
        return self.store_targets.get(store, "both") in ("both", target)

    def params(self) -> StrictModel:
        """The family's typed network parameters."""
        return parse_params(self.model, self.model_params)

    @property
    def targets(self) -> tuple[str, ...]:
        """The targets of the network's heads, in head order."""
        return ("centroid", "exposure") if self.target == "both" else (self.target,)

    @property
    def train_stores(self) -> list[str]:
        """``train`` as a list of store names."""
        return [self.train] if isinstance(self.train, str) else list(self.train)

    @property
    def val_stores(self) -> list[str]:
        """``val`` as a list of store names."""
        return [self.val] if isinstance(self.val, str) else list(self.val)


def parse_train_config(raw: Any, source: str = "training config", overrides: dict | None = None) -> TrainConfig:
    """Validate a training config mapping.

    The family's training defaults, then ``raw``, then ``overrides`` (settings by name;
    a ``model_params`` among them is ignored); ``model_params`` is validated by the
    family's parameter model, and a head count set by ``target``.

    Raises
    ------
    ConfigError
        A bad setting, in one line naming ``source`` and the field.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of training settings")
    raw = {**raw, **{k: v for k, v in (overrides or {}).items() if k != "model_params"}}
    name = raw.get("model", "spotnet")
    if name not in NETWORKS:
        raise ConfigError(f"{source}: model: {name!r} is not a trainable network (have: {', '.join(NETWORKS)})")
    params = parse_params(name, raw.get("model_params"), source)
    if "heads" in type(params).model_fields:  # one head per target
        heads = 2 if raw.get("target") == "both" else 1
        if (raw.get("model_params") or {}).get("heads", heads) != heads:
            raise ConfigError(f"{source}: model_params.heads: {params.heads} does not fit target: "
                              f"{raw.get('target', 'centroid')} (set by the target; leave it out)")
        params = params.model_copy(update={"heads": heads})
    elif raw.get("target") == "both":
        raise ConfigError(f"{source}: target: both needs a network with two heads (spotnet), not {name}")
    merged = {**family(name).train_defaults, **raw, "model_params": params.model_dump()}
    try:
        return TrainConfig.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{source}: {where}: {msg}" if where else f"{source}: {msg}") from None


def read_yaml(path: Path) -> Any:
    """A training config file's YAML (duplicate keys refused: ``factory.config.parse_yaml``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (YAML is UTF-8 text)") from None
    return parse_yaml(text, str(path))


def load_train_config(path: Path | None, model: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """A training config from a YAML file (or the defaults), ``--model`` and overrides (``models.load_train_config``).

    Parameters
    ----------
    path : Path or None
        A training config YAML (e.g. ``configs/spotnet.yaml`` or a run's
        ``config.yaml``); None: the defaults.
    model : str, optional
        The network family (``--model``); another family than the file's drops the
        file's ``model_params``.
    overrides : dict, optional
        Settings by name that replace the file's (the command's flags).

    Returns
    -------
    TrainConfig
        The validated config, the family's training defaults filled in.

    Raises
    ------
    ConfigError
        A missing or unreadable file, invalid YAML, a duplicate key or a bad setting,
        in one line naming the file and the field.

    Examples
    --------
    >>> from models import load_train_config
    >>> cfg = load_train_config(None, "spotnet", {"epochs": 2})
    >>> cfg.model, cfg.epochs
    ('spotnet', 2)
    """
    raw = dict(read_yaml(path) or {}) if path is not None else {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of training settings")
    if model is not None and model != raw.get("model", model):
        # Another family: its parameters do not carry over.
        raw.pop("model_params", None)
    if model is not None:
        raw["model"] = model
    return parse_train_config(raw, str(path) if path is not None else "training config", overrides)


def dump_train_config(cfg: TrainConfig) -> str:
    """``cfg`` as the YAML of a run folder's ``config.yaml`` (``load_train_config`` reads it back)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
