"""The trainer: plain ``train_one_epoch`` and ``validate`` functions and ``fit``.

``fit`` writes a run folder (``models.runs.RunFolder``): the config, the best and last
checkpoints, and the metrics with the F1 threshold tuned on the validation set.
Training stops on a non-finite loss.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from factory.errors import FactoryError
from factory.stores import Store, find_store
from loaders.augment import flip_batch
from loaders.datasets import StoreBatches

from .evaluate import ground_truth, pixel_size_um as store_pixel_size
from .config import TrainConfig
from . import volumes
from .metrics import F1_GATE_NM, GATES_3D_NM, GATES_NM, Points, best_f1_threshold, nm_to_px, pr_auc
from .registry import NetDetector, family
from .runs import RunFolder

log = logging.getLogger(__name__)


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
            yield images[a:a + batch_size], t["points"][a:a + batch_size]


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


def validate(detector: NetDetector, images: np.ndarray, gt: Points, pixel_size_um: float) -> dict:
    """Validation AUCs at the three gates and their mean (the model-selection score)."""
    table = detector.detect(images)
    pred = Points.from_arrays(table.frame, table.x, table.y, len(images))
    aucs = [pr_auc(pred, table.score.to_numpy(), gt, nm_to_px(g, pixel_size_um)) for g in GATES_NM]
    return {"auc": aucs, "mean_auc": float(np.mean(aucs)), "table": table}


def fit(cfg: TrainConfig, data: Path | None, out: Path, device: str = "cpu", resume: bool = False,
        progress: bool = True) -> dict:
    """Train ``cfg.model`` on the data folder's ``cfg.train`` store, select on ``cfg.val``.

    ``data`` (``--data``) overrides the config's ``data``; the run folder's config
    records the folder used."""
    from tqdm.auto import tqdm

    if data is None and cfg.data is None:
        raise FactoryError("no training data: give --data DIR (or `data:` in the training config)")
    data = Path(data if data is not None else cfg.data)
    cfg = cfg.model_copy(update={"data": str(data)})
    run = RunFolder(out)
    fam = family(cfg.model)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FactoryError("--device cuda: no CUDA device available (use --device cpu)")
    if not data.is_dir():
        raise FactoryError(f"{data}: no such data folder (build one with `factory build`)")
    train_path = find_store(data, cfg.train)
    val_path = find_store(data, cfg.val)
    if resume and not run.file(run.LAST).exists():
        raise FactoryError(f"{run.file(run.LAST)}: nothing to resume (no last checkpoint)")
    if not resume and run.has_model():
        raise FactoryError(f"{out}: already holds a trained model (use --resume, --overwrite, or another --out)")
    if resume:
        before = run.read_config()
        if before.model_copy(update={"epochs": cfg.epochs, "data": cfg.data}) != cfg:
            raise FactoryError(f"{run.file(run.CONFIG)}: --resume continues the run's own config "
                               "(only --epochs may change)")
        if cfg.epochs != before.epochs and cfg.schedule != "constant":
            raise FactoryError(f"--epochs {cfg.epochs}: the {cfg.schedule} schedule of {run.path} was laid out "
                               f"for {before.epochs} epochs; resume it as it is, or train anew")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run.create()

    with Store(train_path) as st:
        stacks = volumes.is_stack_store(st)
        if stacks != (fam.ndim == 3):
            raise FactoryError(f"{train_path}: {cfg.model} trains on {'z-stacks' if fam.ndim == 3 else 'images'}, "
                               f"this store holds {'z-stacks' if stacks else 'images'}")
        if stacks:  # the voxel size the 3D targets are drawn in, recorded in the run's config
            geom = volumes.geometry(st)
            params = {"pixel_size_um": geom.pixel_size_um, "z_step_um": geom.z_step_um, **{
                k: v for k, v in cfg.model_params.items() if v is not None}}
            cfg = cfg.model_copy(update={"model_params": params})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = fam.build(cfg.params()).to(device)
    with Store(val_path) as st:
        nv = min(cfg.val_images, len(st))
        val_images = st.read("images", 0, nv)
        if stacks:
            val_gt, geom = volumes.truth_um(st, cfg.target, 0, nv), volumes.geometry(st)
        else:
            val_gt = ground_truth(st, cfg.target, 0, nv)
        pixel_size_um = store_pixel_size(st)

    def run_validation():
        if stacks:
            return volumes.validate(detector, val_images, val_gt, geom)
        return validate(detector, val_images, val_gt, pixel_size_um)
    with Store(train_path) as st:
        chunk = st.chunk_rows or 256
        n_train = min(len(st), cfg.max_train_images or len(st))
    block = chunk * max(1, 2048 // chunk)
    try:
        batches = StoreBatches(train_path, batch_size=block, stop=n_train, shuffle_within=True, seed=cfg.seed,
                               target=cfg.target)
    except ValueError as exc:
        raise FactoryError(str(exc)) from None
    steps = sum(math.ceil(min(block, n_train - a) / cfg.batch_size) for a in range(0, n_train, batches.batch_size))
    opt = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    sched = make_scheduler(cfg, opt, steps)
    history, best, start = [], -1.0, 0
    if resume:
        ck = run.load(run.LAST, map_location=device)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        history, best, start = list(ck["history"]), float(ck["best"]), int(ck["epoch"]) + 1
    run.write_config(cfg)
    detector = NetDetector(fam, model, None, cfg.min_score, device, target=cfg.target)
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
            v = run_validation()
        model.train()
        row = {"epoch": epoch + 1, "loss": stats["loss"],
               "val_auc": {str(g): a for g, a in zip(GATES_3D_NM if stacks else GATES_NM, v["auc"])},
               "val_mean_auc": v["mean_auc"], "seconds": time.perf_counter() - t0}
        history.append(row)
        improved = v["mean_auc"] > best
        if improved:
            best = v["mean_auc"]
            run.save_best(model, epoch)
        run.save_last(model, opt, sched, epoch, history, best)
        epochs.set_postfix(loss=f"{stats['loss']:.4f}", val_auc=f"{v['mean_auc']:.3f}", best=f"{best:.3f}")
        log.info("epoch %d: loss %.4f, val AUC %s%s", epoch + 1, stats["loss"],
                 [round(a, 3) for a in v["auc"]], " (best)" if improved else "")
    # The F1 operating point of the best model, on the validation set.
    state = run.load(run.BEST, map_location=device)
    model.load_state_dict(state["model"])
    v = run_validation()
    t = v["table"]
    if stacks:
        threshold = volumes.f1_threshold(t, val_gt, geom)
    else:
        threshold = best_f1_threshold(t.frame, t[["x", "y"]].to_numpy(), t.score, val_gt,
                                      nm_to_px(F1_GATE_NM, pixel_size_um))
    best_epoch = int(state["epoch"]) + 1
    metrics = {"model": cfg.model, "target": cfg.target, "best_epoch": best_epoch, "best_val_mean_auc": best,
               "threshold": threshold, "history": history, "data": str(data),
               "train_images": n_train, "val_images": len(val_images), "pixel_size_um": pixel_size_um,
               "train_seconds": time.perf_counter() - t_start, "device": device}
    run.write_metrics(metrics)
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
