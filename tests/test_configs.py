"""Every shipped training config runs through the CLI (litgpt's config hub test), on tiny data."""

from pathlib import Path

import pytest
import yaml

from readout.bundle import load
from readout.data.synthetic import write_shards
from readout.training.fit import main as fit

CONFIGS = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("config-shards")
    write_shards(root / "64", n=8, size=64, seed=5, shard_size=4)
    return root


def test_every_config_is_tested():
    assert {c.stem for c in CONFIGS} == {"custom", "demo", "resnet50", "synthetic-224", "vgg16"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_config_trains_and_exports_through_the_cli(config, shards, tmp_path):
    large = config.stem != "demo"
    data = str(shards / "64")
    overrides = [
        f"--data.train_shards={data}", f"--data.val_shards={data}", "--data.batch_size=2",
        "--data.num_workers=0", "--data.batches_per_epoch=2", "--data.pin_memory=false",
        "--model.estimate_samples=4", "--trainer.max_epochs=1", "--trainer.limit_val_batches=1",
        "--trainer.accelerator=cpu", "--trainer.devices=1", f"--trainer.default_root_dir={tmp_path}",
        f"--export_dir={tmp_path / 'export'}", "--trainer.logger=false", "--trainer.callbacks=[]",
        "--trainer.val_check_interval=1.0", "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    if yaml.safe_load(config.read_text())["data"].get("teacher"):
        # A distilled config's teacher file holds maps of its own training shards, not of these.
        overrides += ["--data.teacher=null", "--model.distill_weight=0"]
    if large:
        # Random weights, 64-px images and fp32: the paper's 224-px readout of resnet50 costs ~40 GFLOP
        # per image on this CPU; that size runs in the slow DDP tests. The 224-px synthetic-cnn is
        # fully convolutional and runs at 64 px as well.
        overrides += [
            "--model.weights=null",
            "--model.input_size=64",
            "--data.image_size=64",
            "--data.resize=64",
        ]
        overrides += ["--trainer.precision=32-true"]
    cli = fit(["--config", str(config), *overrides])
    assert cli.trainer.global_step == 2
    hparams = cli.model.hparams
    attributor = load(tmp_path / "export", classifier=cli.model.attributor.classifier)
    trained = cli.model.attributor
    assert attributor.layer == (hparams["layer"] or trained.layer) and attributor.taps == trained.taps
