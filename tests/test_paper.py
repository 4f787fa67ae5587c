"""The simulator against the paper: the shipped TrackPy baseline with the paper's
settings, scored by the project's own evaluator, lands on the paper's TrackPy row."""

import json

import pytest

from conftest import ROOT
from factory.build import build
from factory.config import load_config
from models.evaluation.evaluate import PAPER_ROWS, evaluate_detector
from models.detectors.trackpy import PAPER, PAPER_LABEL, TrackPyDetector

TOLERANCE = 0.08


@pytest.mark.slow
def test_trackpy_with_the_papers_settings_matches_the_papers_row(tmp_path):
    cfg = load_config(ROOT / "datasets.yaml")
    tests = [n for n in cfg.datasets if n.startswith("test")]
    build(cfg, tmp_path / "data", only=tests, progress=False)
    det = TrackPyDetector(PAPER, label=PAPER_LABEL)
    evaluate_detector(det, tmp_path / "data", tmp_path / "run", progress=False)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())["datasets"]
    paper = PAPER_ROWS["TrackPy (paper)"]
    cells = []
    for name, D in (("test_d075", 0.75), ("test_d100", 1.0), ("test_d175", 1.75)):
        for gate, ref in zip(("70", "140", "210"), paper[D]):
            cells.append((name, gate, round(m[name]["auc"][gate], 3), ref))
    assert all(abs(ours - ref) <= TOLERANCE for _, _, ours, ref in cells), cells
