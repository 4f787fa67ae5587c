"""The trainer: plain ``train_one_epoch`` and ``validate`` functions and ``fit``.

A run folder holds ``config.yaml`` (the full training config), ``best.pt`` (best
validation AUC), ``last.pt`` (model, optimiser, scheduler, epoch, history: what
``--resume`` needs), and ``metrics.json`` (per-epoch history, best epoch, the F1
threshold tuned on the validation set).  Training stops on a non-finite loss.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import numpy as np
import torch
import yaml
from pydantic import Field, ValidationError

from factory.config import StrictModel
from factory.errors import ConfigError, FactoryError
from factory.stores import Store
from loaders.augment import flip_batch
from loaders.datasets import StoreBatches

from .metrics import GATES_PX, Points, f1_rmse, pr_auc
from .registry import NetDetector, family

log = logging.getLogger(__name__)


class TrainConfig(StrictModel):
    model: str = "spotnet"
    model_params: dict[str, Any] = {}
    train: str = "train"  # store names inside --data
    val: str = "val"
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
    seed: int = 0
    min_score: Annotated[float, Field(ge=0, lt=1)] = 0.01
    val_tta: bool = False  # flip TTA while selecting epochs (4x slower; applied at deployment anyway)
    threads: Optional[Annotated[int, Field(ge=1)]] = None


def load_train_config(path: Path | None, model: str | None, overrides: dict | None = None) -> TrainConfig:
    raw: dict = {}
    if path is not None:
        if not Path(path).exists():
            raise ConfigError(f"{path}: no such file")
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of training settings")
    if model is not None:
        raw["model"] = model
    fam = family(raw.get("model", "spotnet"))
    merged = {**fam.train_defaults, **raw, **(overrides or {})}
    merged["model_params"] = {**fam.defaults, **raw.get("model_params", {})}
    try:
        return TrainConfig.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{path or 'training config'}: {where}: {err['msg']}") from None


def make_optimizer(cfg: TrainConfig, params):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=cfg.optimizer == "amsgrad")


def make_scheduler(cfg: TrainConfig, opt, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.15)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def minibatches(loader, batch_size: int):
    """Split the loader's chunk-aligned blocks into training minibatches."""
    for images, t in loader:
        for a in range(0, len(images), batch_size):
            yield images[a:a + batch_size], t["centroids"][a:a + batch_size]


def train_one_epoch(model, fam, opt, sched, loader, cfg: TrainConfig, epoch: int, device: str,
                    steps: int, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    model.train()
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    total, n = 0.0, 0
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", disable=not progress, leave=False)
    for images, centroids in minibatches(loader, cfg.batch_size):
        if cfg.augment_flips:
            images, centroids = flip_batch(images, centroids, gen)
        images, centroids = images.to(device), centroids.to(device)
        value, parts = fam.loss(model, images, centroids)
        if not torch.isfinite(value):
            bar.close()
            raise FactoryError(f"non-finite loss at epoch {epoch + 1}, step {n + 1} ({parts}); "
                               "lower the learning rate or check the data")
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        sched.step()
        total += value.item()
        n += 1
        bar.update(1)
        bar.set_postfix(loss=f"{total / n:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
    bar.close()
    return {"loss": total / max(n, 1), "steps": n}


def validate(detector: NetDetector, images: np.ndarray, gt: Points) -> dict:
    """Validation AUCs at the three gates and their mean (the model-selection score)."""
    table = detector.detect(images)
    pred = Points.from_arrays(table.frame, table.x, table.y, len(images))
    aucs = [pr_auc(pred, table.score.to_numpy(), gt, g) for g in GATES_PX]
    return {"auc": aucs, "mean_auc": float(np.mean(aucs)), "table": table}


def tune_threshold(table, gt: Points, n: int) -> float:
    """The score cut maximising F1 at 2 px on the validation set."""
    if len(table) == 0:
        return 0.5
    cuts = np.unique(np.quantile(table.score, np.linspace(0, 0.995, 200)))
    best, best_f1 = float(cuts[0]), -1.0
    for c in cuts:
        sel = table[table.score >= c]
        f1, _ = f1_rmse(Points.from_arrays(sel.frame, sel.x, sel.y, n), gt)
        if f1 > best_f1:
            best, best_f1 = float(c), f1
    return best


def _checkpoint(model, opt, sched, cfg, epoch, history, best):
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "config": cfg.model_dump(), "epoch": epoch, "history": history, "best": best}


def fit(cfg: TrainConfig, data: Path, out: Path, device: str = "cpu", resume: bool = False,
        progress: bool = True) -> dict:
    """Train ``cfg.model`` on ``<data>/<cfg.train>``, select on ``<data>/<cfg.val>``."""
    from tqdm.auto import tqdm

    data, out = Path(data), Path(out)
    fam = family(cfg.model)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FactoryError("--device cuda: no CUDA device available (use --device cpu)")
    train_path = _find_store(data, cfg.train)
    val_path = _find_store(data, cfg.val)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    last = out / "last.pt"
    if resume and not last.exists():
        raise FactoryError(f"{last}: nothing to resume (no last checkpoint)")
    if not resume and (out / "best.pt").exists():
        raise FactoryError(f"{out}: already holds a trained model (use --resume, or another --out)")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = fam.build(**cfg.model_params).to(device)
    with Store(val_path) as st:
        nv = min(cfg.val_images, len(st))
        val_images = st.read("images", 0, nv)
        val_gt = Points.from_centroids(st.read("centroids", 0, nv), st.read("n_particles", 0, nv))
    with Store(train_path) as st:
        chunk = int(st["images"].chunks[0]) if st["images"].chunks else 256
        n_train = min(len(st), cfg.max_train_images or len(st))
    block = chunk * max(1, 2048 // chunk)
    batches = StoreBatches(train_path, batch_size=block, stop=n_train, shuffle_within=True, seed=cfg.seed)
    steps = sum(math.ceil(min(block, n_train - a) / cfg.batch_size) for a in range(0, n_train, batches.batch_size))
    opt = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    sched = make_scheduler(cfg, opt, steps)
    history, best, start = [], -1.0, 0
    if resume:
        ck = torch.load(last, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        history, best, start = ck["history"], ck["best"], ck["epoch"] + 1
    (out / "config.yaml").write_text(yaml.safe_dump({**cfg.model_dump(), "data": str(data)}, sort_keys=False))
    detector = NetDetector(fam, model, None, cfg.min_score, device)
    t_start = time.perf_counter()
    epochs = tqdm(range(start, cfg.epochs), desc=f"train {cfg.model}", unit="epoch", disable=not progress)
    for epoch in epochs:
        batches.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            batches, batch_size=None, shuffle=True,
            generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        t0 = time.perf_counter()
        stats = train_one_epoch(model, fam, opt, sched, loader, cfg, epoch, device, steps, progress)
        with _tta(model, cfg.val_tta):
            v = validate(detector, val_images, val_gt)
        model.train()
        row = {"epoch": epoch + 1, "loss": stats["loss"], "val_auc": dict(zip(("70", "140", "210"), v["auc"])),
               "val_mean_auc": v["mean_auc"], "seconds": time.perf_counter() - t0}
        history.append(row)
        improved = v["mean_auc"] > best
        if improved:
            best = v["mean_auc"]
            torch.save({"model": model.state_dict(), "config": cfg.model_dump(), "epoch": epoch}, out / "best.pt")
        torch.save(_checkpoint(model, opt, sched, cfg, epoch, history, best), last)
        epochs.set_postfix(loss=f"{stats['loss']:.4f}", val_auc=f"{v['mean_auc']:.3f}", best=f"{best:.3f}")
        log.info("epoch %d: loss %.4f, val AUC %s%s", epoch + 1, stats["loss"],
                 [round(a, 3) for a in v["auc"]], " (best)" if improved else "")
    # The F1 operating point of the best model, on the validation set.
    state = torch.load(out / "best.pt", map_location=device, weights_only=False)
    model.load_state_dict(state["model"])
    v = validate(detector, val_images, val_gt)
    threshold = tune_threshold(v["table"], val_gt, len(val_images))
    best_epoch = int(state["epoch"]) + 1
    metrics = {"model": cfg.model, "best_epoch": best_epoch, "best_val_mean_auc": best,
               "threshold": threshold, "history": history,
               "train_images": n_train, "val_images": len(val_images),
               "train_seconds": time.perf_counter() - t_start, "device": device}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


class _tta:
    """Temporarily switch a model's flip test-time augmentation (if it has one)."""

    def __init__(self, model, on: bool):
        self.model, self.on = model, on

    def __enter__(self):
        self.saved = getattr(self.model, "flip_tta", None)
        if self.saved is not None:
            self.model.flip_tta = self.on

    def __exit__(self, *exc):
        if self.saved is not None:
            self.model.flip_tta = self.saved


def _find_store(data: Path, name: str) -> Path:
    for ext in (".h5", ".zarr", ".hdf5"):
        if (data / f"{name}{ext}").exists():
            return data / f"{name}{ext}"
    raise FactoryError(f"{data}: no store named {name} (.h5 or .zarr); build it with `factory build`")
