"""A wheel ships readout's model files: installed away from the checkout, readout loads and explains."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
#: What the wheel is built from, copied so that the build leaves no build/ folder in the checkout.
SOURCES = ("pyproject.toml", "README.md", "readout", "checkpoints")
SHIPPED = {
    "__init__.py",
    "synthetic-cnn.safetensors",
    "synthetic-cnn.json",
    "synthetic-cnn-224.safetensors",
    "synthetic-cnn-224.json",
    "readout-demo/readout.json",
    "readout-demo/readout.safetensors",
    "readout-synthetic/readout.json",
    "readout-synthetic/readout.safetensors",
}

# Run by the venv's python with PYTHONPATH=<install dir> from an empty working directory.
EXPLAIN = """
import sys
from pathlib import Path

import torch

import readout
from readout.resources import DEMO_BUNDLE, checkpoint_dir, shipped

site = Path(sys.argv[1]).resolve()
assert site in Path(readout.__file__).resolve().parents, f"readout imported from {readout.__file__}"
assert site in checkpoint_dir().resolve().parents, f"shipped files looked up in {checkpoint_dir()}"
assert (site / "readout" / "py.typed").is_file()
classifier = readout.load_classifier("synthetic-cnn")
torch.manual_seed(0)
images = torch.rand(1, 3, 64, 64)
assert classifier(images).shape == (1, 6)
heatmap = readout.load(shipped(DEMO_BUNDLE))(images, target=None)
assert heatmap.shape == (1, 64, 64) and torch.isfinite(heatmap).all(), heatmap
"""


def pip(*args: str | Path) -> None:
    """Runs pip offline; its output is shown only when it fails."""
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *map(str, args), "--no-index"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        origin = ROOT / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, source / name)
    out = tmp_path_factory.mktemp("wheel")
    pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, source)
    (built,) = out.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def site(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    pip("install", "-q", "--no-deps", "--no-compile", "--target", target, wheel)
    return target


def test_wheel_holds_every_module_the_shipped_files_and_nothing_from_elsewhere(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "readout").rglob("*.py")}
    assert modules - names == set(), "add the missing subpackages to [tool.setuptools] packages"
    assert "readout/py.typed" in names
    prefix = "readout/checkpoints/"
    assert {name.removeprefix(prefix) for name in names if name.startswith(prefix)} == SHIPPED
    dist_info = "readout-" + wheel.name.split("-")[1] + ".dist-info/"
    assert {name for name in names if not name.startswith(("readout/", dist_info))} == set()


def test_installed_wheel_loads_the_shipped_classifier_and_bundle_and_explains(site, tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "READOUT_CHECKPOINTS"}
    env["PYTHONPATH"] = str(site)
    command = [sys.executable, "-c", EXPLAIN, str(site)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
