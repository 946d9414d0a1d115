"""``python -m readout.bench {per-sample,relevance,readout,ddp,data}``: speed ratios, side by side.

Each subcommand times two or more implementations on the same inputs, in the same process, warmed
up, alternating the order of repeats, and prints the throughputs and their ratio; absolute
numbers alone are never the result (CPU timings here are noisy, the ratio much less so).
``--device cuda`` where a GPU is present; peak GPU memory per image is printed there.

- ``per-sample``: batched, cached Per-Sample Bottleneck against the straightforward one; fp32 eager,
  bf16 autocast and compiled steps side by side.
- ``relevance``: Relevance-IBA's LRP pass in fp32 and in bf16 autocast, with its conservation.
- ``readout``: readout training step and heatmaps against the plain classifier's step and inference.
- ``ddp``: readout training on 1 process against N under DDP, as a scaling efficiency.
- ``data``: shards stored at full size against resized, loader worker counts, PIL against batched
  JPEG decode and train crops (on the GPU where one is present), and the loader against the readout
  training step it has to feed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from readout.logs import show_info
from readout.resources import checkpoint_dir
from readout.tools.bench.data import bench_data
from readout.tools.bench.per_sample import VARIANTS, bench_per_sample, bench_relevance
from readout.tools.bench.readout import bench_ddp, bench_readout


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m readout.bench`` (a test parses every command the docs give)."""
    parser = argparse.ArgumentParser(prog="python -m readout.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    commands = parser.add_subparsers(dest="command", required=True)
    per_sample = commands.add_parser("per-sample", help=bench_per_sample.__doc__)
    per_sample.add_argument("--classifiers", nargs="+", default=["synthetic-cnn", "resnet50"])
    per_sample.add_argument("--batch-sizes", nargs="+", type=int, default=[8])
    per_sample.add_argument("--steps", type=int, default=10)
    per_sample.add_argument("--copies", type=int, default=10)
    per_sample.add_argument(
        "--variants",
        nargs="*",
        choices=sorted(VARIANTS),
        help="rows beyond fp32 eager (default: compiled, and the bf16 ones where the device has native "
        "bf16: emulated bf16 is many times slower than fp32; none: --variants with no value)",
    )
    per_sample.set_defaults(run=bench_per_sample)
    relevance = commands.add_parser("relevance", help=bench_relevance.__doc__)
    relevance.add_argument("--bundle", default=str(checkpoint_dir() / "readout-demo"))
    relevance.add_argument("--images", type=int, default=8)
    relevance.set_defaults(run=bench_relevance)
    readout = commands.add_parser("readout", help=bench_readout.__doc__)
    readout.add_argument("--classifiers", nargs="+", default=["synthetic-cnn", "resnet50"])
    readout.add_argument("--batch", type=int, default=16)
    readout.add_argument("--bf16", action="store_true", help="also time bf16 autocast")
    readout.add_argument("--compile", action="store_true", help="also time torch.compile of the suffix")
    readout.add_argument("--channels-last", action="store_true")
    readout.add_argument(
        "--hidden",
        nargs="*",
        type=int,
        default=[],
        help="also time readout nets of these first hidden widths",
    )
    readout.set_defaults(run=bench_readout)
    ddp = commands.add_parser("ddp", help="readout training images/s, 1 process against N under DDP")
    ddp.add_argument("--classifier", default="synthetic-cnn")
    ddp.add_argument("--processes", type=int, default=2)
    ddp.add_argument("--threads", type=int, default=1, help="torch threads in each process")
    ddp.add_argument("--batch", type=int, default=16, help="images per process and step")
    ddp.add_argument("--steps", type=int, default=10, help="training steps per timed window")
    ddp.set_defaults(run=bench_ddp)
    data = commands.add_parser("data", help="images/s through decode and the training transform")
    data.add_argument(
        "--shards", help="shards for the worker counts (default: the full-size ones written here)"
    )
    data.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    data.add_argument("--batch", type=int, default=64)
    data.add_argument("--batches", type=int, default=10, help="batches per timed pass")
    data.add_argument("--size", type=int, default=224)
    data.add_argument("--images", type=int, default=64, help="JPEGs written for the stored-size comparison")
    data.add_argument("--full-size", type=int, default=512, help="side of the full-size stand-in, px")
    data.add_argument(
        "--resize-shorter", type=int, default=256, help="shorter side of the resized shards, px"
    )
    data.add_argument(
        "--classifier", default="resnet50", help="whose readout training step the loader must feed"
    )
    data.add_argument("--bf16", action="store_true", help="time that step under bf16 autocast")
    data.add_argument("--channels-last", action="store_true", help="time that step in channels_last")
    data.set_defaults(run=bench_data)
    return parser


def main(argv: list[str] | None = None) -> None:
    show_info()
    args = build_parser().parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    device = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"readout.bench {args.command} on {device}, {started}, torch {torch.__version__}")
    results = args.run(args)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"device": device, "date": started, "results": results}, indent=2)
        )
