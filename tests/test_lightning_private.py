"""The private Lightning names readout relies on, each checked by name: a Lightning release that moves
one fails here, loudly, instead of breaking a cluster run silently. pyproject pins the range
(pytorch-lightning < 2.7) in which these hold; widen it only with this file passing.

- ``Trainer._accelerator_connector.cluster_environment``: readout.training.faults.Preemption turns the SLURM
  environment's ``auto_requeue`` off there, so that Lightning installs no SLURM handler of its own.
- ``lightning_fabric...subprocess_script._ChildProcessObserver._terminate_all`` and its
  ``_child_processes``: readout.training.faults.explain_observer_kills wraps it to say why the job ends.
- ``DDPStrategy._timeout``: named in readout.training.faults.peer_failure_message.
- ``lightning_fabric.utilities.types._Stateful``: the protocol that makes Lightning treat
  readout.data.resume.TrainLoader as resumable (no warning on every resume).
"""

from __future__ import annotations

import inspect
from datetime import timedelta

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from lightning_fabric.strategies.launchers import subprocess_script
from lightning_fabric.utilities.types import _Stateful
from pytorch_lightning.strategies import DDPStrategy

from readout.data.resume import TrainLoader


def test_the_trainer_exposes_its_cluster_environment_where_preemption_reads_it(monkeypatch):
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "readout", "SLURM_JOB_ID": "1"}.items():
        monkeypatch.setenv(key, value)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    environment = trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue is True
    assert hasattr(environment, "requeue_signal")


def test_the_child_process_observer_still_has_what_explain_observer_kills_wraps():
    observer = subprocess_script._ChildProcessObserver
    assert callable(observer._terminate_all)
    assert "_child_processes" in inspect.getsource(observer.__init__)


def test_ddp_keeps_its_timeout_where_the_peer_failure_message_reads_it():
    assert DDPStrategy(timeout=timedelta(seconds=7))._timeout == timedelta(seconds=7)


def test_the_train_loader_is_stateful_for_lightning():
    assert isinstance(TrainLoader([1, 2]), _Stateful)
