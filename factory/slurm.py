"""sbatch scripts for sharded builds: an array job and a finalize job that depends on it."""

from __future__ import annotations

import logging
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import FactoryError

log = logging.getLogger(__name__)

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


_submit = submit  # slurm_jobs takes a flag of that name


@dataclass
class SlurmJobs:
    """The two jobs of a sharded build on SLURM, written and perhaps submitted (``slurm_jobs``).

    Attributes
    ----------
    build_script : Path
        ``build.sbatch``: the array job, one task per shard.
    finalize_script : Path
        ``finalize.sbatch``: the job that finalizes the stores once every task succeeded.
    shards : int
        Tasks of the array (shards per dataset).
    array_job, finalize_job : str or None
        The job ids sbatch gave them; None when not submitted.
    """

    build_script: Path
    finalize_script: Path
    shards: int
    array_job: str | None = None
    finalize_job: str | None = None

    def summary(self) -> str:
        """One line: the jobs submitted, or the command that submits them."""
        if self.array_job is None:
            return (f"submit with: jid=$(sbatch --parsable {self.build_script}) && "
                    f"sbatch --dependency=afterok:$jid {self.finalize_script}")
        return (f"submitted array job {self.array_job} ({self.shards} tasks) and finalize job {self.finalize_job} "
                f"(afterok:{self.array_job})")


def slurm_jobs(config: str | Path, out: str | Path, shards: int, fmt: str = "hdf5", only: list[str] | None = None,
               partition: str | None = None, time: str = "01:00:00", cpus: int = 2, mem: str = "4G",
               copy: bool = False, submit: bool = False,
               report: Callable[[str], None] | None = None) -> SlurmJobs:
    """Write the sbatch jobs of a sharded build into ``<out>/slurm/`` and submit them (``factory.slurm_jobs``).

    The config and the dataset names are checked first, then the settings, and only
    then are the scripts written (``sbatch_scripts``, ``write_scripts``): the array job
    builds shard I of ``shards`` of every dataset in task I, the finalize job runs after
    it (``afterok``).

    Parameters
    ----------
    config : str or Path
        The datasets YAML, read by every task (on a filesystem every node sees).
    out : str or Path
        The output folder of the stores; the scripts go to ``<out>/slurm/``, the jobs'
        logs to ``<out>/slurm-logs/``.
    shards : int
        Array tasks (shards per dataset), at least 1.
    fmt : {"hdf5", "zarr"}
        The store format.
    only : list of str, optional
        The datasets, by name (None: every one).
    partition : str, optional
        The SLURM partition (None: the cluster's default).
    time : str
        Time limit per task, in SLURM's format (``30``, ``01:00:00``, ``1-00:00:00``).
    cpus : int
        CPUs per array task (the build's Numba threads).
    mem : str
        Memory per task, in SLURM's format (``4000`` MB, ``4G``).
    copy : bool
        HDF5: finalize into one self-contained file instead of a virtual dataset.
    submit : bool
        Submit both jobs with sbatch (the finalize job with ``afterok`` on the array).
    report : callable, optional
        Receives ``wrote <script>`` for each script once written, before any
        submission (default: logged at INFO level).

    Returns
    -------
    SlurmJobs
        The scripts and, when submitted, the job ids; its ``summary()`` is the line
        `factory slurm` prints last.

    Raises
    ------
    FactoryError
        A bad config or dataset name (``ConfigError``), ``shards`` below 1, a ``time``
        or ``mem`` SLURM would not take, no ``factory`` command for the jobs to run
        (nothing written for any of these); with ``submit``, no sbatch or a submission
        sbatch refused (the scripts are written by then).
    """
    from .config import load_config

    load_config(config).select(only)  # a bad config or dataset name is refused before anything is written
    build_script, finalize_script = write_scripts(
        sbatch_scripts(config, out, shards, fmt, only, partition, time, cpus, mem, copy), Path(out) / "slurm")
    for script in (build_script, finalize_script):
        (report or log.info)(f"wrote {script}")
    jobs = SlurmJobs(build_script, finalize_script, shards)
    if submit:
        jobs.array_job, jobs.finalize_job = _submit(build_script, finalize_script)
    return jobs
