"""Pictures of heatmaps: written as PNGs without touching the caller's matplotlib state."""

from __future__ import annotations

import subprocess
import sys

import torch
from PIL import Image

from readout.plotting import save_heatmap_png, save_heatmap_sheet


def test_pictures_are_written_as_pngs_of_the_drawn_size(tmp_path):
    images, maps = torch.rand(3, 3, 32, 32), torch.rand(3, 32, 32)
    save_heatmap_png(tmp_path / "one.png", images[0], maps[0], "title")
    save_heatmap_sheet(tmp_path / "sheet.png", images, maps, ["a", "b", "c"], columns=2)
    assert Image.open(tmp_path / "one.png").size == (700, 320)  # figsize (7, 3.2) at 100 dpi
    assert Image.open(tmp_path / "sheet.png").size == (1400, 640)  # two pairs a row, two rows


def test_drawing_leaves_the_backend_and_pyplot_alone(tmp_path):
    """A notebook's backend stays as it was, and no figure is left open in pyplot."""
    script = f"""
import matplotlib
matplotlib.use("svg")
import matplotlib.pyplot as plt
import torch
from readout.plotting import save_heatmap_png
save_heatmap_png({str(tmp_path / "a.png")!r}, torch.rand(3, 16, 16), torch.rand(16, 16))
print(matplotlib.get_backend(), len(plt.get_fignums()))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["svg", "0"]
