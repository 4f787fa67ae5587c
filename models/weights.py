"""Loading weight files safely: a file from elsewhere is data, never code.

``torch.load(..., weights_only=True)`` unpickles only tensors and plain containers
(dict, list, str, numbers); a file whose pickle would build any other object, such as
one that runs a command, is refused before anything in it runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from factory.errors import FactoryError

log = logging.getLogger(__name__)


def load_weights(path: str | Path, map_location="cpu") -> dict:
    """A checkpoint or state dict holding only tensors and plain values."""
    path = Path(path)
    if not path.is_file():
        raise FactoryError(f"{path}: no such weights file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError...: all mean "not plain weights"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FactoryError(f"{path}: not a plain weights file (only tensors and plain values are "
                           f"loaded, nothing is executed): {first[:200]}") from None
    if not isinstance(state, dict):
        raise FactoryError(f"{path}: not a state dict (found {type(state).__name__})")
    return state


def state_dict_of(state: dict) -> dict:
    """The model's tensors from a checkpoint ({"model": ...}) or a bare state dict."""
    inner = state.get("model", state)
    if not isinstance(inner, dict) or not all(isinstance(v, torch.Tensor) for v in inner.values()):
        raise FactoryError("the weights file holds no state dict of tensors")
    return inner


def matching_tensors(model: torch.nn.Module, path: str | Path) -> dict:
    """The tensors of a weights file whose name and shape match the model."""
    state = state_dict_of(load_weights(path))
    own = model.state_dict()
    return {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}


def load_matching(model: torch.nn.Module, path: str | Path) -> set[str]:
    """Load every tensor of a weights file whose name and shape match the model; the
    names loaded."""
    keep = matching_tensors(model, path)
    model.load_state_dict(keep, strict=False)
    log.info("loaded %d of %d tensors from %s", len(keep), len(model.state_dict()), path)
    return set(keep)
