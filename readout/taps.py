"""Forward hooks on named taps, as context managers that always remove what they registered.

This is the only place a layer name turns into a module. Nothing is stored on the user's modules:
the handles live in the context object and are removed on exit, also when the body raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    from readout.classifier import Classifier


def tap_module(classifier: Classifier, layer: str) -> nn.Module:
    """The module whose output is the tap ``layer`` (a module path or an alias); unknown names list
    the named layers."""
    return classifier.module(layer)


class FeatureTaps(AbstractContextManager["FeatureTaps"]):
    """Records the outputs of the named taps during forward passes inside the ``with`` block.

    ``with FeatureTaps(classifier, ["block1", "fc"]) as taps: classifier(x)``, then
    ``taps.features["block1"]`` is the last output of that tap (not detached).
    """

    def __init__(self, classifier: Classifier, layers: Iterable[str]) -> None:
        layers = list(layers)
        for name in layers:  # all names first: a graph node's name rebuilds the classifier's model
            classifier.resolve(name)
        self.modules = {name: tap_module(classifier, name) for name in layers}
        self.features: dict[str, torch.Tensor] = {}
        self.handles: list[RemovableHandle] = []

    def __enter__(self) -> FeatureTaps:
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_hook(self._recorder(name)))
        return self

    def _recorder(self, name: str) -> Callable[..., None]:
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self.features[name] = output

        return record

    def __exit__(self, *exc_info: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class ReplaceOutput(AbstractContextManager["ReplaceOutput"]):
    """Replaces the output of one tap by ``fn(output)`` inside the ``with`` block.

    Used where the whole model must run with a bottleneck inserted (the straightforward reference
    implementation, and models that cannot be split into prefix and suffix).
    """

    def __init__(
        self, classifier: Classifier, layer: str, fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        self.module = tap_module(classifier, layer)
        self.fn = fn
        self.handle: RemovableHandle | None = None

    def __enter__(self) -> ReplaceOutput:
        self.handle = self.module.register_forward_hook(lambda module, inputs, output: self.fn(output))
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def hook_count(module: nn.Module) -> int:
    """Number of forward hooks registered anywhere under ``module`` (tests check it returns to 0)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
