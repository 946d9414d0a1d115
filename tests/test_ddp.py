"""DDP equals one process, and readout.fit runs on two CPU processes (gloo).

The equality test trains the readout for 4 steps with a global batch of 8: in this process on one
device, and in a subprocess on two with 4 images each. Both see the same 8 images per step (a fixed
list dealt out in order), draw the same noise per image (it is keyed by the image, not the rank), and
estimate μ/σ on the same images (each rank on half the shards, summed over ranks), so their loss
curves and readout weights agree up to float rounding.

Run as a script (``python tests/test_ddp.py OUT SHARDS``) this file is the two-process side: Lightning's
DDP launcher starts rank 1 by running the same command again.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from helpers import REPO, ddp_env, resnet50_args, tiny_config, write_config
from pytorch_lightning.strategies import DDPStrategy
from torch.utils.data import DataLoader, DistributedSampler

from readout.data.shards import make_loader
from readout.data.synthetic import write_shards
from readout.data.transforms import eval_transform
from readout.training.datamodule import ReadoutDataModule
from readout.training.module import ReadoutModule

STEPS, GLOBAL_BATCH, SAMPLES = 4, 8, 16


class OrderedListData(ReadoutDataModule):
    """The shards' samples as a list, read in order and dealt out to ranks without shuffling (rank r
    gets samples r, r + W, ...), so a step's global batch is the same for any number of processes.
    Lightning's automatic DistributedSampler would shuffle a training set."""

    def setup(self, stage: str) -> None:
        loader = make_loader(
            self.train_shards, "eval", 1, 0, transform=eval_transform(64, 64), rank=0, world_size=1
        )
        self.samples = [{k: v[0] for k, v in batch.items()} for batch in loader]

    def train_dataloader(self) -> DataLoader:
        sampler = DistributedSampler(self.samples, shuffle=False) if dist.is_initialized() else None
        return DataLoader(self.samples, batch_size=self.batch_size, sampler=sampler)


class GlobalLoss(pl.Callback):
    """The loss of each step averaged over the ranks: the loss of the global batch."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, *args: Any) -> None:
        self.losses.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))


def train(devices: int, shards: Path) -> tuple[ReadoutModule, pl.Trainer, list[float]]:
    pl.seed_everything(0)
    module = ReadoutModule(
        classifier="synthetic-cnn",
        weights=None,
        beta=1.0,
        lr=1e-3,
        estimate_samples=SAMPLES,
        heatmap_every_n_steps=0,
    )
    data = OrderedListData(
        shards, batch_size=GLOBAL_BATCH // devices, num_workers=0, image_size=64, resize=64
    )
    losses = GlobalLoss()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=DDPStrategy(broadcast_buffers=False) if devices > 1 else "auto",
        max_steps=STEPS,
        callbacks=[losses],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    return module, trainer, losses.losses


@pytest.fixture(scope="module")
def shards4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 shards of 4: each of two ranks estimates μ/σ on two whole shards."""
    out = tmp_path_factory.mktemp("ddp") / "shards"
    write_shards(out, n=SAMPLES, size=64, seed=1, shard_size=4)
    return out


@pytest.mark.ddp
def test_two_processes_train_the_readout_one_process_does(shards4, tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    out = tmp_path / "ddp.pt"
    result = subprocess.run(
        [sys.executable, __file__, str(out), str(shards4)],
        env=ddp_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = torch.load(out)

    module, trainer, losses = train(1, shards4)
    assert trainer.global_step == ddp["global_step"] == STEPS
    assert ddp["statistics_count"] == module.attributor.statistics.count.item() == SAMPLES
    torch.testing.assert_close(torch.tensor(ddp["losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    for key, value in module.attributor.net.state_dict().items():
        torch.testing.assert_close(ddp["weights"][key], value, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.ddp
def test_fit_runs_on_two_processes(shards4, tmp_path):
    """python -m readout.fit --trainer.devices 2 --trainer.strategy ddp: the launch path on CPU."""
    config = write_config(tmp_path / "tiny.yaml", tiny_config(shards4, max_steps=2))
    run = tmp_path / "run"
    command = ["--config", str(config), "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    result = subprocess.run(
        [sys.executable, "-m", "readout.fit", *command, "--run_dir", str(run)],
        env=ddp_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 2
    count = next(v for k, v in checkpoint["state_dict"].items() if k.endswith("statistics.count"))
    assert count.item() == 8  # estimate_samples, summed over the two ranks
    assert (run / "export" / "readout.json").is_file()


@pytest.mark.ddp
@pytest.mark.slow
def test_resnet50_config_trains_on_two_processes(tmp_path):
    """configs/resnet50.yaml (its DDPStrategy) at 224 px, random weights, 1 step of 1 image per rank."""
    write_shards(tmp_path / "shards", n=2, size=224, seed=0, shard_size=1)
    args = resnet50_args(tmp_path / "shards", tmp_path / "run", devices=2)
    result = subprocess.run(
        [sys.executable, "-m", "readout.fit", *args],
        env=ddp_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "export" / "readout.json").is_file()


if __name__ == "__main__":
    module, trainer, losses = train(2, Path(sys.argv[2]))
    if trainer.is_global_zero:
        weights = {k: v.detach().clone() for k, v in module.attributor.net.state_dict().items()}
        torch.save(
            {
                "global_step": trainer.global_step,
                "statistics_count": module.attributor.statistics.count.item(),
                "weights": weights,
                "losses": losses,
            },
            sys.argv[1],
        )
