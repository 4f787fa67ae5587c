import contextlib
import copy
import dataclasses
import logging
import os
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer._click import formatting  # where Typer's CliRunner sets the help width
from typer.testing import CliRunner

from cli.main import UNAWAITED
from factory.config import parse_config
from factory.kernel import simulate
from factory.reference import simulate_numpy

ROOT = Path(__file__).resolve().parents[1]


def deep_update(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and "type" not in v:
            out[k] = deep_update(out[k], v)
        else:
            out[k] = v
    return out


def dataset(n_images=256, seed=7, name="d", **sections):
    """A validated Dataset with the paper's defaults and ``sections`` overriding them
    (``n_images=None, n_movies=M, movie={...}`` for movies)."""
    size = {} if n_images is None else {"n_images": n_images}
    cfg = parse_config({"seed": seed, "datasets": {name: {**size, **sections}}})
    return cfg, cfg.datasets[name]


@pytest.fixture(params=["numba", "numpy"])
def engine(request):
    """Run a physics test on the kernel and on the plain NumPy reference."""

    def run(n_images=256, seed=7, **sections):
        cfg, ds = dataset(n_images, seed, **sections)
        if request.param == "numba":
            return simulate(ds, cfg.seed)
        return simulate_numpy(ds, ds.n_images, np.random.default_rng(seed))

    run.name = request.param
    return run


def store_arrays(path) -> dict:
    """Every array of a store, read whole."""
    from factory.stores import Store

    with Store(path) as st:
        return {n: st.read(n) for n in st.names}


def assert_same_arrays(a, b) -> None:
    """Two stores (paths) or two dicts of arrays: the same names, dtypes, shapes and bytes."""
    a = a if isinstance(a, dict) else store_arrays(a)
    b = b if isinstance(b, dict) else store_arrays(b)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


# --- the `factory` command -------------------------------------------------------------

# FACTORY_TESTS_SUBPROCESS=1: run_cli starts a process per call (to time both ways, or to
# check that the tests hold in processes too).
SUBPROCESS = os.environ.get("FACTORY_TESTS_SUBPROCESS", "0") not in ("", "0")
# Read when a library is imported or starts its threads: for a call in this interpreter,
# which imported them long ago, they would change nothing.
IMPORT_TIME_ENV = ("NUMBA_", "OMP_", "MKL_", "OPENBLAS_", "TORCH_", "PYTHON")
# A new interpreter's warnings filters (no -W, no PYTHONWARNINGS).
FRESH_WARNING_FILTERS = [("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, ""),
                         ("ignore", PendingDeprecationWarning, ""), ("ignore", ImportWarning, ""),
                         ("ignore", ResourceWarning, "")]


@dataclasses.dataclass
class CliResult:
    """A CompletedProcess's fields (stdout and stderr apart), and the exception a call in
    this interpreter ended with (None after exit status 0; SystemExit after another)."""

    args: list
    returncode: int
    stdout: str
    stderr: str
    exception: BaseException | None = None


def run_cli(*args, cwd=None, env=None):
    """`factory ARGS`: in this interpreter (``invoke_cli``), or in a process of its own
    (``run_cli_process``) when FACTORY_TESTS_SUBPROCESS=1."""
    return (run_cli_process if SUBPROCESS else invoke_cli)(*args, cwd=cwd, env=env)


def run_cli_process(*args, cwd=None, env=None):
    """`python -m cli ARGS` in a new interpreter; returns a CompletedProcess.  For tests of
    the process itself: variables read at import (NUMBA_NUM_THREADS), signals, concurrent
    processes, SLURM jobs."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=e, timeout=600)


def invoke_cli(*args, cwd=None, env=None) -> CliResult:
    """`factory ARGS` in this interpreter (Typer's CliRunner), always: tests that patch the
    library first call this.  The call gets what ``cli.main.main`` gives a process (WARNING
    logs on stderr, malloc tuning) and a process's defaults (a new interpreter's warnings
    filters, printed on stderr; help wrapped to COLUMNS, else 80); an uncaught
    exception is exit status 1 with its traceback on stderr.  ``env`` is in os.environ and
    ``cwd`` the current folder for the call only."""
    from cli.main import app
    from factory.perf import tune_malloc

    argv = [str(a) for a in args]
    # COLUMNS: a process whose output is a pipe takes 80 columns unless it is set.
    env = {"COLUMNS": os.environ.get("COLUMNS", "80"), **{k: str(v) for k, v in (env or {}).items()}}
    late = [k for k in env if k.startswith(IMPORT_TIME_ENV)]
    if late:
        raise ValueError(f"{', '.join(late)}: read at import; set them for run_cli_process")
    tune_malloc()  # once per process, as main() does
    with contextlib.chdir(cwd) if cwd is not None else contextlib.nullcontext():
        r = _ProcessLikeRunner().invoke(app, argv, env=env)
    stderr = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*r.exc_info))
    return CliResult(argv, r.exit_code, r.stdout, stderr, r.exception)


class _ProcessLikeRunner(CliRunner):
    """CliRunner whose calls warn and log on their own stderr, as a `factory` process does."""

    @contextlib.contextmanager
    def isolation(self, *args, **kwargs):
        outer = {"stdout": (sys.stdout, sys.__stdout__), "stderr": (sys.stderr, sys.__stderr__)}
        with super().isolation(*args, **kwargs) as streams, warnings.catch_warnings():
            # CliRunner wraps help at 80 columns; click in a process, to COLUMNS (less 2).
            # CliRunner puts the width back.
            formatting.FORCED_WIDTH = None
            warnings.resetwarnings()
            for action, category, module in FRESH_WARNING_FILTERS:
                warnings.filterwarnings(action, category=category, module=module, append=True)
            warnings.filterwarnings("ignore", message=UNAWAITED, category=RuntimeWarning)  # as main() does
            warnings.showwarning = _print_warning  # on the call's stderr, not in pytest's record
            with _logging_as_in_main(outer):
                yield streams


def _print_warning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextlib.contextmanager
def _logging_as_in_main(outer: dict):
    """``cli.main.main``'s logging for one call: WARNING and above on the call's stderr
    (its logging.basicConfig), asyncio's below CRITICAL dropped.  Handlers that libraries
    put on this process's stdout or stderr (TrackPy's, on stdout) write to the call's
    meanwhile; one a library adds during the call (imported by it) is moved to this
    process's streams after it, not left on the call's, which are closed."""
    root, aio = logging.getLogger(), logging.getLogger("asyncio")
    levels = (root.level, aio.level)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    inner = {"stdout": sys.stdout, "stderr": sys.stderr}
    moved = []
    for h in _stream_handlers():
        name = next((n for n, streams in outer.items() if h.stream in streams), None)
        if name is not None:
            moved.append((h, h.stream))
            h.setStream(inner[name])
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    aio.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(levels[0])
        aio.setLevel(levels[1])
        for h, stream in moved:
            h.setStream(stream)
        for h in _stream_handlers():
            for name, stream in inner.items():
                if h.stream is stream:
                    h.setStream(outer[name][0])


def _stream_handlers() -> list:
    """The plain StreamHandlers of every logger (not pytest's capturing ones)."""
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    return [h for lg in loggers for h in lg.handlers if type(h) is logging.StreamHandler]


def one_line_error(r, *needles, absent=(), code=2):
    """Bad input's contract: exit status ``code`` (any non-zero when None), no traceback,
    exactly one line on stderr, holding every needle and none of ``absent``.  ``r``: what
    ``run_cli``, ``invoke_cli`` or ``run_cli_process`` returned."""
    assert (r.returncode != 0 if code is None else r.returncode == code), (r.returncode, r.stdout, r.stderr)
    assert getattr(r, "exception", None) is None or isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    for n in absent:
        assert n not in lines[0], lines[0]
    return lines[0]


# --- trained detectors, shared by the network tests and the contract suite ---------------

# Steps and learning rates that overfit 16 bright images (8 for Keypoint R-CNN, whose
# images are rescaled to 64 px to keep the run short on a CPU).
OVERFIT = {
    "spotnet": {"steps": 150, "lr": 3e-3},
    # deepBlink's dice saturates a wrong cell: gentler.  Its offsets are learnt from one cell
    # per image, 16 in all, and memorised from the whole image: pasted into a larger field
    # they drifted by up to 1.7 px; shifting the content by whole cells (shift_by_cells)
    # makes them local (0.5 - 0.9 px in the field, 48 other pastes all < 1 px).
    "gridnet": {"steps": 400, "lr": 1e-3, "amsgrad": True, "shift_px": 4},
    "densitynet": {"steps": 200, "lr": 3e-3},
    "keypointrcnn": {"steps": 100, "lr": 1e-3, "images": 8, "params": {"min_size": 64}, "clip": 10.0},
}
_TRAINED: dict = {}
# torch seed of the overfitted networks' initialisation and training (the training images
# stay the same): FACTORY_TEST_SEED=1 make test (or pytest) runs the suite on networks
# trained from another seed, to check that no test hangs on one seed's rounding.
TRAINING_SEED = int(os.environ.get("FACTORY_TEST_SEED", "0"))


def small_training_set():
    """Bright, slowly moving particles: the shape is easy, so overfitting is quick."""
    cfg, ds = dataset(16, seed=3, particles={"diffusion_um2_s": 0.2, "n_qd": 40.0})
    out = simulate(ds, cfg.seed)
    return out["images"].astype(np.float32), out["centroids"]


def shift_by_cells(x, c, step: int, n_bkg: float = 8.4):
    """Each image's content moved by a random multiple of ``step`` px (at most two, each
    axis; the spot stays 2 px inside), the uncovered pixels background noise (Poisson of
    the paper's ``n_bkg``, as the contract suite's fields), with its (N, 1, 2) centroids."""
    import torch

    n, _, h, w = x.shape
    out, moved = torch.poisson(torch.full_like(x, n_bkg)), c.clone()
    for i in range(n):
        px, py = c[i, 0].tolist()
        sx = step * int(torch.randint(max(-int((px - 2) // step), -2), min(int((w - 3 - px) // step), 2) + 1, ()))
        sy = step * int(torch.randint(max(-int((py - 2) // step), -2), min(int((h - 3 - py) // step), 2) + 1, ()))
        src = x[i, :, max(0, -sy):h - max(0, sy), max(0, -sx):w - max(0, sx)]
        out[i, :, max(0, sy):max(0, sy) + src.shape[-2], max(0, sx):max(0, sx) + src.shape[-1]] = src
        moved[i, :, 0] += sx
        moved[i, :, 1] += sy
    return out, moved


def overfit(name: str):
    """A network of family ``name`` trained from scratch on the small set (cached)."""
    if name in _TRAINED:
        return _TRAINED[name]
    import torch

    from models.detectors.registry import NetDetector, family, parse_params

    recipe = OVERFIT[name]
    images, centroids = small_training_set()
    n = recipe.get("images", len(images))
    fam = family(name)
    torch.manual_seed(TRAINING_SEED)
    model = fam.build(parse_params(name, recipe.get("params", {})))
    opt = torch.optim.Adam(model.parameters(), lr=recipe["lr"], amsgrad=recipe.get("amsgrad", False))
    x, c = torch.from_numpy(images[:n])[:, None], torch.from_numpy(centroids[:n])
    model.train()
    for _ in range(recipe["steps"]):
        xb, cb = shift_by_cells(x, c, recipe["shift_px"]) if "shift_px" in recipe else (x, c)
        value, parts = fam.loss(model, xb, cb)
        assert torch.isfinite(value), parts
        opt.zero_grad()
        value.backward()
        if "clip" in recipe:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["clip"])  # as the trainer does
        opt.step()
    _TRAINED[name] = NetDetector(fam, model, min_score=0.05 if name != "keypointrcnn" else 0.0)
    return _TRAINED[name]


def overfit_run(path, name: str = "spotnet", **config):
    """A run folder at ``path`` as `factory train` leaves one, holding ``overfit(name)``'s
    weights; its config: ``config`` over ``min_score: 0.05``."""
    from models.training.config import parse_train_config
    from models.training.runs import RunFolder

    run = RunFolder(path)
    run.create()
    run.write_config(parse_train_config({"model": name, "min_score": 0.05, **config}))
    run.save_best(overfit(name).model, 0)
    return run


def ready_detector(name: str):
    """Any registered detector, ready to run: TrackPy as it is, networks overfitted."""
    from models.detectors.registry import family, make_detector

    return make_detector(name) if family(name).kind == "classical" else overfit(name)
