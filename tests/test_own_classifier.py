"""A classifier of the user's own, defined in a file outside the package, through every entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import readout
from readout.data.synthetic import write_shards

#: A model fx cannot trace (control flow on a value): the readout takes the hook path.
MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, num_classes=6):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.stage1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
            self.stage2 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
            self.head = nn.Linear(32, num_classes)

        def forward(self, x):
            x = self.stage1(self.stem(x))
            if x.mean() > -1e9:
                x = self.stage2(x)
            return self.head(x.mean((2, 3)))


    def build(num_classes=6):
        torch.manual_seed(0)
        return Net(num_classes)
    """
)


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """``my_models.py`` and its weights in a folder of their own, outside the checkout."""
    root = tmp_path / "user"
    root.mkdir()
    (root / "my_models.py").write_text(MODULE)
    sys.path.insert(0, str(root))
    try:
        import my_models  # noqa: PLC0415 (the file is written above)

        torch.save(my_models.build().state_dict(), root / "weights.pt")
        yield root
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("my_models", None)


def test_readout_fit_trains_a_readout_for_a_model_named_by_import_path(package: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    write_shards(shards, n=16, size=32, seed=3, shard_size=8)
    config = {
        "seed_everything": 0,
        "model": {
            "classifier": "my_models:build",
            "classifier_kwargs": {"num_classes": 6},
            "weights_path": str(package / "weights.pt"),
            "input_size": 32,
            "normalisation": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
            "classes": 6,
            "beta": 1.0,
            "lr": 1e-3,
            "estimate_samples": 8,
            "heatmap_every_n_steps": 0,
        },
        "data": {
            "train_shards": str(shards),
            "batch_size": 4,
            "num_workers": 0,
            "image_size": 32,
            "resize": 32,
            "batches_per_epoch": 2,
            "pin_memory": False,
        },  # fmt: skip
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 2,
            "logger": False,
            "callbacks": [],
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path / "run"),
        },  # fmt: skip
        "export_dir": str(tmp_path / "bundle"),
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "readout.fit", "--config", str(tmp_path / "config.yaml")],
        cwd=package, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "forward hook" in result.stderr  # the model is not traceable: logged once
    recorded = json.loads((tmp_path / "bundle" / "readout.json").read_text())
    assert recorded["classifier"]["source"] == {"import": "my_models:build", "kwargs": {"num_classes": 6}}
    assert recorded["layer"] == "stage1" and recorded["taps"] == ["stage1", "stage2", "logits"]

    import my_models  # noqa: PLC0415

    model = my_models.build()
    model.load_state_dict(torch.load(package / "weights.pt", weights_only=True))
    with pytest.raises(ValueError, match="names the import path 'my_models:build'.*never imports"):
        readout.load(tmp_path / "bundle")
    for attributor in (
        readout.load(tmp_path / "bundle", classifier=model),
        readout.load(tmp_path / "bundle", allow_import=True),
    ):
        heatmaps = attributor(torch.rand(2, 3, 32, 32))
        assert heatmaps.shape == (2, 32, 32) and bool(torch.isfinite(heatmaps).all())
        assert not attributor.split.traced


def test_the_readme_code_for_your_own_classifier_runs() -> None:
    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text[text.index("## Your own classifier") :]
    start = section.index("```python\n") + len("```python\n")
    code = section[start : section.index("```", start)]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (the project's own README)
    assert namespace["heatmaps"].shape == (2, 64, 64) and namespace["relevance"].shape == (2, 64, 64)
    assert namespace["per_sample"].split.traced


def test_explain_takes_a_torchvision_name_and_estimates_from_a_folder_of_images(tmp_path: Path) -> None:
    from PIL import Image

    from readout.explain import main as explain

    folder = tmp_path / "train"
    folder.mkdir()
    for i in range(6):
        pixels = (torch.rand(40, 48, 3) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    argv = ["--classifier", "resnet18", "--weights", "none", "--classes", "6", "--input-size", "32",
            "--estimate-images", str(folder / "*.png"), "--estimate-samples", "7", "--steps", "2",
            "--copies", "2", "--images", str(folder / "0.png"), "--out", str(tmp_path / "out"),
            "--cache", str(tmp_path / "cache"), "--device", "cpu"]  # fmt: skip
    assert explain(argv) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert list(summary["images"]) == ["0"] and (tmp_path / "out" / "0.npy").is_file()
    assert len(list((tmp_path / "cache").iterdir())) == 1  # μ/σ cached for the next run


def test_a_bundle_cannot_smuggle_an_import_path_in_its_classifier_name(tmp_path: Path) -> None:
    import shutil

    from readout.resources import shipped

    bundle = tmp_path / "bundle"
    shutil.copytree(shipped("readout-demo"), bundle)
    config = json.loads((bundle / "readout.json").read_text())
    config["classifier"]["name"] = "os:system"  # the source still says builtin
    (bundle / "readout.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="names the import path 'os:system'.*never imports"):
        readout.load(bundle)


def test_export_of_a_checkpoint_naming_an_import_path_needs_allow_import(tmp_path: Path) -> None:
    from readout.training.export import export_checkpoint

    path = tmp_path / "foreign.ckpt"
    torch.save({"hyper_parameters": {"classifier": "os:system"}, "state_dict": {}}, path)
    with pytest.raises(ValueError, match=r"foreign\.ckpt names the import path 'os:system'.*never imports"):
        export_checkpoint(str(path), str(tmp_path / "bundle"))
