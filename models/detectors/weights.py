"""Loading weight files safely: a file from elsewhere is data, never code.

``torch.load(..., weights_only=True)`` unpickles only tensors and plain containers
(dict, list, str, numbers); a file whose pickle would build any other object, such as
one that runs a command, is refused before anything in it runs.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import torch

from factory.errors import FactoryError

log = logging.getLogger(__name__)


def load_weights(path: str | Path, map_location="cpu") -> dict:
    """A checkpoint or state dict holding only tensors and plain values.

    Parameters
    ----------
    path : str or Path
        A file written by ``torch.save``.
    map_location : str or torch.device
        Where the tensors are loaded (``torch.load``'s ``map_location``).

    Returns
    -------
    dict
        The file's top-level dict (a checkpoint, or a bare state dict).

    Raises
    ------
    FactoryError
        A missing, empty or unreadable file, one that is not PyTorch weights, one whose
        pickle would build Python objects (nothing in it is run), or one whose top
        level is not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FactoryError(f"{path}: no such weights file")
    try:
        if path.stat().st_size == 0:
            raise FactoryError(f"{path}: empty file (0 bytes), not PyTorch weights")
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except FactoryError:
        raise
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, OSError...
        raise FactoryError(_refusal(path, exc)) from None
    if not isinstance(state, dict):
        raise FactoryError(f"{path}: not a state dict (found {type(state).__name__})")
    return state


def _refusal(path: Path, exc: Exception) -> str:
    """Why a file was not loaded, in words that are true of it.

    Never advice to load it unsafely: torch's own message suggests exactly that.
    """
    if isinstance(exc, OSError):
        return f"{path}: cannot read: {exc.strerror or exc}"
    code = re.search(r"GLOBAL\s+([\w.]+)", str(exc))
    if code:  # the pickle names a Python object to build: an import, a call, a class
        return (f"{path}: not a plain weights file: refused because it holds pickled Python objects "
                f"({code.group(1)}), which would run code when loaded; only tensors and plain values are "
                "accepted, and nothing in it was run")
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"
    if zipped:
        return (f"{path}: a zip archive that cannot be read as PyTorch weights (corrupt, truncated, or not "
                "written by torch.save)")
    return (f"{path}: not a PyTorch weights file (neither the archive torch.save writes nor a weights "
            "pickle: corrupt, truncated or another format)")


def state_dict_of(state: dict) -> dict:
    """The model's tensors from a checkpoint ({"model": ...}) or a bare state dict.

    Raises FactoryError when that holds anything but tensors.
    """
    inner = state.get("model", state)
    if not isinstance(inner, dict) or not all(isinstance(v, torch.Tensor) for v in inner.values()):
        raise FactoryError("the weights file holds no state dict of tensors")
    return inner


def matching_tensors(model: torch.nn.Module, path: str | Path) -> dict:
    """The tensors of a weights file whose name and shape match the model (loaded safely: ``load_weights``)."""
    state = state_dict_of(load_weights(path))
    own = model.state_dict()
    return {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}


def load_matching(model: torch.nn.Module, path: str | Path) -> set[str]:
    """Load every tensor of a weights file whose name and shape match the model.

    The others keep their values.  Returns the names loaded; FactoryError as for
    ``load_weights``.
    """
    keep = matching_tensors(model, path)
    model.load_state_dict(keep, strict=False)
    log.info("loaded %d of %d tensors from %s", len(keep), len(model.state_dict()), path)
    return set(keep)
