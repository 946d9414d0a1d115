"""A module compiled with torch.compile for fixed shapes, falling back to eager where that fails.

Per-Sample's fit calls the layers after the bottleneck with one shape (images x noise copies) for
all its steps, the ideal case for compilation (and, on CUDA, for CUDA graphs: ``reduce-overhead``).
The compile cost is paid on the first call of each shape, dtype and autocast state, with a forward
and backward pass on a copy of the input, and logged with its time; where compilation fails, one
warning, and the module runs eagerly from then on.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


class CompiledModule:
    """``module`` as a callable, compiled per input shape (see the module's text).

    ``seconds`` holds the compile time of each shape key, ``failed`` the reason compilation was given
    up (None while it works).
    """

    def __init__(self, module: nn.Module, name: str = "the module") -> None:
        self.module, self.name = module, name
        self.seconds: dict[tuple[Any, ...], float] = {}
        self.failed: str | None = None
        self._compiled: dict[str, Any] = {}

    def _for(self, device: torch.device) -> Any:
        if device.type not in self._compiled:
            mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs where torch can
            self._compiled[device.type] = torch.compile(self.module, dynamic=False, mode=mode)
        return self._compiled[device.type]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.failed is not None:
            return self.module(x)
        key = (tuple(x.shape), x.dtype, x.device, torch.is_autocast_enabled(x.device.type))
        compiled = self._for(x.device)
        if key not in self.seconds:
            began = time.perf_counter()
            try:
                probe = x.detach().clone().requires_grad_(True)
                compiled(probe).float().sum().backward()
            except Exception as error:  # any compiler failure: inductor, a missing C++ compiler, ...
                self.failed = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                log.warning("cannot compile %s (%s); it runs eagerly", self.name, self.failed)
                return self.module(x)
            self.seconds[key] = time.perf_counter() - began
            log.info("compiled %s for input %s in %.1f s", self.name, tuple(x.shape), self.seconds[key])
        return compiled(x)
