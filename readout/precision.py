"""The precision of the layers after the bottleneck: fp32, or bf16 autocast where the hardware has it.

Per-Sample's fit runs the layers after the bottleneck forward and backward at every step; under
bf16 autocast their convolutions and matrix products run in bfloat16 (tensor cores on a GPU,
AVX512-BF16 or AMX on a CPU). α, the optimiser, the KL and the information map stay in fp32: only
the suffix's logits pass through bf16, and they are cast back before the loss.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Literal

import torch

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS = ("auto", "fp32", "bf16")
_reported: set[tuple[str, str]] = set()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: CUDA with bf16 support, or a CPU with AVX512-BF16
    or AMX (elsewhere bf16 is emulated and slower than fp32)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        cpu = torch.cpu
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    return False


def resolve_precision(precision: Precision, device: torch.device) -> Literal["fp32", "bf16"]:
    """``auto`` is bf16 where :func:`native_bf16`, else fp32; the choice is logged once per device."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    chosen: Literal["fp32", "bf16"] = "bf16" if native_bf16(device) else "fp32"
    if (device.type, chosen) not in _reported:
        _reported.add((device.type, chosen))
        why = "native bf16" if chosen == "bf16" else "no native bf16"
        log.info("precision auto on %s: %s (%s)", device.type, chosen, why)
    return chosen


@contextlib.contextmanager
def autocast(precision: Literal["fp32", "bf16"], device: torch.device) -> Iterator[None]:
    """bf16 autocast on ``device`` for ``bf16``; nothing for ``fp32``."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        yield
