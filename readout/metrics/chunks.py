"""Many perturbed images through a model in memory-bounded chunks, without gradients.

Degradation and Sensitivity-n need thousands of forward passes per image. They describe each
perturbed image by a job number; ``map_chunks`` builds ``chunk_size`` of them at a time, runs one
forward pass and keeps one number per image, so memory is bounded by ``chunk_size`` images and their
logits whatever the number of jobs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from readout.targets import resolve_target


def map_chunks(
    model: nn.Module,
    num_jobs: int,
    make_inputs: Callable[[torch.Tensor], torch.Tensor],
    read_outputs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    chunk_size: int,
    device: torch.device,
) -> torch.Tensor:
    """One value per job: ``read_outputs(model(make_inputs(jobs)), jobs)`` over chunks of jobs.

    ``make_inputs``: jobs (n,) long -> images (n, 3, H, W); ``read_outputs``: logits (n, K), jobs (n,)
    -> (n,). Returns (num_jobs,). The model's train/eval mode is left as the caller set it.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    values = []
    with torch.no_grad():
        for start in range(0, num_jobs, chunk_size):
            jobs = torch.arange(start, min(start + chunk_size, num_jobs), device=device)
            values.append(read_outputs(model(make_inputs(jobs)), jobs))
    if not values:
        return torch.empty(0, device=device)
    return torch.cat(values)


def logits_of(model: nn.Module, images: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """images (B, 3, H, W) -> logits (B, K), ``chunk_size`` images per forward pass, no gradients."""
    with torch.no_grad():
        return torch.cat([model(part) for part in images.split(chunk_size)])


def resolve_targets(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor | None,
    chunk_size: int,
    classes: int | None = None,
) -> torch.Tensor:
    """targets (B,) long as given (checked, against ``classes`` where given), or the model's predicted
    classes when None (:func:`readout.targets.resolve_target`, the logits in chunks of ``chunk_size``)."""
    top1 = partial(logits_of, model, images, chunk_size)  # run only where no targets are given
    return resolve_target(targets, len(images), images.device, top1, classes)
