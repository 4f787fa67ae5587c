import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from factory.config import parse_config
from factory.kernel import kernel_params, simulate
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
    """A validated Dataset with the paper's defaults and ``sections`` overriding them."""
    cfg = parse_config({"seed": seed, "datasets": {name: {"n_images": n_images, **sections}}})
    return cfg, cfg.datasets[name]


@pytest.fixture(params=["numba", "numpy"])
def engine(request):
    """Run a physics test on the kernel and on the plain NumPy reference."""

    def run(n_images=256, seed=7, **sections):
        cfg, ds = dataset(n_images, seed, **sections)
        if request.param == "numba":
            return simulate(ds, cfg.seed)
        return simulate_numpy(kernel_params(ds), n_images, np.random.default_rng(seed))

    run.name = request.param
    return run


def run_cli(*args, cwd=None, env=None):
    """Run the installed `factory` command; returns CompletedProcess."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "factory.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=e, timeout=600)
