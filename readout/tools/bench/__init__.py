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
