"""Timing side by side: each candidate warmed up, repeats alternated in order, medians, ratios."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn``, the device synchronised before and after.

    Timed here, not by ``torch.utils.benchmark.Timer``: its ``timeit(n)`` first runs ``max(n // 100, 2)``
    warm-up calls, which would triple every single-call window of :func:`compare` (a resnet50 Per-Sample
    call takes seconds), and its ``blocked_autorange`` times one candidate at a time, where
    :func:`compare` alternates them so that a slow phase of a shared machine hits them all alike.
    """
    synchronise(device)
    started = time.perf_counter()
    fn()
    synchronise(device)
    return time.perf_counter() - started


def compare(
    candidates: Mapping[str, Callable[[], object]], items: int, repeats: int, device: torch.device
) -> dict:
    """Items per second of each candidate: median over ``repeats`` after one warm-up, order alternated."""
    for fn in candidates.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            times[name].append(timed(candidates[name], device))
    return {name: items / statistics.median(values) for name, values in times.items()}


def peak_memory_per_image(fn: Callable[[], object], items: int, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return torch.cuda.max_memory_allocated(device) / items / 2**20


def report(title: str, rates: dict[str, float], baseline: str, unit: str, extra: dict | None = None) -> dict:
    print(f"\n{title}")
    for name, rate in rates.items():
        print(f"  {name:<40} {rate:10.2f} {unit}   {rate / rates[baseline]:6.2f}x {baseline}")
    return {"title": title, "rates": rates, "baseline": baseline, "unit": unit, **(extra or {})}


def repeated(fn: Callable[[], object], times: int) -> None:
    for _ in range(times):
        fn()


def under(
    precision: torch.dtype | None, device: torch.device, fn: Callable[[], object]
) -> Callable[[], None]:
    """``fn`` under autocast to ``precision`` (None: fp32), as Lightning's ``bf16-mixed`` runs a step."""

    def run() -> None:
        with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
            fn()

    return run


PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}
