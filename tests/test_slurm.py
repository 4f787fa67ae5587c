"""A real single-node SLURM cluster on localhost runs what `factory slurm` writes.

The fixture starts munged, slurmctld and slurmd from Debian's packages (installed by
.ci/run in CI), submits the array and finalize jobs, and compares the finalized store
with a single-process build, bit for bit.  Without root or the packages the test is
skipped, unless FACTORY_REQUIRE_SLURM=1 (CI) makes that a failure.
"""

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import assert_same_arrays, run_cli, run_cli_process

pytestmark = pytest.mark.slurm

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(name):
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")


def _wait(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    require = os.environ.get("FACTORY_REQUIRE_SLURM") == "1"

    def unavailable(why):
        if require:
            pytest.fail(f"SLURM required but {why}")
        pytest.skip(why)

    missing = [b for b in BINARIES if not _which(b)]
    if missing:
        unavailable(f"not installed: {', '.join(missing)} (apt-get install slurmctld slurmd slurm-client munge)")
    if os.geteuid() != 0:
        unavailable("the single-node cluster needs root")

    root = tmp_path_factory.mktemp("slurm")
    started: list[subprocess.Popen] = []
    env = dict(os.environ, SLURM_CONF=str(root / "slurm.conf"))

    # munge: reuse a running daemon, else start one in the foreground as the munge user.
    sock = Path("/run/munge/munge.socket.2")
    if not sock.exists():
        munge = pwd.getpwnam("munge")
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        os.chown("/run/munge", munge.pw_uid, munge.pw_gid)
        if not Path("/etc/munge/munge.key").exists():
            subprocess.run([_which("mungekey") or "/usr/sbin/mungekey", "--create"], check=True)
            os.chown("/etc/munge/munge.key", munge.pw_uid, munge.pw_gid)
        started.append(subprocess.Popen(["runuser", "-u", "munge", "--", _which("munged"), "--foreground"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait(sock.exists, 20, "munged")

    host = socket.gethostname()
    node = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    node = " ".join(f for f in node.split() if not f.startswith("UpTime"))
    for d in ("state", "spool", "logs"):
        (root / d).mkdir()
    (root / "slurm.conf").write_text(f"""
ClusterName=factorytest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/logs/slurmctld.log
SlurmdLogFile={root}/logs/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=batch_sched_delay=0
DependencyParameters=kill_invalid_depend
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
{node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    started.append(subprocess.Popen([_which("slurmctld"), "-D", "-i"], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    started.append(subprocess.Popen([_which("slurmd"), "-D", "-N", node.split()[0].split("=")[1]], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def idle():
        r = subprocess.run([_which("sinfo"), "-h", "-o", "%T"], env=env, capture_output=True, text=True)
        return r.returncode == 0 and r.stdout.strip() == "idle"

    try:
        _wait(idle, 60, "the node to become idle")
    except TimeoutError:
        logs = "\n".join(p.read_text()[-2000:] for p in (root / "logs").glob("*.log"))
        for p in started:
            p.terminate()
        pytest.fail(f"SLURM did not start:\n{logs}")
    try:
        yield env
    finally:
        # Job processes outlive slurmd: cancel the jobs first, then stop what we started.
        subprocess.run([_which("scancel"), "--full", "-u", "root"], env=env, capture_output=True)
        time.sleep(0.5)
        for p in reversed(started):
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


def _job_state(env, job: str) -> str:
    r = subprocess.run([_which("scontrol"), "show", "job", job], env=env, capture_output=True, text=True)
    states = {f.split("=")[1] for f in r.stdout.split() if f.startswith("JobState=")}
    if not states:
        return "GONE"
    for s in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
        if s in states:
            return s
    if states == {"COMPLETED"}:
        return "COMPLETED"
    return "RUNNING"


def test_array_job_and_finalize_match_a_single_process_build(slurm, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"seed": 4, "defaults": {"output": {"chunk_images": 64}},
                                   "datasets": {"a": {"n_images": 1000}, "b": {"n_images": 200}}}))
    ref = tmp_path / "ref"
    assert run_cli("build", cfg, "--out", ref, "-q").returncode == 0
    out = tmp_path / "cluster"
    # Submitted as a user submits: a `factory` process with the cluster's environment.
    r = run_cli_process("slurm", cfg, "--shards", "4", "--out", out, "--cpus", "1", "--mem", "1G",
                        "--time", "00:10:00", "--submit", env=slurm)
    assert r.returncode == 0, r.stderr
    import re

    array, fin = re.search(r"array job (\d+) .* finalize job (\d+)", r.stdout).groups()
    # Bounded wait for both jobs to finish.
    _wait(lambda: _job_state(slurm, fin) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "GONE"), 300,
          "the finalize job")
    logs = "\n".join(p.read_text()[-1500:] for p in (out / "slurm-logs").glob("*.err"))
    assert _job_state(slurm, array) == "COMPLETED", logs
    assert _job_state(slurm, fin) == "COMPLETED", logs
    assert sorted(p.name for p in (out / "slurm-logs").glob("build_*.out")) == \
        [f"build_{array}_{i}.out" for i in range(4)]
    for name in ("a", "b"):
        assert_same_arrays(ref / f"{name}.h5", out / f"{name}.h5")
    assert run_cli("verify", out).returncode == 0
