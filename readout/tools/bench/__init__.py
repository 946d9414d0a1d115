"""``python -m readout.bench``: speed ratios, side by side. The subcommands and how they time are
described in :mod:`readout.tools.bench.cli`; BENCHMARKS.md records what they measured."""
