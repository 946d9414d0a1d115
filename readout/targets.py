"""Target classes of an attribution: the ones given, checked, or the classifier's top-1.

Every attributor, evaluation method and metric resolves its ``target`` argument here, so a bad target
is the same error everywhere and None means the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def resolve_target(
    target: torch.Tensor | int | None,
    batch: int,
    device: torch.device | str,
    logits: Callable[[], torch.Tensor],
    classes: int | None = None,
) -> torch.Tensor:
    """(B,) long class indices on ``device``: ``target`` checked by :func:`checked_target`, or, when
    None, the top-1 of ``logits()`` (B, K), which is called only then (a forward pass where there
    are no logits yet). ``classes`` None: the number of classes is not known, and not checked."""
    if target is None:
        return logits().argmax(1).to(device)
    return checked_target(target, batch, classes, device)


def checked_target(
    target: torch.Tensor | int, batch: int, classes: int | None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(B,) long class indices on ``device`` from one int for all images or B indices.

    A target that is not integral, of another length than ``batch``, or outside [0, ``classes``) is
    a ValueError naming the batch size or the number of classes (``classes`` None: not checked).
    """
    indices = torch.as_tensor(target, device=device)
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ValueError(f"target must be integer class indices, got dtype {indices.dtype}")
    indices = indices.long()
    if indices.dim() == 0:
        indices = indices.expand(batch)
    if indices.dim() != 1 or len(indices) != batch:
        raise ValueError(
            f"target must be one class index or one per image: the batch has {batch} images, "
            f"got target of shape {tuple(indices.shape)}"
        )
    if classes is not None and bool(((indices < 0) | (indices >= classes)).any()):
        raise ValueError(
            f"target must be class indices in [0, {classes}) for a classifier of {classes} classes, "
            f"got {indices.tolist()}"
        )
    return indices
