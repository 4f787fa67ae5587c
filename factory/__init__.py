"""Two-photon microscopy simulator and dataset factory.

The names in ``__all__`` are the Python API; the `factory` commands that build and
read stores call them.  Each is imported on first use (PEP 562), so ``import factory``
loads neither Numba, h5py nor the package metadata: a command's start-up pays for
what it uses.

>>> from factory import build_from_config, load_config, verify_stores, Store
"""

from importlib import import_module

# Public name -> (the module that defines it, its name there).  ``build``, ``finalize``
# and ``preview`` name modules of this package too, so their functions are exported
# under names of their own.
_API = {
    "load_config": ("factory.config", "load_config"),  # a datasets YAML -> a checked config
    "parse_config": ("factory.config", "parse_config"),  # the same from a dict
    "simulate": ("factory.kernel", "simulate"),  # one dataset's images in memory
    "build_from_config": ("factory.build", "build_from_config"),  # `factory build` (with --shard or not)
    "build_stores": ("factory.build", "build"),  # a config's stores, in this process
    "build_shards": ("factory.shards", "build_shards"),  # one shard of each of its datasets
    "BuildResult": ("factory.build", "BuildResult"),
    "finalize_stores": ("factory.finalize", "finalize"),  # `factory finalize`
    "verify_stores": ("factory.finalize", "verify_stores"),  # `factory verify`
    "verify_store": ("factory.finalize", "verify_store"),  # one store
    "slurm_jobs": ("factory.slurm", "slurm_jobs"),  # `factory slurm`
    "SlurmJobs": ("factory.slurm", "SlurmJobs"),
    "Store": ("factory.stores", "Store"),  # read a finished store
    "find_stores": ("factory.stores", "find_stores"),
    "summarize": ("factory.inspect_store", "summarize"),  # `factory inspect`
    "preview_store": ("factory.preview", "preview_store"),  # `factory preview`
    "schema_text": ("factory.config", "schema_text"),  # `factory schema`
    "FactoryError": ("factory.errors", "FactoryError"),  # every user error, in one line
}

__all__ = [*_API, "__version__"]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("twophoton-factory")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0.0.0+unknown"


def __getattr__(name: str):
    if name == "__version__":
        value = _version()
    elif name in _API:
        module, attr = _API[name]
        value = getattr(import_module(module), attr)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
