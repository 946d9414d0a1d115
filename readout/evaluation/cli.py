"""``python -m readout.evaluate --config configs/eval/synthetic.yaml``: attribution methods x metrics.

Every row of ``methods`` (a name, a :data:`readout.evaluation.methods.METHODS` key and its options) is run
over the eval shards and scored as in the IBA paper (Schulz et al. 2020, Sec. 4; :mod:`readout.metrics`):

- degradation (Sec. 4.6, eq. 8): the area between the scaled LeRF and MoRF curves, per tile size
  (``degradation.tiles``, tile sides in px; the paper's 8 and 14 px on 224 px images);
- localisation: the bounding-box top-n ratio (Sec. 4.5, boxes under 33% of the image) and, where the
  data set has object masks, the mask top-n ratio, positive mass inside the mask and the boundary
  scores (Relevance-IBA);
- Sensitivity-n (Sec. 4.4, App. G.1) on a subset of the images (``sensitivity.fraction``);
- cascading weight randomisation (Sec. 4.3, App. G.3), SSIM to the original map, on a subset.

Subsets are chosen by a hash of each sample's key, so they do not depend on batches, shards or ranks.

Outputs in ``out``: ``results.json`` (every number, the config, timings), ``results.md`` (the paper's
Table 2 layout: rows are methods), ``degradation.png`` (mean scaled MoRF/LeRF curves),
``sensitivity-n.png``, ``randomisation.png`` and ``heatmaps.png`` (every method on a few images).

Resuming: the metric states of each (method, shard, rank) are written to ``out/cache`` when that shard is
done (temporary file, then rename); a rerun loads them instead of recomputing. The cache key holds the
row, the classifier's weights, the readout bundle's files and every setting that changes the numbers.

Distributed: under ``torchrun`` (or with a process group initialised) every rank reads every shard and
keeps every ``world_size``-th sample (the eval loader's rank split), and the metric states are summed
over ranks before the scores are computed; rank 0 writes the outputs. The synthetic data set is written
by the command itself when ``data.synthetic`` is set and its shards are missing.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from readout.evaluation.config import EvalConfig
from readout.evaluation.report import markdown_table, save_plots, write_json
from readout.evaluation.results import compute_results
from readout.evaluation.runner import Evaluation, ensure_synthetic
from readout.logs import show_info


def _distributed(config: EvalConfig) -> tuple[int, int, bool]:
    """(rank, world size, whether this call started the process group) from torchrun's environment."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available():
        backend = "nccl" if config.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Runs the evaluation (on every rank when distributed) and writes the outputs on rank 0."""
    began = time.perf_counter()
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    rank, world_size, started = _distributed(config)
    if config.device == "cuda" and world_size > 1:
        config.device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    if rank == 0:
        ensure_synthetic(config.data)
    _barrier()
    try:
        evaluation = Evaluation(config, rank, world_size)
        totals = evaluation.run()
        rows = compute_results(evaluation, totals)
        results = {
            "rows": rows,
            "image_size": list(evaluation.image_size()),
            "world_size": world_size,
            "runtime_s": time.perf_counter() - began,
            "config": asdict(config),
        }
        if rank == 0:
            out = Path(config.out)
            out.mkdir(parents=True, exist_ok=True)
            results["plots"] = save_plots(out, config, rows, evaluation, totals)
            results["runtime_s"] = time.perf_counter() - began
            write_json(out / "results.json", results)
            (out / "results.md").write_text(markdown_table(config, rows, evaluation.image_size()))
        _barrier()
        return results
    finally:
        torch.set_num_threads(threads)
        if started:
            torch.distributed.destroy_process_group()


def parse_config(argv: list[str] | None = None) -> EvalConfig:
    """The config from ``--config FILE`` and overrides (``--degradation.tiles '[8, 16]'``), validated."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="python -m readout.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these arguments")
    parser.add_class_arguments(EvalConfig, nested_key=None, as_positional=False)
    namespace = parser.parse_args(argv)
    namespace.pop("config", None)
    return EvalConfig(**vars(parser.instantiate(namespace)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    show_info()
    config = parse_config(argv)
    results = evaluate(config)
    if results.get("plots") is not None:
        print((Path(config.out) / "results.md").read_text())
        print(f"wrote {config.out}/results.json in {results['runtime_s']:.0f} s")
    return results
