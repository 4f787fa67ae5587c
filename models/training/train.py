"""The trainer: plain ``train_one_epoch`` and ``validate`` functions and ``fit``.

``fit`` writes a run folder (``models.training.runs.RunFolder``): the config, the best and last
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

from models.detectors.registry import NetDetector, family
from models.evaluation.metrics import gate_key, gates_for
from models.evaluation.truth import geometry, truth
from models.evaluation.tuning import f1_threshold, validate
from models.training.config import TrainConfig
from models.training.runs import RunFolder

log = logging.getLogger(__name__)


def make_optimizer(cfg: TrainConfig, params):
    """The config's optimizer (SGD with momentum, AdamW or AMSGrad) over ``params``."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=cfg.optimizer == "amsgrad")


def make_scheduler(cfg: TrainConfig, opt, steps_per_epoch: int):
    """The config's learning-rate schedule (one-cycle, cosine or constant), stepped per minibatch."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.15)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def minibatch_size(batch_size: int, area_px: int | None, image_shape) -> int:
    """Images per minibatch: ``batch_size`` for images of ``area_px`` pixels.

    Proportionally fewer (at least one) of larger images; ``batch_size`` itself when
    there is no reference area.
    """
    if area_px is None:
        return batch_size
    return max(1, round(batch_size * area_px / int(np.prod(image_shape[-2:]))))


def minibatches(loader, batch_size: int, area_px: int | None = None):
    """Split the loader's chunk-aligned blocks into training minibatches (``minibatch_size``)."""
    for images, t in loader:
        bs = minibatch_size(batch_size, area_px, images.shape)
        for a in range(0, len(images), bs):
            yield images[a:a + bs], t["points"][a:a + bs]


def train_one_epoch(model, fam, opt, sched, loader, cfg: TrainConfig, epoch: int, device: str,
                    steps: int, progress: bool = True) -> dict:
    """One pass over ``loader`` (flips if configured, gradient clipping at norm 10).

    Returns
    -------
    dict
        ``loss``: the mean training loss; ``steps``: minibatches taken.

    Raises
    ------
    FactoryError
        A non-finite loss (with the step and the loss's parts).
    """
    from tqdm.auto import tqdm

    train_mode(model, cfg.freeze)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    total, n = 0.0, 0
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", disable=not progress, leave=False)
    for images, centroids in minibatches(loader, cfg.batch_size, getattr(loader.dataset, "area_px", None)):
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


def fit(cfg: TrainConfig, data: Path | None, out: Path, device: str = "cpu", resume: bool = False,
        progress: bool = True, overwrite: bool = False) -> dict:
    """Train ``cfg.model`` on the data folder's ``cfg.train`` store, select on ``cfg.val``.

    Each epoch every head is validated against its own target on every validation store
    (mean PR-AUC over the gates, ``models.evaluation.tuning.validate``); the best epoch
    is kept, and its F1 threshold chosen on the validation stores pooled.

    Parameters
    ----------
    cfg : TrainConfig
        The training config.
    data : Path or None
        The folder with the stores (``--data``); overrides ``cfg.data``, and the run
        folder's config records the folder used.
    out : Path
        The run folder to write (``models.training.runs.RunFolder``).
    device : str
        ``"cpu"`` or ``"cuda"``.
    resume : bool
        Continue from ``last.pt`` with the run's own config (only ``epochs`` may change).
    progress : bool
        Progress bars (stderr).
    overwrite : bool
        Replace a trained model already in ``out`` (its files are removed only once the
        data and config have passed every check).

    Returns
    -------
    dict
        What the run's ``metrics.json`` holds: best epoch and mean AUC, threshold(s),
        history, sizes, pixel size (um), training seconds.

    Raises
    ------
    FactoryError
        Bad data, config or output folder, in one line.
    """
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
    train_paths = [find_store(data, n) for n in cfg.train_stores]
    val_paths = [find_store(data, n) for n in cfg.val_stores]
    if resume and not run.file(run.LAST).exists():
        raise FactoryError(f"{run.file(run.LAST)}: nothing to resume (no last checkpoint)")
    if not resume and run.has_model() and not overwrite:
        raise FactoryError(f"{out}: already holds a trained model (use --resume, --overwrite, or another --out)")
    if resume:
        before = run.read_config()
        if before.model_copy(update={"epochs": cfg.epochs, "data": cfg.data}) != cfg:
            raise FactoryError(f"{run.file(run.CONFIG)}: --resume continues the run's own config "
                               "(only --epochs may change)")
        if cfg.epochs != before.epochs and cfg.schedule != "constant":
            raise FactoryError(f"--epochs {cfg.epochs}: the {cfg.schedule} schedule of {run.path} was laid out "
                               f"for {before.epochs} epochs; resume it as it is, or train anew")
    stacks = None
    for path in train_paths + val_paths:
        with Store(path) as st:
            is_stack = st.kind == "stacks"
            if is_stack != (fam.ndim == 3):
                raise FactoryError(f"{path}: {cfg.model} trains on {'z-stacks' if fam.ndim == 3 else 'images'}, "
                                   f"this store holds {'z-stacks' if is_stack else 'images'}")
            if is_stack and stacks is None:  # the voxel size the 3D targets are drawn in, kept in the config
                stacks = geometry(st)
    if stacks is not None:
        params = {"pixel_size_um": stacks.pixel_size_um, "z_step_um": stacks.z_step_um,
                  **{k: v for k, v in cfg.model_params.items() if v is not None}}
        cfg = cfg.model_copy(update={"model_params": params})
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = fam.build(cfg.params()).to(device)
    # (On --resume the weights come from last.pt; the file started from is still recorded.)
    start_from = _start_from(model, cfg, load=not resume) if cfg.init_from else None
    _freeze(model, cfg)
    if overwrite and not resume:
        run.clear()
    run.create()
    vals = [_validation_set(path, cfg) for path in val_paths]
    sets = []
    for path in train_paths:
        with Store(path) as st:
            chunk = st.chunk_rows
            n = min(len(st), cfg.max_train_images or len(st))
        try:
            untrained = tuple(t for t in cfg.targets if not cfg.trains(Path(path).stem, t))
            sets.append(StoreBatches(path, batch_size=chunk * max(1, 2048 // chunk), stop=n, shuffle_within=True,
                                     seed=cfg.seed, target=cfg.target, untrained=untrained))
        except ValueError as exc:
            raise FactoryError(str(exc)) from None
    n_train = sum(b.stop - b.start for b in sets)
    batches = torch.utils.data.ConcatDataset(sets)
    # Several stores: minibatches hold the pixels of batch_size images of the first one.
    batches.area_px = int(np.prod(sets[0].store.image_shape[-2:])) if len(sets) > 1 else None
    steps = 0
    for b in sets:
        bs = minibatch_size(cfg.batch_size, batches.area_px, b.store.image_shape)
        steps += sum(math.ceil(min(b.batch_size, b.stop - a) / bs) for a in range(b.start, b.stop, b.batch_size))
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
    # One detector per head, each validated against its own target's truth on every val store.
    detectors = {t: NetDetector(fam, model, None, cfg.min_score, device, target=t, head=k)
                 for k, t in enumerate(cfg.targets)}
    gates = gates_for(fam.ndim).auc_nm

    # A head that nothing trainable feeds (its branch frozen) scores the same every epoch:
    # validated once, its score reused.
    fixed = {t for k, t in enumerate(cfg.targets) if hasattr(model, "head_parameters")
             and not any(p.requires_grad for p in model.head_parameters(k))}
    cache: dict = {}

    def run_validation() -> dict:
        scores = {}
        for t, det in detectors.items():
            for v in vals:
                if not cfg.trains(v["name"], t):
                    continue
                if t in fixed and (t, v["name"]) in cache:
                    scores[(t, v["name"])] = cache[(t, v["name"])]
                    continue
                scores[(t, v["name"])] = validate(det, v["images"], v["gt"][t], v["geom"])
                if t in fixed:
                    cache[(t, v["name"])] = scores[(t, v["name"])]
        return scores

    t_start = time.perf_counter()
    epochs = tqdm(range(start, cfg.epochs), desc=f"train {cfg.model}", unit="epoch", disable=not progress)
    for epoch in epochs:
        for b in sets:
            b.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            batches, batch_size=None, shuffle=True,
            generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        t0 = time.perf_counter()
        stats = train_one_epoch(model, fam, opt, sched, loader, cfg, epoch, device, steps, progress)
        with _tta(model, cfg.val_tta):
            scores = run_validation()
        train_mode(model, cfg.freeze)
        mean_auc = float(np.mean([v["mean_auc"] for v in scores.values()]))
        row = {"epoch": epoch + 1, "loss": stats["loss"],
               "val_auc": {gate_key(g): float(np.mean([v["auc"][i] for v in scores.values()])) for i, g in enumerate(gates)},
               "val_mean_auc": mean_auc, "seconds": time.perf_counter() - t0}
        if len(scores) > 1:
            row["val_auc_by"] = {f"{t} on {name}": {gate_key(g): a for g, a in zip(gates, v["auc"])}
                                 for (t, name), v in scores.items()}
        history.append(row)
        improved = mean_auc > best
        if improved:
            best = mean_auc
            run.save_best(model, epoch)
        run.save_last(model, opt, sched, epoch, history, best)
        epochs.set_postfix(loss=f"{stats['loss']:.4f}", val_auc=f"{mean_auc:.3f}", best=f"{best:.3f}")
        log.info("epoch %d: loss %.4f, val AUC %s%s", epoch + 1, stats["loss"],
                 [round(a, 3) for a in row["val_auc"].values()], " (best)" if improved else "")
    # The F1 operating point of each head of the best model, on the validation stores pooled.
    state = run.load(run.BEST, map_location=device)
    model.load_state_dict(state["model"])
    scores = run_validation()
    # (coordinates in um, so stores of different pixel sizes pool).
    thresholds = {t: f1_threshold([(scores[(t, v["name"])]["table"], v["gt"][t], v["geom"]) for v in vals
                                   if (t, v["name"]) in scores]) for t in cfg.targets}
    best_epoch = int(state["epoch"]) + 1
    metrics = {"model": cfg.model, "target": cfg.target, "best_epoch": best_epoch, "best_val_mean_auc": best,
               "threshold": thresholds[cfg.targets[0]], "history": history, "data": str(data),
               "train_images": n_train, "val_images": sum(len(v["images"]) for v in vals),
               "pixel_size_um": vals[0]["geom"].pixel_size_um, "train_seconds": time.perf_counter() - t_start, "device": device}
    if len(thresholds) > 1:
        metrics["thresholds"] = thresholds
    ranges = _int8_ranges(model, cfg, vals)
    if ranges:
        metrics["int8_ranges"] = ranges
    if start_from is not None:
        metrics["init_from"] = start_from
    run.write_metrics(metrics)
    return metrics


def _int8_ranges(model: torch.nn.Module, cfg: TrainConfig, vals: list[dict]) -> dict:
    """Each head's int8 activation ranges (``models.networks.int8.calibrate``).

    Over the first ``CALIBRATION_IMAGES`` images of each validation store that validates
    the head; SpotNet only.
    """
    from models.networks import int8

    if cfg.model != "spotnet" or cfg.params().se:
        return {}
    model, ranges = model.cpu(), {}
    for k, t in enumerate(cfg.targets):
        for v in vals:
            if cfg.trains(v["name"], t):  # stores may differ in image size: each calibrated alone
                x = torch.from_numpy(v["images"][:int8.CALIBRATION_IMAGES].astype(np.float32))[:, None]
                ranges[t] = int8.merge(ranges.get(t, {}), int8.calibrate(model, k, x))
    return ranges


def train(config: str | Path | None, data: str | Path | None, out: str | Path, model: str | None = None,
          device: str = "cpu", resume: bool = False, overwrite: bool = False, epochs: int | None = None,
          max_train_images: int | None = None, init_from: str | Path | None = None,
          progress: bool = True) -> tuple[Path, str]:
    """Train a detector from a training config into a run folder (``models.train``).

    Checks that ``out`` can hold the run before anything is read, reads the config
    (with ``resume`` and no ``config``: the run's own ``config.yaml``), lays ``model``
    and the overrides over it (``load_train_config``), then trains (``fit``), keeping
    the epoch with the best validation AUC.

    Parameters
    ----------
    config : str or Path or None
        A training config YAML (``configs/``, or a run folder's ``config.yaml`` to
        reproduce it); None: the family's built-in parameters, or with ``resume`` the
        run's own config.
    data : str or Path or None
        The folder with the train and val stores (`factory build`); None: the config's
        ``data``.
    out : str or Path
        The run folder: ``config.yaml``, ``best.pt``, ``last.pt``, ``metrics.json``.
    model : str, optional
        The network family (spotnet, gridnet, densitynet, keypointrcnn, dmdetnet3d);
        overrides the config's (and then drops its ``model_params``).
    device : str
        ``"cpu"`` or ``"cuda"``.
    resume : bool
        Continue from ``<out>/last.pt`` (only ``epochs`` may change).
    overwrite : bool
        Replace a trained model already in ``out``.
    epochs : int, optional
        Override the config's epochs.
    max_train_images : int, optional
        Train on the first images of the train store only.
    init_from : str or Path, optional
        A trained run folder (or weights file) to start from, overriding the config's
        ``init_from``.
    progress : bool
        Progress bars (stderr).

    Returns
    -------
    run : Path
        The run folder, ``out``.
    summary : str
        One line (what `factory train` prints after the run folder): the best epoch of
        all, its validation AUC at each gate (nm), the tuned F1 score threshold and the
        training time (min).

    Raises
    ------
    FactoryError
        ``out`` cannot hold a run (checked first); a bad config or override
        (``ConfigError``); then whatever ``fit`` refuses: no or wrong data, nothing to
        resume, a trained model in ``out`` without ``resume`` or ``overwrite``, no CUDA
        device, a non-finite loss.

    Examples
    --------
    >>> from models import train
    >>> run, summary = train("configs/spotnet_demo.yaml", "data", "runs/spotnet")  # doctest: +SKIP
    """
    from models.recordings.outputs import check_output
    from models.training.config import load_train_config

    out = Path(out)
    # Where the run goes, before anything is read or trained; whether it already holds a
    # trained model (resume, overwrite) is for fit to judge.
    check_output(out, "folder", overwrite=True, what="the run (config.yaml, best.pt, last.pt, metrics.json)")
    overrides = {k: v for k, v in {"epochs": epochs, "max_train_images": max_train_images,
                                   "init_from": init_from and str(init_from)}.items() if v is not None}
    if resume and config is None:
        config = RunFolder(out).file(RunFolder.CONFIG)
    cfg = load_train_config(config, model, overrides)
    m = fit(cfg, data, out, device, resume, progress=progress, overwrite=overwrite)
    best = m["history"][m["best_epoch"] - 1]["val_auc"]  # gate (nm) -> AUC
    return out, (f"best epoch {m['best_epoch']} of {cfg.epochs}, validation AUC "
                 f"{' / '.join(f'{a:.3f}' for a in best.values())} at {' / '.join(best)} nm, "
                 f"F1 threshold {m['threshold']:.3f}, {m['train_seconds'] / 60:.1f} min")


def _matches(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def train_mode(model, freeze=()) -> None:
    """Training mode, except the frozen modules: their batch-norm statistics stay as loaded."""
    model.train()
    for name, m in model.named_modules():
        if name and _matches(name, freeze):
            m.eval()


def _start_from(model, cfg: TrainConfig, load: bool = True) -> dict:
    """Load ``cfg.init_from`` into ``model`` (tensors whose name and shape fit).

    A head it lacks starts as a copy of the first.  Returns what was loaded, for
    metrics.json.
    """
    import hashlib

    from models.detectors.weights import load_matching, matching_tensors

    path = Path(cfg.init_from)
    if not path.exists():
        raise FactoryError(f"init_from: {path}: no such run folder or weights file")
    if path.is_dir():
        path = RunFolder(path).file(RunFolder.BEST)
    loaded = load_matching(model, path) if load else set(matching_tensors(model, path))
    if not loaded:
        raise FactoryError(f"init_from: {cfg.init_from} holds no tensor of this {cfg.model} network "
                           "(other family or widths)")
    missing = [k for k in model.state_dict() if k not in loaded]
    # A one-headed file: the other heads start as copies of the first (none of theirs loaded).
    if load and missing and hasattr(model, "copy_first_head") and all(k.startswith("extra_") for k in missing) \
            and not any(k.startswith("extra_") for k in loaded):
        model.copy_first_head()
    elif load and missing:
        log.warning("init_from %s: %d tensors not in the file start fresh (%s, ...)", path, len(missing), missing[0])
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"path": str(path), "sha256": digest, "tensors_loaded": len(loaded), "tensors": len(model.state_dict())}


def _freeze(model, cfg: TrainConfig) -> None:
    """Parameters named by ``cfg.freeze`` (prefixes) keep their loaded values."""
    names = [n for n, _ in model.named_parameters()]
    for p in cfg.freeze:
        if not any(_matches(n, [p]) for n in names):
            tops = sorted({n.split(".")[0] for n in names})
            raise FactoryError(f"freeze: {p!r} names no parameter of {cfg.model} (its parts: {', '.join(tops)})")
    for n, param in model.named_parameters():
        if _matches(n, cfg.freeze):
            param.requires_grad_(False)


def _validation_set(path: Path, cfg: TrainConfig) -> dict:
    """The first ``val_images`` of a validation store.

    With the truth (um) of each head's target it validates, and the store's geometry.
    """
    with Store(path) as st:
        nv = min(cfg.val_images, len(st))
        v = {"name": Path(path).stem, "images": st.read("images", 0, nv), "geom": geometry(st)}
        v["gt"] = {t: truth(st, t, 0, nv) for t in cfg.targets if cfg.trains(v["name"], t)}
    return v


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
