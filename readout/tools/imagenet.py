"""``python -m readout.tools.imagenet --root DIR --split train|val --out DIR``: ImageNet to shards.

The layout read, the labels and boxes, and how a rerun resumes: :mod:`readout.data.imagenet`.
"""

from __future__ import annotations

import argparse

from readout.data.imagenet import ConvertOptions, convert


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m readout.tools.imagenet", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--root", required=True, help="ILSVRC2012 root holding train/ and val/")
    parser.add_argument("--split", required=True, choices=["train", "val"])
    parser.add_argument("--out", required=True, help="directory for the shards and manifest.json")
    parser.add_argument(
        "--resize-shorter", type=int, default=None, help="store images with this shorter side (px)"
    )
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    parser.add_argument("--max-shard-bytes", type=float, default=5e8, help="source bytes per shard at most")
    parser.add_argument("--max-shard-count", type=int, default=10000, help="images per shard at most")
    parser.add_argument("--boxes", default=None, help="directory of PASCAL VOC box XMLs")
    parser.add_argument("--val-labels", default=None, help="label file of a flat val folder (csv or txt)")
    parser.add_argument(
        "--synsets", default=None, help="wnids (first token per line) that integer labels index"
    )
    parser.add_argument(
        "--label-base", type=int, default=0, help="the integer label of the first synset (devkit: 1)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the file-to-shard plan")
    parser.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel")
    args = parser.parse_args(argv)
    options = ConvertOptions(args.resize_shorter, args.quality, args.boxes)
    manifest = convert(
        args.root,
        args.split,
        args.out,
        options=options,
        max_shard_bytes=args.max_shard_bytes,
        max_shard_count=args.max_shard_count,
        seed=args.seed,
        val_labels=args.val_labels,
        synsets=args.synsets,
        label_base=args.label_base,
        workers=args.workers,
    )
    print(
        f"{manifest.samples} samples in {len(manifest.shards)} shards, {len(manifest.skipped)} files skipped"
    )


if __name__ == "__main__":
    main()
