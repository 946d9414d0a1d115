"""Any frozen image classifier as readout sees it: an ``nn.Module`` plus its preprocessing.

A :class:`Classifier` wraps a module that maps normalised images (B, 3, H, W) to logits (B, K) with
what the module itself does not know: its normalisation, input size and class names. Layers are
named by their module path in the model (``layer2``, ``features.16``, ``blocks.4.conv``) or by
torchvision's graph node names (``layer1.0.add``, :mod:`readout.graph_nodes`); a registry entry may add
aliases (the paper's ``conv3_4`` for resnet50's ``layer2.3``), and ``logits`` always
names the model's output. Each tap's channels and stride come from one dry run of a zero image
(:meth:`Classifier.tap_info`, timm's ``feature_info`` in spirit), and a model without registry
defaults gets its bottleneck layer and readout taps by :func:`default_layers`'s rule.
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from readout.graph_nodes import with_node_taps
from readout.split import HookedSplit, Split, split_at

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: The name of the model's output in every classifier (a hook on the model itself).
LOGITS = "logits"


def out_of_place(module: nn.Module) -> nn.Module:
    """``module`` with every in-place operation under it made out of place (the same values): a
    recorded output is then never overwritten by the layer after it, nor a hooked one by autograd."""
    for child in module.modules():
        if getattr(child, "inplace", False):
            setattr(child, "inplace", False)  # noqa: B010 (not declared on nn.Module)
    return module


@dataclass(frozen=True)
class LrpDefaults:
    """The LRP composite and canonizer a classifier gets unless told otherwise (:mod:`readout.lrp`)."""

    composite: str
    canonizer: str


@dataclass(frozen=True)
class LayerDefaults:
    """What a classifier uses unless told otherwise: its layers (names: module paths or aliases) and,
    where chosen by hand for it, its LRP rules (None: :data:`readout.lrp.AUTO`)."""

    per_sample_layer: str
    readout_layer: str
    readout_taps: tuple[str, ...]
    lrp: LrpDefaults | None = None


@dataclass(frozen=True)
class TapInfo:
    """What downstream code needs to size itself from a tap (timm's feature_info, in spirit)."""

    name: str
    path: str
    channels: int
    height: int
    width: int
    stride: int
    spatial: bool
    """False for vector outputs (B, C) such as logits, which readouts broadcast over space."""


@dataclass(frozen=True)
class _Run:
    """One module's outputs in a dry run: their shapes (one per call) and when it last finished."""

    shapes: tuple[tuple[int, ...] | None, ...]
    finished: int


class Classifier(nn.Module):
    """A frozen classifier: ``forward(images in [0, 1]) -> logits``, normalisation applied inside.

    Args:
        model: any module from normalised (B, 3, H, W) to logits (B, K). Its in-place operations
            are made out of place (the same values), so that a recorded tap is not overwritten by
            the layer after it.
        mean, std: the normalisation, per colour channel.
        input_size: the side S of the square images the model takes.
        classes: class names, or their number (names are then "0", "1", ...); None counts the
            logits of one dry run.
        name: for messages and bundles.
        aliases: extra layer names, alias -> module path.
        defaults: the default layers; None applies :func:`default_layers`'s rule.
        source: how to rebuild the model (JSON, see :mod:`readout.backbones`); None if it cannot be.
        split: ``auto`` cuts the model at the bottleneck with torch.fx where it can (only the layers
            after it run per step), ``hook`` always inserts the bottleneck by a hook on full passes.

    The module stays in eval mode whatever ``train()`` is asked, and its weights never require
    gradients.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        input_size: int = 224,
        classes: int | Sequence[str] | None = None,
        name: str = "custom",
        aliases: dict[str, str] | None = None,
        defaults: LayerDefaults | None = None,
        source: dict[str, Any] | None = None,
        split: Literal["auto", "hook"] = "auto",
    ) -> None:
        super().__init__()
        if split not in ("auto", "hook"):
            raise ValueError(f"split must be 'auto' or 'hook', got {split!r}")
        self.split_mode = split
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"normalisation needs 3 means and 3 positive stds, got mean={mean}, std={std}")
        self.model = out_of_place(model)
        self._own_model = self.model  # self.model gains identities where graph nodes are tapped
        self._node_taps: list[str] = []
        self.name = name
        self.input_size = int(input_size)
        self.classes: list[str] = []
        self._runs: dict[int, dict[str, _Run]] = {}
        self.aliases = {LOGITS: "", **(aliases or {})}
        self._defaults = defaults
        self.source = source
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.requires_grad_(False)
        self.eval()
        if classes is None:
            output = _dry_run(self, self.input_size)[""].shapes[-1]
            if output is None or len(output) != 2:
                raise ValueError(f"classifier {name!r} gives {output or 'no tensor'}, not logits (B, K)")
            classes = output[1]
        self.classes = [str(i) for i in range(classes)] if isinstance(classes, int) else list(classes)
        # Not submodules: the splits share the model's modules, and state dicts must hold them once.
        self._splits: dict[str, Split] = {}

    def train(self, mode: bool = True) -> Classifier:
        return super().train(False)

    def _apply(self, fn: Any, recurse: bool = True) -> Classifier:
        self._splits.clear()  # a traced graph may hold tensors of its own; rebuild it after a move
        return super()._apply(fn, recurse)

    def with_split(self, split: Literal["auto", "hook"]) -> Classifier:
        """The same classifier (the same module, not a copy) with another ``split`` mode."""
        clone = Classifier(
            self._own_model,
            self.mean.flatten().tolist(),
            self.std.flatten().tolist(),
            self.input_size,
            self.classes,
            self.name,
            {name: path for name, path in self.aliases.items() if name != LOGITS},
            self._defaults,
            self.source,
            split,
        ).to(self.mean.device)
        for node in self._node_taps:
            clone.resolve(node)
        return clone

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) in [0, 1] -> the model's normalised input."""
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(images))

    # ----------------------------------------------------------------------------------------------------
    # Layers

    def layer_names(self) -> list[str]:
        """The named layers: the aliases (``logits`` last) if the registry gave some, else the stage
        ends of :func:`default_layers`' rule and ``logits``. Any module path works as well."""
        named = [name for name in self.aliases if name != LOGITS]
        if not named:
            named = [path for path, _ in stage_ends(self)]
        return [*named, LOGITS]

    def resolve(self, layer: str) -> str:
        """The module path of ``layer`` (an alias or a module path); unknown names list the named ones."""
        path = self.aliases.get(layer, layer)
        if path in self._paths() or self._tap_graph_node(path):
            return path
        close = difflib.get_close_matches(layer, list(dict.fromkeys([*self.aliases, *self._paths()])), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise KeyError(
            f"unknown layer {layer!r} for classifier {self.name!r}{hint}; valid layers: "
            f"{', '.join(self.layer_names())}, or any module path or torchvision graph node name "
            "of the model (torchvision.models.feature_extraction.get_graph_node_names)"
        )

    def _tap_graph_node(self, name: str) -> bool:
        """Makes the graph node ``name`` a module path of ``self.model`` (:mod:`readout.graph_nodes`);
        False if it is none. ``self.model`` is then made anew from the user's module with every node
        named so far: modules looked up before (to hook them) may no longer be the ones that run, so
        callers resolve all their layers first, as :class:`readout.taps.FeatureTaps` does."""
        model = with_node_taps(self._own_model, [*self._node_taps, name])
        if model is None:
            return False
        self._node_taps.append(name)
        self.model = model
        self._runs.clear()
        self._splits.clear()
        return True

    def module(self, layer: str) -> nn.Module:
        """The module whose output is the tap ``layer``."""
        path = self.resolve(layer)  # first: naming a graph node gives self.model a module more
        return self.model.get_submodule(path)

    def _paths(self) -> dict[str, nn.Module]:
        return dict(self.model.named_modules())

    def split(self, layer: str) -> Split:
        """The model cut at ``layer`` (:func:`readout.split.split_at`), made once per layer."""
        path = self.resolve(layer)
        if path not in self._splits:
            self._splits[path] = (
                split_at(self.model, path, self.name)
                if self.split_mode == "auto"
                else HookedSplit(self.model, self.model.get_submodule(path))
            )
        return self._splits[path]

    @property
    def chosen_lrp(self) -> LrpDefaults | None:
        """The LRP rules chosen by hand for this classifier in the registry; None where none were."""
        return self._defaults.lrp if self._defaults is not None else None

    @property
    def defaults(self) -> LayerDefaults:
        """The registry's default layers, or those of :func:`default_layers`' rule."""
        if self._defaults is None:
            self._defaults = default_layers(self)
        return self._defaults

    # ----------------------------------------------------------------------------------------------------
    # The dry run

    def runs(self, input_size: int | None = None) -> dict[str, _Run]:
        """Every module's output shapes on one zero image, by module path (made once per size)."""
        size = input_size or self.input_size
        if size not in self._runs:
            runs = _dry_run(self, size)
            output = runs[""].shapes[-1]
            if output is None or len(output) != 2 or output[1] != self.num_classes:
                raise ValueError(
                    f"classifier {self.name!r} gives {output or 'no tensor'} on a (1, 3, {size}, {size}) "
                    f"image, not logits (1, {self.num_classes}) for its {self.num_classes} classes: "
                    "give the model's classes (names or their number)"
                )
            self._runs[size] = runs
        return self._runs[size]

    def tap_info(self, layers: Sequence[str], input_size: int | None = None) -> list[TapInfo]:
        """Shapes of the given taps, from the dry run; a layer that runs more than once, or whose
        output is not a tensor, is a ValueError naming it."""
        size = input_size or self.input_size
        paths = [self.resolve(name) for name in layers]  # before the dry run: a graph node adds a module
        runs = self.runs(size)
        infos = []
        for name, path in zip(layers, paths, strict=True):
            run = runs.get(path)
            calls = 0 if run is None else len(run.shapes)
            if calls != 1:
                raise ValueError(
                    f"layer {name!r} ({path or 'the model'}) runs {calls} times in a forward pass of "
                    f"{self.name!r}; a tap must run once: choose a module that does (its parent, say)"
                )
            shape = run.shapes[0] if run is not None else None
            if shape is None or len(shape) not in (2, 4):
                raise ValueError(
                    f"layer {name!r} of {self.name!r} gives {shape or 'no tensor'}; a tap needs a "
                    "(B, C, h, w) map or a (B, C) vector"
                )
            spatial = len(shape) == 4
            h, w = (shape[2], shape[3]) if spatial else (1, 1)
            infos.append(TapInfo(name, path, shape[1], h, w, max(1, size // h), spatial))
        return infos


def as_classifier(classifier: Classifier | nn.Module) -> Classifier:
    """``classifier`` itself, or a plain module wrapped with ImageNet's preprocessing (224 px), its
    classes counted from its logits; wrap it yourself for another normalisation or size."""
    return classifier if isinstance(classifier, Classifier) else Classifier(classifier)


def tap_info(classifier: Classifier, layers: Sequence[str], input_size: int | None = None) -> list[TapInfo]:
    """Shapes of the given taps of ``classifier`` (see :meth:`Classifier.tap_info`)."""
    return classifier.tap_info(layers, input_size)


def _dry_run(classifier: Classifier, size: int) -> dict[str, _Run]:
    shapes: dict[str, list[tuple[int, ...] | None]] = {}
    finished: dict[str, int] = {}
    order = itertools.count()
    handles = []

    def recorder(path: str) -> Any:
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            shapes.setdefault(path, []).append(tuple(output.shape) if torch.is_tensor(output) else None)
            finished[path] = next(order)

        return record

    for path, module in classifier.model.named_modules():
        handles.append(module.register_forward_hook(recorder(path)))
    parameter = next(iter(classifier.model.parameters()), classifier.mean)
    x = torch.zeros(1, 3, size, size, device=parameter.device, dtype=parameter.dtype)
    try:
        with torch.no_grad():
            classifier.model(x)
    except Exception as error:
        raise ValueError(
            f"classifier {classifier.name!r} fails on a (1, 3, {size}, {size}) image: {error}"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    return {path: _Run(tuple(shapes[path]), finished[path]) for path in shapes}


def stage_ends(classifier: Classifier) -> list[tuple[str, int]]:
    """(module path, stride) of the end of each stage, in order of stride.

    For each stride (a power of two) of a (B, C, h, w) output, among the modules that run once and
    give such an output, those nearest the model's top (fewest dots in their path), and of these the
    one that finishes last: resnet's ``layer1``, efficientnet's ``features.2``, densenet's
    ``features.denseblock1``. A global pooling's (B, C, 1, 1) is left to the logits tap.
    """
    size = classifier.input_size
    best: dict[int, tuple[int, int, str]] = {}
    for path, run in classifier.runs().items():
        shape = run.shapes[0] if len(run.shapes) == 1 else None
        if not path or shape is None or len(shape) != 4 or shape[2] * shape[3] == 1:
            continue
        stride = max(1, size // shape[2])
        if stride & (stride - 1):
            continue  # an adaptive pooling to a fixed size, not a stage
        rank = (-path.count("."), run.finished, path)
        if stride not in best or rank > best[stride]:
            best[stride] = rank
    return [(best[stride][2], stride) for stride in sorted(best)]


def default_layers(classifier: Classifier) -> LayerDefaults:
    """The rule for a model without registry defaults (the paper's choices for ResNets, generalised):

    - the Per-Sample bottleneck at the end of the stage of stride 8 (resnet50's conv3_4);
    - the readout's bottleneck at the end of the stage of stride 4 (resnet50's conv2_3);
    - the readout's taps at the end of every stage of stride 4 or more, and the logits.

    Where the model has no such stride (small inputs, unusual stems), the nearest stage end with a
    larger stride is taken, else the deepest one.
    """
    ends = stage_ends(classifier)
    if not ends:
        raise ValueError(f"classifier {classifier.name!r} has no module with a (B, C, h, w) output")

    def at(stride: int) -> str:
        for path, found in ends:
            if found >= stride:
                return path
        return ends[-1][0]

    taps = tuple(path for path, stride in ends if stride >= 4) or (ends[-1][0],)
    return LayerDefaults(at(8), at(4), (*taps, LOGITS))
