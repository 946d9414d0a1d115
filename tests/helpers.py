"""Helpers of several test modules that are not fixtures (the fixtures: conftest.py); no test module
imports another.

A run of readout.fit on ``tiny_config``: a random-init synthetic-cnn on 64-px shards that takes a few
seconds; its environment outside SLURM, on two processes and under the fake SLURM of tests/fake_slurm;
callbacks that a run's config names by ``helpers.<class>``; a random classifier for relevance.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from readout.backbones import load_classifier
from readout.classifier import Classifier
from readout.training.faults import Preemption
from readout.training.fit import main as fit

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "train_readout.sh"
FAKE_SLURM = REPO / "tests" / "fake_slurm"
JOB_ID = "4242"


# ------------------------------------------------------------------------------------------------------
# Runs of readout.fit


def tiny_config(shards: Path, **trainer: object) -> dict:
    """A readout.fit config for a few-second CPU run; its paths lie under runs/tiny, relative."""
    return {
        "seed_everything": 0,
        "model": {
            "classifier": "synthetic-cnn",
            "weights": None,
            "beta": 1.0,
            "lr": 1e-3,
            "estimate_samples": 8,
            "heatmap_every_n_steps": 0,
        },
        "data": {
            "train_shards": str(shards),
            "batch_size": 4,
            "num_workers": 0,
            "image_size": 64,
            "resize": 64,
            "batches_per_epoch": 4,
            "shuffle_buffer": 8,
            "pin_memory": False,
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 6,
            "log_every_n_steps": 1,
            "enable_model_summary": False,
            "enable_progress_bar": False,
            "default_root_dir": "runs/tiny",
            "logger": {
                "class_path": "pytorch_lightning.loggers.CSVLogger",
                "init_args": {"save_dir": "runs/tiny", "name": "csv", "version": ""},
            },
            "callbacks": [
                {
                    "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": "runs/tiny/checkpoints",
                        "save_last": True,
                        "every_n_train_steps": 3,
                    },
                }
            ],
            **trainer,
        },
    }


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def fit_args(
    shards: Path,
    run: Path,
    every: int = 2,
    callbacks: list[dict] | None = None,
    checkpoint: dict | None = None,
    **trainer: object,
) -> list[str]:
    """``readout.fit`` on tiny_config (6 steps, 4 batches per epoch) with a checkpoint every ``every`` steps
    (more ModelCheckpoint arguments in ``checkpoint``), the run in ``run``; ``callbacks`` go first."""
    config = tiny_config(shards, **trainer)
    config["trainer"]["callbacks"][0]["init_args"].update(every_n_train_steps=every, **(checkpoint or {}))
    config["trainer"]["callbacks"][:0] = callbacks or []
    run.mkdir(parents=True, exist_ok=True)
    return ["--config", str(write_config(run.parent / f"{run.name}.yaml", config)), "--run_dir", str(run)]


def resnet50_args(shards: Path, run_dir: Path, devices: int = 1) -> list[str]:
    """configs/resnet50.yaml with random weights on ``shards``: one step of one image per process."""
    return [
        "--config", str(REPO / "configs" / "resnet50.yaml"),
        "--model.weights", "null",
        "--model.estimate_samples", str(devices),
        "--model.heatmap_every_n_steps", "0",
        "--data.train_shards", str(shards),
        "--data.val_shards", str(shards),
        "--data.batch_size", "1",
        "--data.num_workers", "0",
        "--data.batches_per_epoch", "1",
        "--data.pin_memory", "false",
        "--trainer.accelerator", "cpu",
        "--trainer.devices", str(devices),
        "--trainer.precision", "32-true",  # bf16 on a CPU without bf16 units: ~50x slower than fp32
        "--trainer.max_steps", "1",
        "--trainer.limit_val_batches", "0",
        "--trainer.val_check_interval", "null",
        "--trainer.enable_progress_bar", "false",
        "--run_dir", str(run_dir),
    ]  # fmt: skip


def assert_same_readout_weights(cli, reference) -> None:
    """The readout net of run ``cli`` equals that of run ``reference`` (to 1e-6, absolute)."""
    expected = reference.model.attributor.net.state_dict()
    for key, value in cli.model.attributor.net.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)


def fit_with_tensorboard(config: dict, tmp_path, monkeypatch) -> tuple[Any, EventAccumulator]:
    """Runs ``config`` through readout.fit outside SLURM with a TensorBoard logger; the CLI and the
    run's events, read back."""
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    config["trainer"]["logger"] = {
        "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs/tiny", "name": "tensorboard", "version": ""},
    }
    run = tmp_path / "run"
    cli = fit(["--config", str(write_config(tmp_path / "tb.yaml", config)), "--run_dir", str(run)])
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return cli, events


# ------------------------------------------------------------------------------------------------------
# Processes: outside SLURM, on two processes, the step's process tree


def clean_env() -> dict[str, str]:
    """os.environ without SLURM's variables: tests that are not about SLURM may run inside a job."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


def ddp_env() -> dict[str, str]:
    """No SLURM and no torchrun variables (Lightning then picks a free port), one thread per process."""
    env = clean_env()
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(key, None)
    env["OMP_NUM_THREADS"] = "1"
    return env


def step_processes(pid: int) -> list[int]:
    """``pid`` and its descendants (data loader workers): what SLURM signals, unlike the batch shell."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        parents[int(stat.parent.name)] = int(fields[1])
    found = [pid]
    for process in found:
        found += [child for child, parent in parents.items() if parent == process]
    return found


# ------------------------------------------------------------------------------------------------------
# slurm/train_readout.sh under the fake srun and scontrol of tests/fake_slurm


def slurm_env(run_dir: Path, config: Path, requeue_log: Path) -> dict[str, str]:
    """One task of job 4242 on one node, as srun would set it up."""
    env = clean_env()
    env.update(
        SLURM_JOB_ID=JOB_ID,
        SLURM_JOB_NAME="readout",  # 'bash' or 'interactive' would turn Lightning's SLURM mode off
        SLURM_NNODES="1",
        SLURM_NTASKS="1",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_NODEID="0",
        SLURM_NODELIST="localhost",
        SLURM_SUBMIT_DIR=str(REPO),
        CONFIG=str(config),
        RUN_DIR=str(run_dir),
        PYTHON=sys.executable,
        PATH=f"{FAKE_SLURM}{os.pathsep}{env['PATH']}",
        PYTHONPATH=str(FAKE_SLURM),  # the Probe callback
        FAKE_SCONTROL_LOG=str(requeue_log),
    )
    return env


def wait_for(path: Path, job: subprocess.Popen, log: Path, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        assert job.poll() is None, f"the job ended before {path.name} appeared:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)
    job.kill()
    raise AssertionError(f"no {path.name} after {timeout} s:\n{log.read_text()[-3000:]}")


# ------------------------------------------------------------------------------------------------------
# Callbacks that a run's config names by class_path (``helpers.SignalAt``); a run in a subprocess finds
# them with tests/ on its PYTHONPATH


class SignalAt(pl.Callback):
    """Sends ``signal_name`` to this process as step ``at`` starts: it arrives in the middle of a step."""

    def __init__(self, signal_name: str, at: int) -> None:
        self.signum, self.at, self.sent = getattr(signal, signal_name), at, False

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class HoldAt(pl.Callback):
    """At the start of step ``at`` on rank ``rank`` writes the process id to ``marker`` and waits for a
    signal to arrive."""

    def __init__(self, at: int, marker: str, rank: int = 0) -> None:
        self.at, self.marker, self.rank = at, Path(marker), rank

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step != self.at or trainer.global_rank != self.rank:
            return
        (preemption,) = [c for c in trainer.callbacks if isinstance(c, Preemption)]  # type: ignore[attr-defined]
        self.marker.write_text(str(os.getpid()))
        deadline = time.monotonic() + 120
        while preemption.received is None and time.monotonic() < deadline:
            time.sleep(0.02)


# ------------------------------------------------------------------------------------------------------
# Classifiers


def randomised_classifier(seed: int = 0, name: str = "synthetic-cnn") -> Classifier:
    """A random classifier whose batch norms are not the identity, so that merging them matters."""
    torch.manual_seed(seed)
    classifier = load_classifier(name, weights=None)
    for module in classifier.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.3, 0.3)
    return classifier
