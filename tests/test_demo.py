"""``make demo``'s last step: the held-out report of the exported readout, its numbers and pictures."""

from pathlib import Path

from PIL import Image

from readout.tools.demo import held_out_report

BUNDLE = Path(__file__).parents[1] / "checkpoints" / "readout-demo"


def test_held_out_report_scores_the_bundle_and_draws_the_readme_picture(tmp_path):
    report = held_out_report(str(BUNDLE), tmp_path, n=8, size=64, pictures=2)
    assert report["images"] == 8 and 0.0 <= report["box_ratio"] <= 1.0
    assert report["bits_per_image"] > 0 and 0.0 <= report["probability_bottleneck"] <= 1.0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "heldout-00.png",
        "heldout-01.png",
        "overview.png",
    ]
    single, sheet = Image.open(tmp_path / "heldout-00.png"), Image.open(tmp_path / "overview.png")
    assert sheet.width == 2 * single.width and sheet.height == 2 * single.height  # four pairs, two a row


def test_the_tensorboard_hint_follows_a_run_dir_override():
    from readout.tools.demo import run_dir

    assert run_dir([]) == "runs/demo"
    assert run_dir(["--run_dir=runs/r18/fit", "--model.beta=3"]) == "runs/r18/fit"
    assert run_dir(["--run_dir", "runs/x", "--run_dir=runs/y"]) == "runs/y"
