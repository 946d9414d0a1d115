"""A classifier cut at one layer: the layers before the bottleneck run once, the layers after it per step.

:func:`split_at` traces the model with torch.fx, with the layer kept as one leaf call, and cuts the
graph there: ``prefix(x) -> R`` holds everything the layer's output depends on, ``suffix(z) -> logits``
everything that depends on it. That needs the layer to be a cut of the graph: no skip connection may
carry a value from before the layer to after it (the ends of ResNet stages and the blocks of
torchvision's ``features`` are cuts; a convolution inside a residual block is not). Where the model
cannot be traced, or the layer is no cut, the bottleneck goes in by a forward hook that replaces the
layer's output on a full pass (:class:`HookedSplit`): the same maps, only slower, and logged once.
Both share submodules with the model; neither copies a weight.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Iterable

import torch
import torch.fx as fx
from torch import nn

log = logging.getLogger(__name__)


class NotSplittable(Exception):
    """The model cannot be cut at the layer by tracing (the reason is the message)."""


class Split:
    """``features(x) -> R`` and ``logits(z, x) -> logits`` for normalised images x (B, 3, H, W).

    ``z`` is the activation to put at the layer, (N, C, h, w) with N a multiple of B: each image's
    activation repeated N/B times (the noise copies), in the order of ``repeat_interleave``.
    ``suffix`` is the module that maps z alone to logits, or None where the rest of the model also
    needs x (the hook path).
    """

    traced: bool
    suffix: nn.Module | None = None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TracedSplit(Split):
    """The fx path: two graph modules over the model's own submodules."""

    traced = True

    def __init__(self, prefix: fx.GraphModule, suffix: nn.Module) -> None:
        self.prefix = prefix
        self.suffix: nn.Module = suffix

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.prefix(x)

    def logits(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.suffix(z)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer's output is known."""


class HookedSplit(Split):
    """The hook path: full passes, the layer's output captured (and the pass stopped) or replaced."""

    traced = False

    def __init__(self, model: nn.Module, module: nn.Module) -> None:
        self.model, self.module = model, module

    def features(self, x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def capture(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            captured.append(output)
            raise _Stop

        handle = self.module.register_forward_hook(capture)
        try:
            self.model(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError("the bottleneck's layer did not run in a forward pass of the classifier")
        return captured[0]

    def logits(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        repeats = len(z) // len(x)
        if repeats * len(x) != len(z):
            raise ValueError(f"z has {len(z)} rows, not a multiple of the {len(x)} images")
        if repeats > 1:
            x = x.repeat_interleave(repeats, dim=0)
        handle = self.module.register_forward_hook(lambda module, inputs, output: z)
        try:
            return self.model(x)
        finally:
            handle.remove()


class _LeafTracer(fx.Tracer):
    """torch.fx's tracer with the layer at ``leaf`` kept as one call, so that its output is one node."""

    def __init__(self, leaf: str) -> None:
        super().__init__(autowrap_modules=(math,))
        self.leaf = leaf

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return qualified_name == self.leaf or super().is_leaf_module(module, qualified_name)


def _closure(start: Iterable[fx.Node], forward: bool) -> set[fx.Node]:
    """``start`` with all its descendants (forward) or ancestors (backward) in the graph."""
    seen: set[fx.Node] = set()
    stack = list(start)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(node.users if forward else node.all_input_nodes)
    return seen


def trace_split(model: nn.Module, path: str) -> TracedSplit:
    """Cuts ``model`` at the module ``path`` with torch.fx; NotSplittable says why it cannot."""
    try:
        graph = _LeafTracer(path).trace(model)
    except Exception as error:  # any tracing failure (control flow on values, unsupported ops)
        raise NotSplittable(f"torch.fx cannot trace the model: {type(error).__name__}: {error}") from error
    root = fx.GraphModule(model, graph)
    cuts = [n for n in graph.nodes if n.op == "call_module" and n.target == path]
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(cuts) != 1 or len(inputs) != 1:
        raise NotSplittable(f"{path} is called {len(cuts)} times and the model takes {len(inputs)} inputs")
    (cut,), (image,) = cuts, inputs
    (output,) = [n for n in graph.nodes if n.op == "output"]
    after = _closure([cut], forward=True)
    if output not in after:
        raise NotSplittable(f"the model's output does not depend on {path}")
    from_input = _closure([image], forward=True)
    for node in after - {cut}:
        for source in node.all_input_nodes:
            if source not in after and source in from_input:
                raise NotSplittable(
                    f"{node.name} after {path} also reads {source.name}, computed before it "
                    "(a skip connection around the layer)"
                )

    prefix_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    before = _closure([cut], forward=False)
    for node in graph.nodes:
        if node in before:
            env[node] = prefix_graph.node_copy(node, env.__getitem__)
    prefix_graph.output(env[cut])

    suffix_graph = fx.Graph()
    env = {cut: suffix_graph.placeholder("z")}
    needed = _closure(after - {cut}, forward=False) - before | (after - {cut})
    for node in graph.nodes:
        if node in needed and node is not cut:
            env[node] = suffix_graph.node_copy(node, env.__getitem__)
    return TracedSplit(fx.GraphModule(root, prefix_graph), fx.GraphModule(root, suffix_graph))


def split_at(model: nn.Module, path: str, name: str = "the classifier") -> Split:
    """The fx split where it works, else the hook path (logged once per model and layer)."""
    try:
        return trace_split(model, path)
    except NotSplittable as reason:
        log.warning(
            "%s: not split at %r (%s); the bottleneck goes in by a forward hook on full passes: "
            "the same maps, slower",
            name,
            path,
            reason,
        )
        return HookedSplit(model, model.get_submodule(path))


def folded_copy(module: nn.Module, name: str = "the classifier") -> nn.Module:
    """A frozen copy of ``module`` for speed: batch norm folded into the convolutions before it (exact
    in eval mode, up to rounding), weights in channels_last and inputs made so; no weight gradients.
    Where torch.fx cannot trace the module, a warning, and the module itself."""
    try:
        from torch.fx.experimental.optimization import fuse

        folded = fuse(copy.deepcopy(module)).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    except Exception as error:  # a model fx cannot trace runs as it is
        warnings.warn(f"cannot fold batch norm of {name} ({error}); using it unchanged", stacklevel=2)
        return module
    return _ChannelsLast(folded.requires_grad_(False))


class _ChannelsLast(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)
