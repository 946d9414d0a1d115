"""``python -m readout.tools.teacher``: Per-Sample maps of the training images, a readout's teacher.

    python -m readout.tools.teacher --classifier synthetic-cnn --shards data/synthetic/train \
        --layer block2 --out data/synthetic/train-teacher.safetensors

What the file holds and how a stopped run resumes: :mod:`readout.training.teacher`.
"""

from __future__ import annotations

import argparse

from readout.logs import show_info
from readout.training.teacher import TeacherConfig, compute


def main(argv: list[str] | None = None) -> None:
    show_info()
    parser = argparse.ArgumentParser(
        prog="python -m readout.tools.teacher", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--classifier", default="synthetic-cnn", help="a name or a saved classifier's path")
    parser.add_argument("--weights", default="IMAGENET1K_V1", help="torchvision weight entry")
    parser.add_argument("--weights-path", default=None, help="a local weights file instead of the hub cache")
    parser.add_argument("--shards", required=True, help="the training shards (as data.train_shards)")
    parser.add_argument("--layer", required=True, help="the Per-Sample layer (the readout's, usually)")
    parser.add_argument("--beta", type=float, default=10.0, help="β·k of the Per-Sample fit")
    parser.add_argument("--out", required=True, help="the teacher file (safetensors)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--estimate-samples", type=int, default=2000, help="training images for μ/σ")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fit's noise")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    print(f"teacher maps in {compute(TeacherConfig(**vars(args)))}")


if __name__ == "__main__":
    main()
