"""torchvision's graph node names as layers: each named node becomes a module path.

torchvision's feature extraction (``get_graph_node_names``) names every operation of a traced model:
module calls by their path, a module's second call with ``_1`` (``layer1.0.relu_1``), and the
functional operations of a module's forward by that module's path and the operation
(``layer1.0.add``, ``flatten``). Readout's taps and bottleneck are forward hooks on modules, so a node
that is no module gets one: the module that runs the node (``layer1.0``) is traced by itself, with its
children kept whole, and an ``nn.Identity`` is called on the node's output under the node's own name.
The node's name is then a module path like any other (hooks, the dry run, the fx split), and the
model computes what it did.

The user's module is left as it was: the traced module and its ancestors are shallow copies that
share every child, weight and buffer with it, so the state dict (names, order and values) is the
same.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterable

import torch.fx as fx
from torch import nn


class _ChildrenAsLeaves(fx.Tracer):
    """Traces one module's own forward: its direct children are called whole."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return "." not in qualified_name or super().is_leaf_module(module, qualified_name)


def _detached(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` with dicts of its own (children, weights, hooks): changing the
    copy's children or hooks leaves ``module`` as it was; the children themselves are shared."""
    twin = copy.copy(module)
    for key, value in module.__dict__.items():
        if isinstance(value, dict):
            twin.__dict__[key] = type(value)(value)
    return twin


def _traced_with_taps(module: nn.Module, names: Iterable[str]) -> nn.Module | None:
    """``module`` traced by itself, with an identity under each of ``names`` (nodes of its own forward)
    called on that node's output; None if it cannot be traced or a name is none of its nodes."""
    try:
        graph = _ChildrenAsLeaves().trace(module)
    except Exception:  # control flow on values, unsupported ops: no node names to offer
        return None
    nodes = {node.name: node for node in graph.nodes if node.op != "output"}
    names = list(dict.fromkeys(names))
    if any(name not in nodes or hasattr(module, name) for name in names):
        return None
    for name in names:
        node = nodes[name]
        with graph.inserting_after(node):
            tap = graph.call_module(name, (node,))
        node.replace_all_uses_with(tap, delete_user_cb=lambda user, tap=tap: user is not tap)
    holder = _detached(module)
    for name in names:
        holder._modules[name] = nn.Identity()
    traced = fx.GraphModule(holder, graph, class_name=type(module).__name__)
    # Every child, weight and buffer in the module's own order, also those the forward does not
    # reach, so that the state dict is the module's.
    for attribute in ("_modules", "_parameters", "_buffers"):
        ordered = OrderedDict(getattr(holder, attribute))
        for key, value in getattr(traced, attribute).items():
            ordered.setdefault(key, value)
        traced.__dict__[attribute] = ordered
    traced.__dict__["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    return traced.train(module.training)


def with_node_taps(model: nn.Module, nodes: Iterable[str]) -> nn.Module | None:
    """``model`` with each graph node name of ``nodes`` made a module path (see the module's text);
    None if one of them is no node of the model (or the module that runs it cannot be traced)."""
    by_owner: dict[str, list[str]] = {}
    for name in nodes:
        owner, _, local = name.rpartition(".")
        by_owner.setdefault(owner, []).append(local)
    paths = dict(model.named_modules())
    if any(owner not in paths for owner in by_owner):
        return None
    root = _detached(model)
    # Deepest first: a module traced later then holds the traced ones below it.
    for owner in sorted(by_owner, key=lambda path: -(path.count(".") + 1 if path else 0)):
        container, module = _on_copy(root, owner)
        traced = _traced_with_taps(module, by_owner[owner])
        if traced is None:
            return None
        if container is None:
            root = traced
        else:
            container._modules[owner.rpartition(".")[2]] = traced
    return root


def _on_copy(root: nn.Module, path: str) -> tuple[nn.Module | None, nn.Module]:
    """The module at ``path`` under ``root`` and its container, each module on the way detached
    (:func:`_detached`) from the user's, so that replacing a child changes only the copy."""
    container: nn.Module | None = None
    module = root
    for name in path.split(".") if path else []:
        child = module._modules[name]
        assert child is not None
        container, module = module, _detached(child)
        container._modules[name] = module
    return container, module
