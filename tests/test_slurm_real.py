"""slurm/train_readout.sh under a real SLURM: a single-node cluster started on this machine from Debian's
packages (slurmctld, slurmd, munge; ``proctrack/linuxproc``, ``task/none``, all state under a temporary
folder), jobs submitted with ``sbatch`` on CPU (``--gres=none``).

Each job is held in one phase (the μ/σ estimate, a training step, validation) and preempted there with
``scancel -s USR1``, as SLURM's ``--signal`` does near the time limit: it must save, ``scontrol requeue``
itself, come back with the same id and end with the weights of a job that was never signalled.

Slow (minutes: each requeue waits for slurmctld to start the job again) and root only (the daemons
run as root). ``make test-slurm`` installs the packages where they are missing and runs it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, clean_env, tiny_config, write_config
from safetensors.torch import load_file

from readout.data.synthetic import write_shards

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

SCRIPT = REPO / "slurm" / "train_readout.sh"
FAKE_SLURM = REPO / "tests" / "fake_slurm"  # for the hold.HoldIn callback only: srun is the real one
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scancel", "scontrol")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, check, timeout: float, log: Path | None = None):  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise AssertionError(f"{what}: not after {timeout} s\n{tail}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """A running single-node cluster; yields the environment that its commands need (SLURM_CONF)."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing): `make test-slurm` installs it")
    if os.geteuid() != 0:
        pytest.skip("the single-node SLURM of this test runs its daemons as root")
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir()
    (root / "munge").chmod(0o700)
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    sock = root / "munge" / "munge.socket"
    sbin = lambda name: shutil.which(name) or f"/usr/sbin/{name}"  # noqa: E731
    subprocess.run(
        [sbin("munged"), "--force", f"--key-file={key}", f"--socket={sock}", f"--pid-file={root}/munge/pid",
         f"--log-file={root}/log/munged.log", f"--seed-file={root}/munge/seed"],
        check=True,
    )  # fmt: skip
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=readout-test",
                f"SlurmctldHost={host}",
                "SlurmUser=root",
                "SlurmdUser=root",
                f"SlurmctldPort={free_port()}",
                f"SlurmdPort={free_port()}",
                "AuthType=auth/munge",
                f"AuthInfo=socket={sock}",
                "CredType=cred/munge",
                f"StateSaveLocation={root}/state",
                f"SlurmdSpoolDir={root}/spool",
                f"SlurmctldPidFile={root}/slurmctld.pid",
                f"SlurmdPidFile={root}/slurmd.pid",
                f"SlurmctldLogFile={root}/log/slurmctld.log",
                f"SlurmdLogFile={root}/log/slurmd.log",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "MpiDefault=none",
                "SchedulerType=sched/builtin",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core_Memory",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "ReturnToService=2",
                "KillWait=10",
                "JobRequeue=1",
                "MinJobAge=3600",
                f"NodeName={host} CPUs={os.cpu_count()} RealMemory=8000 State=UNKNOWN",
                "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    env = {**clean_env(), "SLURM_CONF": str(conf)}
    subprocess.run([sbin("slurmctld"), "-f", str(conf)], env=env, check=True)
    subprocess.run([sbin("slurmd"), "-f", str(conf)], env=env, check=True)
    try:
        wait_until(
            "the node is idle",
            lambda: (
                "idle"
                in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout
            ),  # fmt: skip
            60,
            root / "log" / "slurmctld.log",
        )
        yield env, root
    finally:
        for pid_file in ("slurmd.pid", "slurmctld.pid", "munge/pid"):
            path = root / pid_file
            if path.exists():
                try:
                    os.kill(int(path.read_text().split()[0]), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "train"
    write_shards(out, n=16, size=64, seed=0, shard_size=8)
    return out


def submit(cluster, shards: Path, directory: Path, phase: str | None) -> str:
    """``sbatch slurm/train_readout.sh`` on CPU for a 6-step run with validation every 2 steps, held in
    ``phase`` (hold.HoldIn) unless it is None; the job's id."""
    env, _ = cluster
    directory.mkdir()
    config = tiny_config(shards)
    config["model"]["estimate_samples"] = 8  # two batches of 4: the hold in the estimate is between them
    config["data"]["val_shards"] = str(shards)
    config["trainer"].update(val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0)
    config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 2
    if phase is not None:
        config["trainer"]["callbacks"].append(
            {"class_path": "hold.HoldIn", "init_args": {"phase": phase, "marker": str(directory / "held")}}
        )
    job_env = {
        **env,
        "CONFIG": str(write_config(directory / "job.yaml", config)),
        "RUN_DIR": str(directory / "run"),
        "PYTHON": sys.executable,
        "PYTHONPATH": str(FAKE_SLURM),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        ["sbatch", "--parsable", "--gres=none", "--ntasks-per-node=1", "--cpus-per-task=1",
         "--mem-per-cpu=2G", f"--output={directory}/job.out", "--chdir", str(REPO), str(SCRIPT),
         "--trainer.accelerator", "cpu"],
        env=job_env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return result.stdout.strip().split(";")[0]


def job_state(cluster, job: str) -> dict[str, str]:
    env, _ = cluster
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True
    ).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def finished(cluster, job: str, directory: Path, timeout: float = 900) -> dict[str, str]:
    def done() -> dict[str, str] | None:
        state = job_state(cluster, job)
        return state if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") else None

    return wait_until(f"job {job} finished", done, timeout, directory / "job.out")


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "run" / "export" / "readout.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(cluster, shards, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("uninterrupted") / "job"
    job = submit(cluster, shards, directory, None)
    state = finished(cluster, job, directory)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "0", (directory / "job.out").read_text()
    return directory


@pytest.mark.parametrize("phase", ["estimate", "train", "validation"])
def test_scancel_usr1_in_each_phase_requeues_and_the_job_ends_as_an_uninterrupted_one(
    phase, cluster, shards, uninterrupted, tmp_path
):
    env, _ = cluster
    directory = tmp_path / "job"
    job = submit(cluster, shards, directory, phase)
    wait_until(
        f"job {job} held in the {phase} phase", (directory / "held").exists, 600, directory / "job.out"
    )
    subprocess.run(["scancel", "-s", "USR1", job], env=env, check=True)
    state = finished(cluster, job, directory)
    out = (directory / "job.out").read_text()
    assert state["JobState"] == "COMPLETED", out[-4000:]
    assert state["Restarts"] == "1", out[-4000:]  # requeued once, by readout.fit itself
    assert "requeued SLURM job" in out, out[-4000:]
    if phase == "estimate":
        assert "continuing the μ/σ estimate after 4 of 8 samples" in out, out[-4000:]
    else:
        assert "Restoring states from the checkpoint path at" in out and "hpc_ckpt_1.ckpt" in out, out[-4000:]
    expected, got = weights(uninterrupted), weights(directory)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
