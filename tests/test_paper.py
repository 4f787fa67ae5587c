"""The simulator against the paper: TrackPy on our test set scores like TrackPy on theirs."""

import warnings

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT
from factory.config import load_config
from factory.kernel import simulate
from models.metrics import Points, pr_auc

PAPER_TRACKPY_D075 = {1: 0.06, 2: 0.42, 3: 0.73}


@pytest.mark.slow
def test_trackpy_on_default_test_d075_matches_the_paper():
    import trackpy

    trackpy.quiet()
    cfg = load_config(ROOT / "datasets.yaml")
    ds = cfg.datasets["test_d075"]
    out = simulate(ds, cfg.seed)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, im in enumerate(out["images"].astype(np.float64)):
            f = trackpy.locate(im, 7)
            rows.append(pd.DataFrame({"frame": i, "x": f["x"], "y": f["y"], "mass": f["mass"]}))
    table = pd.concat(rows)
    pred = Points.from_arrays(table.frame, table.x, table.y, len(out["images"]))
    gt = Points.from_centroids(out["centroids"], out["n_particles"])
    for gate, paper in PAPER_TRACKPY_D075.items():
        auc = pr_auc(pred, table.mass.to_numpy(), gt, gate)
        assert abs(auc - paper) <= 0.08, (gate, auc, paper)
