"""sbatch scripts for sharded builds: an array job and a finalize job that depends on it."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from .errors import FactoryError

_TIME = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")
_MEM = re.compile(r"^\d+[KMGT]?$")


def sbatch_scripts(config: Path, out: Path, shards: int, fmt: str = "hdf5", only: list[str] | None = None,
                   partition: str | None = None, time: str = "01:00:00", cpus: int = 2, mem: str = "4G",
                   copy: bool = False, command: str | None = None) -> dict[str, str]:
    """The text of ``build.sbatch`` (array of ``shards`` tasks) and ``finalize.sbatch``.

    Both run ``command`` (default: the ``factory`` console script of this installation).
    ``time`` and ``mem`` are in SLURM's formats (``01:00:00``, ``4G``).

    Raises
    ------
    FactoryError
        ``shards`` below 1, a ``time`` or ``mem`` SLURM would not take, or no
        ``factory`` command to run.
    """
    if shards < 1:
        raise FactoryError(f"--shards {shards}: need at least 1")
    if not _TIME.match(time):
        raise FactoryError(f"--time {time}: use SLURM's format, e.g. 30, 01:00:00 or 1-00:00:00")
    if not _MEM.match(mem):
        raise FactoryError(f"--mem {mem}: use SLURM's format, e.g. 4000 or 4G")
    command = command or factory_command()
    config, out = Path(config).resolve(), Path(out).resolve()
    logs = out / "slurm-logs"
    sel = "".join(f" --only {shlex.quote(n)}" for n in (only or []))
    common = [f"#SBATCH --time={time}", f"#SBATCH --mem={mem}"]
    if partition:
        common.append(f"#SBATCH --partition={partition}")
    env = [
        "set -euo pipefail",
        "# Numba uses the CPUs SLURM allocated, caches its compiled kernel per job (a shared",
        "# cache on a network filesystem races between nodes), and HDF5 skips file locks,",
        "# which many parallel filesystems do not support.",
        "export NUMBA_NUM_THREADS=\"${SLURM_CPUS_PER_TASK:-1}\"",
        "export NUMBA_CACHE_DIR=\"${TMPDIR:-/tmp}/factory-numba-${SLURM_JOB_ID}\"",
        "export HDF5_USE_FILE_LOCKING=FALSE",
    ]
    build = "\n".join([
        "#!/bin/bash",
        "#SBATCH --job-name=factory-build",
        f"#SBATCH --array=0-{shards - 1}",
        f"#SBATCH --cpus-per-task={cpus}",
        *common,
        f"#SBATCH --output={logs}/build_%A_%a.out",
        f"#SBATCH --error={logs}/build_%A_%a.err",
        *env,
        f"{shlex.quote(command)} build {shlex.quote(str(config))} --out {shlex.quote(str(out))} "
        f"--format {fmt}{sel} --shard auto --quiet",
        "",
    ])
    finalize = "\n".join([
        "#!/bin/bash",
        "#SBATCH --job-name=factory-finalize",
        "#SBATCH --cpus-per-task=1",
        # Dies (is cancelled) instead of pending forever when an array task failed.
        "#SBATCH --kill-on-invalid-dep=yes",
        *common,
        f"#SBATCH --output={logs}/finalize_%j.out",
        f"#SBATCH --error={logs}/finalize_%j.err",
        *env,
        f"{shlex.quote(command)} finalize {shlex.quote(str(config))} --out {shlex.quote(str(out))} "
        f"--format {fmt}{sel}{' --copy' if copy else ''} --quiet",
        "",
    ])
    return {"build.sbatch": build, "finalize.sbatch": finalize}


def factory_command() -> str:
    """The ``factory`` console script to run in the jobs: the same installation as this one.

    The one installed beside this interpreter (a virtual environment's bin folder), else
    the one on PATH; FactoryError when there is none.
    """
    beside = Path(sys.executable).parent / "factory"
    found = str(beside) if beside.is_file() else shutil.which("factory")
    if not found:
        raise FactoryError("no `factory` command beside this Python or on PATH; install the package "
                           "(pip install -e .) so SLURM jobs can run it")
    return found


def write_scripts(scripts: dict[str, str], folder: Path) -> list[Path]:
    """Write each script (name -> text) into ``folder``, executable; create ``slurm-logs`` beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder.parent / "slurm-logs").mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in scripts.items():
        p = folder / name
        p.write_text(text)
        p.chmod(0o755)
        paths.append(p)
    return paths


def submit(build_script: Path, finalize_script: Path) -> tuple[str, str]:
    """Submit the array with sbatch, then the finalize job with ``afterok`` on it; return both job ids."""
    def sbatch(*args) -> str:
        try:
            r = subprocess.run(["sbatch", "--parsable", *map(str, args)], capture_output=True, text=True)
        except FileNotFoundError:
            raise FactoryError("sbatch: not found (is this a SLURM login node?)") from None
        if r.returncode != 0:
            raise FactoryError(f"sbatch {args[-1]}: {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout.strip().split(";")[0]

    array = sbatch(build_script)
    fin = sbatch(f"--dependency=afterok:{array}", finalize_script)
    return array, fin
