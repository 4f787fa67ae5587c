"""Detectors, training, evaluation, localisation and tracking.

The functions in ``__all__`` are the Python API; every `factory` command that uses
a detector is one call to one of them.  Each is imported on first use (PEP 562), so
``import models`` loads neither torch nor trackpy: a command's start-up, and a
script that needs only TrackPy, pay for what they use.

>>> from models import load_detector, predict_file, track_file, evaluate_stores
"""

import os
from importlib import import_module

# oneDNN's AMX int8 kernels (on CPUs that have AMX) gave a frame another last bit in a
# batch of 16 frames than alone; capped at AVX-512 with VNNI, the int8 kernels of every
# other machine, a frame's output is the same in any batch (tests/test_int8.py), float32
# to the bit as before, and int8 here no slower.  oneDNN reads the cap once, before its
# first primitive, so it is set where the package is first imported; a value the user
# set stands.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")

# Public name -> the module that defines it.
_API = {
    "load_detector": "models.recordings.predict",  # a run folder, a trackpy.json or "trackpy" -> a detector
    "predict_file": "models.recordings.predict",  # `factory predict`
    "Prediction": "models.recordings.predict",
    "track_file": "models.tracking.tracks",  # `factory track`
    "TrackResult": "models.tracking.tracks",
    "evaluate_stores": "models.evaluation.evaluate",  # `factory evaluate`
    "load_train_config": "models.training.config",
    "train": "models.training.train",  # `factory train`: config, overrides, fit, summary
    "fit": "models.training.train",  # the training loop, from a TrainConfig
    "calibrate": "models.recordings.calibration",  # `factory calibrate`
    "write_report": "models.evaluation.report",  # `factory report`
    "Detector": "models.detectors.base",  # what every detector offers
    "ScanTiming": "models.tracking.timing",
}

__all__ = list(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_API[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
