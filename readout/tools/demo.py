"""``make demo``: the main job on the embedded default, on CPU.

1. Writes the synthetic shards (train, validation) under ``data/synthetic`` unless they are there.
2. Reports the shipped classifier's top-1 on the validation shards.
3. Trains a Readout Bottleneck with ``configs/demo.yaml`` and exports it to ``checkpoints/readout-demo``.
4. Explains held-out images (a seed no other step uses) with the exported readout: heatmap PNGs in
   ``runs/demo/heatmaps`` and the bounding-box ratio over them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from readout.backbones import load_classifier
from readout.bundle import load
from readout.data.shards import make_loader
from readout.data.synthetic import synthetic_batch, write_shards
from readout.data.transforms import eval_transform
from readout.logs import show_info
from readout.metrics import box_ratio
from readout.plotting import save_heatmap_png, save_heatmap_sheet
from readout.training.teacher import TeacherConfig
from readout.training.teacher import compute as compute_teacher

#: Seeds of the demo's data: training, validation and the held-out images are disjoint.
TRAIN_SEED, VAL_SEED, HELD_OUT_SEED = 10, 11, 4242


def ensure_shards(out: Path, n: int, seed: int, size: int) -> None:
    if (out / "manifest.json").is_file():
        return
    write_shards(out, n=n, size=size, seed=seed, shard_size=1000)


@torch.no_grad()
def classifier_accuracy(name: str, shards: Path, size: int) -> float:
    classifier = load_classifier(name)
    loader = make_loader(str(shards), "eval", 256, 0, transform=eval_transform(size, size))
    correct = total = 0
    for batch in loader:
        correct += int((classifier(batch["image"]).argmax(1) == batch["label"]).sum())
        total += len(batch["label"])
    return correct / total


def held_out_report(bundle: str, out: Path, n: int, size: int, pictures: int) -> dict[str, float]:
    attributor = load(bundle)
    batch = synthetic_batch(n, size, seed=HELD_OUT_SEED)
    explanation = attributor.explain(batch["image"], batch["label"])
    ratio, valid = box_ratio(explanation.heatmap, batch["box_mask"])
    out.mkdir(parents=True, exist_ok=True)
    titles = [f"readout, class {attributor.classifier.classes[int(label)]}" for label in batch["label"]]
    for i in range(pictures):
        save_heatmap_png(out / f"heldout-{i:02d}.png", batch["image"][i], explanation.heatmap[i], titles[i])
    # The first four, not selected: the README's picture.
    save_heatmap_sheet(out / "overview.png", batch["image"][:4], explanation.heatmap[:4], titles[:4])
    return {
        "box_ratio": float(ratio[valid].mean()),
        "images": int(valid.sum()),
        "bits_per_image": float(explanation.total_bits.mean()),
        "probability_bottleneck": float(explanation.probability_bottleneck.mean()),
    }


def main(argv: list[str] | None = None) -> None:
    show_info()
    parser = argparse.ArgumentParser(prog="python -m readout.tools.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--data", default="data/synthetic")
    parser.add_argument(
        "--classifier",
        default="synthetic-cnn",
        help="the classifier to explain (a saved one trained on the synthetic set: its path)",
    )
    parser.add_argument("--train-samples", type=int, default=12000)
    parser.add_argument(
        "--teacher",
        default=None,
        help="Per-Sample maps of the training images for distillation (--model.distill_weight): the file "
        "is made from the training shards with python -m readout.tools.teacher when it is not there yet",
    )
    parser.add_argument("--teacher-layer", default="block2", help="the Per-Sample layer of --teacher")
    parser.add_argument("--held-out", type=int, default=64)
    parser.add_argument("--out", default="runs/demo/heatmaps")
    parser.add_argument("--bundle", default="checkpoints/readout-demo")
    parser.add_argument(
        "overrides", nargs="*", help="extra readout.fit arguments, e.g. --trainer.max_epochs=1"
    )
    args = parser.parse_args(argv)
    size = load_classifier(args.classifier).input_size
    started = time.perf_counter()
    data = Path(args.data)
    ensure_shards(data / "train", args.train_samples, TRAIN_SEED, size)
    ensure_shards(data / "val", 1000, VAL_SEED, size)
    print(f"synthetic shards in {data} ({time.perf_counter() - started:.0f} s)")
    accuracy = classifier_accuracy(args.classifier, data / "val", size)
    print(f"{args.classifier}: top-1 {accuracy:.3f} on {data / 'val'}")

    teacher = []
    if args.teacher is not None:
        if not Path(args.teacher).is_file():
            made = TeacherConfig(
                shards=str(data / "train"),
                layer=args.teacher_layer,
                out=args.teacher,
                classifier=args.classifier,
            )
            compute_teacher(made)
            print(f"teacher maps in {args.teacher} ({(time.perf_counter() - started) / 60:.1f} min so far)")
        teacher = ["--data.teacher", args.teacher]

    from readout.training.fit import main as fit  # Lightning is imported only when training

    fit(
        [
            "--config",
            args.config,
            "--export_dir",
            args.bundle,
            "--model.classifier",
            args.classifier,
            *teacher,
            *args.overrides,
        ]
    )
    report = held_out_report(args.bundle, Path(args.out), args.held_out, size, pictures=8)
    report["minutes"] = (time.perf_counter() - started) / 60
    Path(args.out, "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"readout on {report['images']} held-out images: box ratio {report['box_ratio']:.3f}, "
        f"{report['bits_per_image']:.1f} bits per image; heatmaps in {args.out}; "
        f"{report['minutes']:.1f} min in all. TensorBoard: tensorboard --logdir {run_dir(args.overrides)}"
    )


def run_dir(overrides: list[str]) -> str:
    """Where the fit wrote its logs: the last ``--run_dir`` among the overrides, else the config's."""
    chosen = "runs/demo"
    for index, value in enumerate(overrides):
        if value.startswith("--run_dir="):
            chosen = value.split("=", 1)[1]
        elif value == "--run_dir" and index + 1 < len(overrides):
            chosen = overrides[index + 1]
    return chosen


if __name__ == "__main__":
    main()
