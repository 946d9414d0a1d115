"""``python -m readout.tools.synthetic --out DIR --n N --size S --seed SEED``: writes synthetic shards.

The data set and its ground truth: :mod:`readout.data.synthetic`.
"""

from __future__ import annotations

import argparse
import time

from readout.data.synthetic import write_shards


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m readout.tools.synthetic", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", required=True, help="directory for the shards and manifest.json")
    parser.add_argument("--n", type=int, required=True, help="number of samples")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels, 32-224")
    parser.add_argument("--seed", type=int, default=0, help="data seed; sample i depends on (seed, i) only")
    parser.add_argument("--start", type=int, default=0, help="index of the first sample")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    manifest = write_shards(args.out, args.n, args.size, args.seed, args.shard_size, args.start)
    seconds = time.perf_counter() - began
    print(
        f"wrote {manifest.samples} samples in {len(manifest.shards)} shards to {args.out} in {seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
